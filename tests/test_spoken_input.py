"""Spoken input in chat (issue #26): an ``input_audio`` part transcribed by the speech stage and, where the preset opts
in (``spoken_transcript``), marked into the prompt beside the audio's tokens; the transcript in the answer
(``message.input_transcripts``, the first streamed delta); the toy preset end to end in process.

Needs the ``flite`` program (skips with the reason where it is missing, fails under ``CI=true``)."""

from __future__ import annotations

import asyncio
import base64
import io
import sys
from pathlib import Path

import httpx
import pytest

from polymodal.modality import Modality
from polymodal.types import MediaPart, TextPart
from services.ingress import build_app
from services.local import LocalBackend
from services.settings import ServerSettings
from tests.media_fixtures import require_program
from tests.serve_fakes import FakeLLMStage, fake_stages

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from speech import word_errors  # noqa: E402  (bench/speech.py's WER)

SAID = "I would like a cup of coffee please"
MARK = "[spoken] {transcript}"


@pytest.fixture(scope="module")
def speech_worker():
    require_program("flite")
    from services.speech import SpeechWorker

    worker = SpeechWorker.from_config({"tts_backends": ["flite"]})
    yield worker
    worker.close()


def spoken_wav(text: str, voice: str | None = None) -> bytes:
    """``text`` spoken by flite (the default voice unless named) as a 16-bit WAV."""
    import soundfile as sf

    from skills.tts import build_synthesizer

    synth = build_synthesizer(("flite",), strict=True)
    buf = io.BytesIO()
    sf.write(buf, synth.synthesize(text, voice), synth.sample_rate_hz, format="WAV", subtype="PCM_16")
    return buf.getvalue()


def audio_message(wav: bytes, text: str | None = None) -> list[dict]:
    content: list[dict] = [{"type": "input_audio",
                            "input_audio": {"data": base64.b64encode(wav).decode(), "format": "wav"}}]
    if text is not None:
        content.append({"type": "text", "text": text})
    return [{"role": "user", "content": content}]


def app_for(worker, *, spoken_transcript: str | None, audio_encoder: bool = True):
    preset, _, decoders = fake_stages((Modality.IMAGE,))
    update = {"spoken_transcript": spoken_transcript}
    if not audio_encoder:
        update["encoders"] = {m: e for m, e in preset.encoders.items() if m is not Modality.AUDIO}
    llm = FakeLLMStage()
    return build_app(LocalBackend(preset.model_copy(update=update), llm, decoders, speech=worker),
                     ServerSettings()), llm


def post_all(app, bodies: list[dict], model: str = "tiny") -> list[httpx.Response]:
    async def go():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test",
                                     timeout=300) as h:
            return [await h.post("/v1/chat/completions", json={"model": model, **b}) for b in bodies]

    return asyncio.run(go())


def llm_parts(llm: FakeLLMStage, call: int = -1) -> list:
    return list(llm.calls[call]["turns"][-1].parts)


def test_the_preset_option_names_the_transcript_once():
    from polymodal.presets import get_preset

    tiny = get_preset("tiny")
    assert tiny.spoken_transcript is None  # opt-in
    ok = type(tiny).model_validate({**tiny.model_dump(), "spoken_transcript": "<said>{transcript}</said> {{x}}"})
    assert ok.spoken_transcript.format(transcript="hi") == "<said>hi</said> {x}"
    assert type(tiny).from_yaml(ok.to_yaml()) == ok
    for bad in ("no field", "{transcript} {transcript}", "{text}", "{transcript} {0}"):
        with pytest.raises(ValueError, match="spoken_transcript"):
            type(tiny).model_validate({**tiny.model_dump(), "spoken_transcript": bad})


def test_opted_in_the_marked_transcript_follows_the_audio_and_is_in_the_answer(speech_worker):
    app, llm = app_for(speech_worker, spoken_transcript=MARK)
    wav = spoken_wav(SAID)
    whole, streamed = post_all(app, [
        {"messages": audio_message(wav, "Answer briefly."), "seed": 1},
        {"messages": audio_message(wav), "seed": 1, "stream": True}])
    assert whole.status_code == 200, whole.text
    parts = llm_parts(llm, 0)
    # the audio's own tokens, then the marked transcript, then the typed text
    assert [type(p) for p in parts] == [MediaPart, TextPart, TextPart] and parts[0].modality is Modality.AUDIO
    heard = parts[1].text
    assert heard.startswith("[spoken] ") and parts[2].text == "Answer briefly."
    errors, n = word_errors(SAID, heard.removeprefix("[spoken] "))
    assert errors / n <= 0.2, heard
    msg = whole.json()["choices"][0]["message"]
    assert isinstance(msg["content"], str) and msg["role"] == "assistant"  # OpenAI's shape kept
    [t] = msg["input_transcripts"]
    assert t["text"] == heard.removeprefix("[spoken] ") and (t["message_index"], t["content_index"]) == (0, 0)
    assert t["sent_to_llm"] is True and 1.0 < t["duration_s"] < 5.0
    assert streamed.status_code == 200
    first = next(ln for ln in streamed.text.splitlines() if ln.startswith("data: {"))
    import json

    delta = json.loads(first[6:])["choices"][0]["delta"]
    assert delta["role"] == "assistant" and delta["input_transcripts"] == msg["input_transcripts"]


