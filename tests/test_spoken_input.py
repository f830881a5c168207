"""Spoken input in chat (issue #26): an ``input_audio`` part, or a ``video_url`` part's sound track, transcribed by the
speech stage and, where the preset opts in (``spoken_transcript``), marked into the prompt beside the part's tokens;
the transcript in the answer (``message.input_transcripts``, the first streamed delta); silence in a transcript-only
turn refused; the toy preset end to end in process.

The real-speech tests need the ``flite`` program (skip with the reason where it is missing, fail under ``CI=true``);
the plumbing tests use :class:`FakeRecogniser` as the speech stage."""

from __future__ import annotations

import asyncio
import base64
import io
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest

from polymodal.modality import Modality
from polymodal.types import MediaPart, TextPart, Transcript
from services.ingress import build_app
from services.local import LocalBackend
from services.settings import ServerSettings
from tests.media_fixtures import audio_bytes, encode_video, photo_frames, require_program
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


# ---- a video's sound track -------------------------------------------------------------------------------------
class FakeRecogniser:
    """The speech stage, faked: hears ``text`` in whatever it is sent and records the requests."""

    def __init__(self, text: str):
        self.text, self.requests = text, []

    async def transcribe(self, request) -> Transcript:
        self.requests.append(request)
        return Transcript(self.text, "en", len(request.samples) / request.sample_rate_hz, (), "fake", "fake")


def mp4(sound: tuple[np.ndarray, int] | None, duration_s: float = 2.0) -> bytes:
    """The four photos as an 8 fps H.264 MP4 of about ``duration_s``, with ``sound`` as its AAC track (or none)."""
    frames = photo_frames()  # 16 frames: 2 s
    frames = np.concatenate([frames] * int(np.ceil(duration_s / 2.0)))
    return encode_video(frames, 8, sound=sound)


def video_message(data: bytes, before: str | None = None, after: str | None = None) -> list[dict]:
    video = {"type": "video_url", "video_url": {"url": "data:video/mp4;base64," + base64.b64encode(data).decode()}}
    content = [*([{"type": "text", "text": before}] if before else []), video,
               *([{"type": "text", "text": after}] if after else [])]
    return [{"role": "user", "content": content}]


def tone(duration_s: float = 2.0, rate: int = 22050) -> tuple[np.ndarray, int]:
    t = np.arange(int(duration_s * rate)) / rate
    return (0.4 * np.sin(2 * np.pi * 300.0 * t)).astype(np.float32), rate


def test_a_videos_speech_is_transcribed_after_its_frames(speech_worker):
    """A real spoken sentence (flite) as an MP4's sound track: pocketsphinx hears it; the marked transcript follows
    the video's part in the prompt and is listed under the video_url part's indices."""
    import soundfile as sf

    samples, rate = sf.read(io.BytesIO(spoken_wav(SAID)), dtype="float32")
    app, llm = app_for(speech_worker, spoken_transcript=MARK)
    [r] = post_all(app, [{"messages": video_message(mp4((samples, rate), len(samples) / rate), "Look:",
                                                    "Answer briefly."), "seed": 1}])
    assert r.status_code == 200, r.text
    parts = llm_parts(llm)
    assert [type(p) for p in parts] == [TextPart, MediaPart, TextPart, TextPart]
    assert parts[1].modality is Modality.VIDEO and parts[3].text == "Answer briefly."
    heard = parts[2].text
    assert heard.startswith("[spoken] ") and word_errors(SAID, heard.removeprefix("[spoken] "))[0] <= 2, heard
    [t] = r.json()["choices"][0]["message"]["input_transcripts"]
    assert (t["message_index"], t["content_index"]) == (0, 1) and t["text"] == heard.removeprefix("[spoken] ")
    assert t["sent_to_llm"] is True and abs(t["duration_s"] - len(samples) / rate) < 0.2


def test_a_videos_sound_track_is_heard_only_where_there_is_one_and_the_preset_opts_in():
    """Opted in: the sound track reaches the recogniser as 16 kHz mono and its transcript follows the video; a video
    without an audio stream adds nothing (no call, no transcript); a preset not opted in decodes no sound track and
    transcribes nothing."""
    with_sound, silent = mp4(tone()), mp4(None)
    rec = FakeRecogniser("show me the sea")
    app, llm = app_for(rec, spoken_transcript=MARK)
    r1, r2 = post_all(app, [{"messages": video_message(with_sound, "Q1", "Q2")},
                            {"messages": video_message(silent, "Q1", "Q2")}])
    assert r1.status_code == 200 and r2.status_code == 200, (r1.text, r2.text)
    [req] = rec.requests
    assert req.sample_rate_hz == 16000 and req.samples.dtype == np.float32 and req.samples.ndim == 1
    assert abs(len(req.samples) / 16000 - 2.0) < 0.15 and np.abs(req.samples).max() > 0.2
    texts = [p.text if isinstance(p, TextPart) else p.modality for p in llm_parts(llm, 0)]
    assert texts == ["Q1", Modality.VIDEO, "[spoken] show me the sea", "Q2"]
    assert llm_parts(llm, 0)[1].sound_track is None  # the track went to the recogniser, not to the LLM stage
    [t] = r1.json()["choices"][0]["message"]["input_transcripts"]
    assert (t["message_index"], t["content_index"], t["text"], t["sent_to_llm"]) == (0, 1, "show me the sea", True)
    texts = [p.text if isinstance(p, TextPart) else p.modality for p in llm_parts(llm, 1)]
    assert texts == ["Q1", Modality.VIDEO, "Q2"] and "input_transcripts" not in r2.json()["choices"][0]["message"]
    assert llm_parts(llm, 1)[1].sound_track is None
    rec2 = FakeRecogniser("show me the sea")
    plain, llm2 = app_for(rec2, spoken_transcript=None)
    [r3] = post_all(plain, [{"messages": video_message(with_sound, "Q1", "Q2")}])
    assert r3.status_code == 200, r3.text
    parts = llm_parts(llm2)
    assert [type(p) for p in parts] == [TextPart, MediaPart, TextPart] and parts[1].sound_track is None
    assert rec2.requests == [] and "input_transcripts" not in r3.json()["choices"][0]["message"]


def test_transcript_only_silence_alone_is_refused():
    """Transcript-only (no audio encoder): audio in which nothing was heard, alone in the user's message, is a 400
    naming the part (not an empty turn sent to the LLM); beside text, the text alone goes on."""
    rec = FakeRecogniser("")
    app, llm = app_for(rec, spoken_transcript="{transcript}", audio_encoder=False)
    silence = audio_bytes(np.zeros(16000, np.float32), 16000)
    alone, beside = post_all(app, [{"messages": audio_message(silence)},
                                   {"messages": audio_message(silence, "Draw a cat.")}])
    err = alone.json()["error"]
    assert alone.status_code == 400 and err["code"] == "invalid_value", alone.text
    assert err["param"] == "messages[0].content[0]"
    assert "no speech was heard in messages[0].content[0]" in err["message"]
    assert beside.status_code == 200, beside.text
    assert len(llm.calls) == 1 and [p.text for p in llm_parts(llm)] == ["Draw a cat."]
    [t] = beside.json()["choices"][0]["message"]["input_transcripts"]
    assert t["text"] == "" and t["sent_to_llm"] is False and len(rec.requests) == 2