def test_not_opted_in_no_transcript_reaches_the_llm(speech_worker, monkeypatch):
    app, llm = app_for(speech_worker, spoken_transcript=None)
    calls = []
    monkeypatch.setattr(speech_worker, "transcribe", lambda *a, **k: calls.append(a))  # must not be called
    [r] = post_all(app, [{"messages": audio_message(spoken_wav(SAID)), "seed": 1}])
    assert r.status_code == 200, r.text
    parts = llm_parts(llm)
    assert [type(p) for p in parts] == [MediaPart] and calls == []
    assert "input_transcripts" not in r.json()["choices"][0]["message"]


def test_transcript_only_without_an_audio_encoder(speech_worker):
    """Opted in with no audio encoder: the transcript replaces the audio; not opted in: audio is refused (400)."""
    app, llm = app_for(speech_worker, spoken_transcript="{transcript}", audio_encoder=False)
    refusing, llm2 = app_for(speech_worker, spoken_transcript=None, audio_encoder=False)
    [r] = post_all(app, [{"messages": audio_message(spoken_wav(SAID)), "seed": 1}])
    assert r.status_code == 200, r.text
    [part] = llm_parts(llm)
    assert isinstance(part, TextPart) and word_errors(SAID, part.text)[0] <= 2
    assert "COFFEE" in r.json()["choices"][0]["message"]["content"]  # the fake LLM echoes what it read
    [r2] = post_all(refusing, [{"messages": audio_message(spoken_wav(SAID)), "seed": 1}])
    assert r2.status_code == 400 and r2.json()["error"]["code"] == "unsupported_modality" and llm2.calls == []


def test_corrupt_or_missing_stage_spoken_input_is_refused(speech_worker):
    """Corrupt audio: 400 naming the part, before the LLM runs; an opted-in preset without a speech stage: 503."""
    app, llm = app_for(speech_worker, spoken_transcript=MARK)
    junk = b"RIFF\x24\x00\x00\x00WAVEfmt " + b"\x00" * 40
    bodies = [{"messages": audio_message(junk)},
              {"messages": [{"role": "user", "content": [
                  {"type": "input_audio", "input_audio": {"data": "not base64!", "format": "wav"}}]}]}]
    for r in post_all(app, bodies):
        err = r.json()["error"]
        assert r.status_code == 400 and err["param"].startswith("messages[0].content[0].input_audio"), r.text
    assert llm.calls == []
    preset, _, decoders = fake_stages((Modality.IMAGE,))
    llm3 = FakeLLMStage()
    bare = build_app(LocalBackend(preset.model_copy(update={"spoken_transcript": MARK}), llm3, decoders),
                     ServerSettings())
    [r] = post_all(bare, [{"messages": audio_message(spoken_wav(SAID))}])
    assert r.status_code == 503 and r.json()["error"]["code"] == "stage_unavailable" and llm3.calls == []


# ---- the toy preset, the real path end to end in process --------------------------------------------------------
def _toy_built() -> bool:
    from polymodal.presets.toy import toy_root

    return (toy_root() / "export" / "export.json").is_file()


@pytest.mark.skipif(not _toy_built(), reason="no toy world build")
def test_toy_draws_what_a_spoken_request_asks():
    """Held-out toy requests spoken by the default voice, sent as input_audio alone: pocketsphinx (in-process speech
    stage) hears them, the transcript reaches the toy LLM as the user's text beside the audio's tokens, and the image
    shows the asked colour and shape (the toy checker reads it) for at least 3 of the 4."""
    require_program("flite")
    import toyworld as TW
    from polymodal.presets.toy import TOY_SPOKEN_TRANSCRIPT
    from training.toyworld.checkers import check_bytes

    backend = LocalBackend.from_preset("toy", modalities=[Modality.IMAGE], speech={"tts_backends": ["flite"]})
    assert backend.preset.spoken_transcript == TOY_SPOKEN_TRANSCRIPT  # the toy opts in
    app = build_app(backend, ServerSettings())
    reqs = TW.draw_requests("image", 4, 0)  # held out (bench/toyworld.py's draw)
    TW.check_heldout("image", [r for r, _, _ in reqs])
    try:
        answers = post_all(app, [{"messages": audio_message(spoken_wav(r)), "modalities": ["image"], "seed": i,
                                  "max_tokens": 32} for i, (r, _, _) in enumerate(reqs)], model="toy")
    finally:
        backend.speech.close()
    shown = []
    for (said, _, asked), r in zip(reqs, answers):
        assert r.status_code == 200, r.text
        msg = r.json()["choices"][0]["message"]
        [heard] = msg["input_transcripts"]
        assert word_errors(said, heard["text"])[0] <= 2, heard
        reading = check_bytes("image", TW.data_url_bytes(msg["images"][0]["image_url"]["url"]))
        shown.append(((reading.colour, reading.shape) == (asked["colour"], asked["shape"]), said, heard["text"],
                      reading))
    # measured: 3 of these 4 (the miss: "give me a red circle on a plane background" drawn yellow); bench/speech.py
    # (b) has the share over more requests
    assert sum(ok for ok, *_ in shown) >= 3, shown