# ---- a preset's spoken vocabulary (the toy's: what its users are trained to say) --------------------------------
def test_the_toy_vocabulary_is_current_and_holds_no_held_out_request():
    """The shipped corpus is what :func:`spoken_corpus` writes today (regenerate with ``write_spoken_corpus``), the
    toy preset names it, and no held-out request or plain question is a line of it."""
    from polymodal.presets import get_preset
    from polymodal.presets.toy import SPOKEN_VOCABULARY_FILE
    from training.toyworld import phrasings as P

    shipped = [ln for ln in SPOKEN_VOCABULARY_FILE.read_text().splitlines() if not ln.startswith("#")]
    assert shipped == P.spoken_corpus(), ("stale: .venv/bin/python -c 'from training.toyworld.phrasings import "
                                          "write_spoken_corpus as w; w(\"polymodal/assets/toy/spoken-vocabulary.txt\")'")
    assert get_preset("toy").spoken_vocabulary == str(SPOKEN_VOCABULARY_FILE)
    assert P.spoken_sentence("What is 47 - 3D?") == "what is forty seven three d"
    lines = set(shipped)
    held = {P.spoken_sentence(r) for m in P.HELDOUT_REQUESTS for r in P.all_prompts(m, heldout=True)}
    held |= {P.spoken_sentence(q) for q in P.plain_questions(200)}
    assert held and not held & lines


def test_a_vocabulary_steers_pocketsphinx_and_leaves_the_generic_model_alone(speech_worker):
    """Spoken held-out audio requests: with the toy vocabulary the transcripts name the asked pitch and timbre at
    least as often as with the generic model (which hears "sine" as "sign"), and at least 5 of 6; a generic call
    after the vocabulary's is the same as before it (one decoder pool per language model)."""
    import soundfile as sf

    from polymodal.presets.toy import SPOKEN_VOCABULARY_FILE
    from training.toyworld.phrasings import requests

    asr, vocab = speech_worker.asr, str(SPOKEN_VOCABULARY_FILE)
    named = {"generic": 0, "vocabulary": 0}
    first_generic = None
    for said, _, asked in requests("audio", 6, heldout=True, seed=3):
        x, rate = sf.read(io.BytesIO(spoken_wav(said)), dtype="float32")
        generic, steered = asr.transcribe(x, rate).text, asr.transcribe(x, rate, vocabulary=vocab).text
        first_generic = first_generic or (x, rate, generic)
        for key, text in (("generic", generic), ("vocabulary", steered)):
            named[key] += all(v in text.split() for v in asked.values())
    assert named["vocabulary"] >= max(5, named["generic"]), named
    x, rate, generic = first_generic
    assert asr.transcribe(x, rate).text == generic
    assert vocab in asr.asr.describe()["vocabularies"]


def test_a_vocabulary_that_cannot_be_used_is_a_clear_error(speech_worker, tmp_path):
    """Words the dictionary lacks are named, an empty corpus is refused, and a preset whose vocabulary file is
    missing does not start (:func:`polymodal.preflight.check_start`)."""
    from polymodal.preflight import StartupError, check_start
    from polymodal.presets import get_preset
    from skills.base import SkillLoadError

    odd, empty = tmp_path / "odd.txt", tmp_path / "empty.txt"
    odd.write_text("draw a red zzqxj\n")
    empty.write_text("# nothing\n\n")
    x = np.zeros(8000, np.float32)
    with pytest.raises(SkillLoadError, match="zzqxj"):
        speech_worker.asr.transcribe(x, 16000, vocabulary=str(odd))
    with pytest.raises(SkillLoadError, match="holds no sentence"):
        speech_worker.asr.transcribe(x, 16000, vocabulary=str(empty))
    tiny = get_preset("tiny")
    with pytest.raises(StartupError, match="spoken_vocabulary .*missing.txt"):
        check_start(tiny.model_copy(update={"spoken_vocabulary": str(tmp_path / "missing.txt")}))


def test_the_presets_vocabulary_goes_with_each_spoken_part_only():
    """Chat sends the preset's vocabulary with every transcription it asks for."""
    rec = FakeRecogniser("a high sine tone")
    preset, _, decoders = fake_stages((Modality.IMAGE,))
    preset = preset.model_copy(update={"spoken_transcript": MARK, "spoken_vocabulary": "/srv/said.txt"})
    app = build_app(LocalBackend(preset, FakeLLMStage(), decoders, speech=rec), ServerSettings())
    [r] = post_all(app, [{"messages": audio_message(audio_bytes(tone()[0], 22050))}])
    assert r.status_code == 200, r.text
    assert [q.vocabulary for q in rec.requests] == ["/srv/said.txt"]


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
