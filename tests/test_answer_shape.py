"""The answer's shape over fake stages (no model): ``content`` a string with a markdown reference per medium, every
medium stored as an artifact (pending while it renders), the media arrays, ``audio``, ``parts``, the streamed
frames (their content concatenated equals the whole answer's), histories that send our references back, and the
model card's modalities. Real clients against a real server: tests/test_clients.py."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import re
import time

import numpy as np
import pytest
from PIL import Image

from polymodal.modality import Modality
from polymodal.types import LLMResult, MediaPart, SignalGroup, TextDelta, TextPart
from services.ingress import build_app
from services.ingress.content import ContentStream, compose
from services.ingress.media_refs import artifact_id_of, find_media_refs, markdown_ref
from services.local import LocalBackend
from services.settings import ServerSettings
from services.store import FileStore
from tests.media_fixtures import photo_png
from tests.serve_fakes import D_LLM, FakeLLMStage, fake_stages
from tests.test_ingress import call, chat, client, data_of, data_url, err, make, user

IMAGE, AUDIO, VIDEO = Modality.IMAGE, Modality.AUDIO, Modality.VIDEO
REF = re.compile(r"(!?)\[(image|audio|video) (\d+)\]\((http://test/v1/artifacts/(art_[A-Za-z0-9]+)\.(\w+))\)")


class ScriptedLLM(FakeLLMStage):
    """Streams a fixed script: strings are text deltas, modalities are signal groups at that point of the text."""

    def __init__(self, script):
        super().__init__()
        self.script = script

    def stream(self, turns, *, modalities=(), max_new_tokens=None, temperature=None, top_p=None, seed=None,
               should_cancel=None, system=None, allowed_modalities=None):
        self.calls.append(dict(turns=list(turns), modalities=list(modalities), seed=seed))
        text, index = "", 0
        for item in self.script:
            if isinstance(item, Modality):
                n = {IMAGE: 4, AUDIO: 8, VIDEO: 24}[item]
                yield SignalGroup(item, np.full((n, D_LLM), index, np.float32), np.zeros((n, D_LLM), np.float32),
                                  index=index, text_offset=len(text))
                index += 1
            else:
                text += item
                yield TextDelta(item)
        yield LLMResult(text=text.rstrip(), groups=(), prompt_tokens=3, completion_tokens=5, finish_reason="stop")


SCRIPT = ["Here is", " a shape: ", IMAGE, " and", " a tone", " ", AUDIO, "\n", "Done. ", "\n"]


def scripted(script=SCRIPT, settings=None, step_s=0.0, **decoder_kw):
    preset, _, decoders = fake_stages(step_s=step_s, **decoder_kw)
    llm = ScriptedLLM(script)
    return build_app(LocalBackend(preset, llm, decoders), settings or ServerSettings()), llm


def sse_deltas(text: str) -> list[dict]:
    chunks = [json.loads(line[6:]) for line in text.splitlines() if line.startswith("data: {")]
    return [c["choices"][0]["delta"] for c in chunks if c.get("choices")]


def mask_ids(content: str) -> str:
    return re.sub(r"art_[A-Za-z0-9]+", "art_X", content)


# ---- content ---------------------------------------------------------------------------------------
def test_content_is_the_text_with_a_reference_where_each_medium_was_emitted():
    app, _ = scripted()
    r = chat(app, user("go"), seed=4)
    assert r.status_code == 200, r.text
    msg = r.json()["choices"][0]["message"]
    refs = REF.findall(msg["content"])
    assert [(bang, label, n) for bang, label, n, *_ in refs] == [("!", "image", "1"), ("", "audio", "1")]
    assert mask_ids(msg["content"]) == ("Here is a shape:\n\n![image 1](http://test/v1/artifacts/art_X.png)\n\n"
                                        "and a tone\n\n[audio 1](http://test/v1/artifacts/art_X.wav)\n\nDone.")
    # each reference is the stored medium: the same bytes as the arrays' data URLs
    for (_, _, _, url, _, _), field, key in zip(refs, ("images", "audios"), ("image_url", "audio_url")):
        got = call(app, "GET", url.replace("http://test", ""))
        assert got.status_code == 200 and got.content == data_of(msg[field][0][key]["url"])
    assert msg["images"][0]["type"] == "image_url" and msg["images"][0]["index"] == 0
    assert msg["audio"]["id"] == refs[1][4] and base64.b64decode(msg["audio"]["data"]) == data_of(
        msg["audios"][0]["audio_url"]["url"])
    # parts: the text cut where the media belong (the pipeline's one placement rule), media by artifact URL
    parts = msg["parts"]
    assert [p["type"] for p in parts] == ["text", "image_url", "text", "audio_url", "text"]
    assert [p["text"] for p in parts if p["type"] == "text"] == ["Here is a shape:", "and a tone", "Done."]
    assert parts[1]["image_url"]["url"] == refs[0][3] and parts[1]["text_offset"] == len("Here is a shape: ")
    assert parts[3]["artifact_id"] == refs[1][4] and parts[3]["duration_s"] > 0


def test_streamed_content_equals_the_whole_answer_and_each_reference_precedes_its_medium():
    app, _ = scripted()
    whole = chat(app, user("go"), seed=4).json()["choices"][0]["message"]
    r = call(app, "POST", "/v1/chat/completions", json={"model": "tiny", "messages": user("go"), "seed": 4,
                                                          "stream": True})
    deltas = sse_deltas(r.text)
    content = "".join(d.get("content") or "" for d in deltas)
    assert mask_ids(content) == mask_ids(whole["content"])
    for field, label in (("images", "![image 1]("), ("audios", "[audio 1](")):
        k = next(i for i, d in enumerate(deltas) if field in d)
        before = "".join(d.get("content") or "" for d in deltas[:k])
        ref = next(m for m in REF.finditer(content) if m.group(0).startswith(label))
        assert label in before and field not in deltas[k - 1]
        assert call(app, "GET", ref.group(4).replace("http://test", "")).content == data_of(
            deltas[k][field][0][field[:-1] + "_url"]["url"])
    assert not any(set(d) & {"media", "parts"} for d in deltas)


def test_url_media_format_puts_artifact_urls_in_the_arrays():
    app, _ = scripted()
    msg = chat(app, user("go"), media_format="url").json()["choices"][0]["message"]
    url = msg["images"][0]["image_url"]["url"]
    assert url.startswith("http://test/v1/artifacts/art_") and f"![image 1]({url})" in msg["content"]


@pytest.mark.parametrize("cuts", [(1,), (3, 7), tuple(range(1, 40))])
def test_content_stream_gives_the_same_content_whatever_the_pieces(cuts):
    text = "Look: \n the end.  \n"
    refs = [(6, "![image 1](u1)"), (6, "[audio 1](u2)"), (len(text.rstrip()), "[video 1](u3)")]
    whole = compose(text.rstrip(), refs)
    assert whole == "Look:\n\n![image 1](u1)\n\n[audio 1](u2)\n\nthe end.\n\n[video 1](u3)"
    cs, pieces, start, groups = ContentStream(), [], 0, list(refs[:2])
    for c in [*cuts, len(text)]:
        c = min(c, len(text))
        while groups and groups[0][0] <= c:  # a group closes when the text has reached its offset
            off, md = groups.pop(0)
            pieces.append(cs.text(text[start:off]))
            start = off
            pieces.append(cs.reference(off, md))
        pieces.append(cs.text(text[start:c]))
        start = c
    pieces.append(cs.reference(*refs[2]))
    pieces.append(cs.finish())
    assert "".join(pieces) == cs.content == whole


def test_a_reference_at_the_start_and_plain_text_answers():
    assert compose("", [(0, "![image 1](u)")]) == "![image 1](u)"
    assert compose("after", [(0, "![image 1](u)")]) == "![image 1](u)\n\nafter"
    assert compose("just text", []) == "just text"
    assert markdown_ref(VIDEO, 2, "u") == "[video 2](u)" and markdown_ref(IMAGE, 1, "u") == "![image 1](u)"


def test_references_are_parsed_back():
    text = "a ![x](http://h:1/base/v1/artifacts/art_abcdefgh1234.png) b [audio 2](</v1/artifacts/art_zzzzzzzz.wav>)" \
           " [docs](https://example.org/page) [Image 3](data:x)"
    refs = find_media_refs(text)
    assert [r.url for r in refs] == ["http://h:1/base/v1/artifacts/art_abcdefgh1234.png",
                                     "/v1/artifacts/art_zzzzzzzz.wav", "data:x"]
    assert [artifact_id_of(r.url) for r in refs] == ["art_abcdefgh1234", "art_zzzzzzzz", None]
    assert artifact_id_of("https://example.org/v1/artifacts/../x") is None


# ---- artifacts -------------------------------------------------------------------------------------
def test_a_pending_artifact_is_waited_for_and_a_failed_one_says_why():
    app, _ = scripted(settings=ServerSettings(request_timeout_s=1.0))
    store = app.state.service.store

    async def go():
        art = store.reserve("image/png", "png", ready_within_s=30)
        async with client(app) as c:
            get = asyncio.ensure_future(c.get(f"/v1/artifacts/{art.id}.png"))
            await asyncio.sleep(0.3)
            waiting = not get.done()
            store.fulfil(art, photo_png(), "image/png", "png")
            got = await get
            late = await c.get(f"/v1/artifacts/{store.reserve('image/png', 'png').id}.png")  # never fulfilled
            return waiting, got, late

    waiting, got, late = asyncio.run(go())
    assert waiting and got.status_code == 200 and got.content == photo_png()
    assert late.status_code == 504 and err(late)["code"] == "timeout"

    app, _ = scripted(["x", IMAGE], degenerate_seeds=(9,))
    r = call(app, "POST", "/v1/chat/completions", json={"model": "tiny", "messages": user("x"), "stream": True,
                                                          "seed": 9})
    url = REF.search("".join(d.get("content") or "" for d in sse_deltas(r.text))).group(4)
    assert '"generation_failed"' in r.text
    got = call(app, "GET", url.replace("http://test", ""))
    assert got.status_code == 500 and err(got)["code"] == "generation_failed" and "degenerate" in err(got)["message"]


def test_store_reserve_fulfil_fail_and_deadline(tmp_path):
    store = FileStore(tmp_path)
    a = store.reserve("image/png", "png", ttl_s=60, ready_within_s=30)
    assert store.lookup(a.id).state == "pending" and store.get(a.id) is None
    ready = store.fulfil(a, b"PNG", "image/png", "png")
    assert ready.state == "ready" and store.get(a.id)[1] == b"PNG" and ready.expires_at - ready.created_at == 60
    b = store.fail(store.reserve("audio/wav", "wav"), "boom")
    assert asyncio.run(store.wait(b.id, 1.0)) == (store.lookup(b.id), None) and store.lookup(b.id).error == "boom"
    c = store.reserve("image/png", "png", ready_within_s=1)
    t = time.monotonic()
    art, data = asyncio.run(store.wait(c.id, 0.2))
    assert art.state == "pending" and data is None and 0.15 < time.monotonic() - t < 2
    time.sleep(2.1)  # past its ready_by: the replica rendering it is gone
    assert store.lookup(c.id).state == "failed" and asyncio.run(store.wait("art_unknown000", 0.1)) == (None, None)


# ---- histories -------------------------------------------------------------------------------------
def _first_turn(app, **fields):
    return chat(app, user("draw and sing"), modalities=["image", "audio"], seed=5, **fields).json()[
        "choices"][0]["message"]


def _decoded(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))


def test_history_content_references_resolve_to_the_same_media():
    app, llm, _ = make()
    first = _first_turn(app)
    history = [*user("draw and sing"), {"role": "assistant", "content": first["content"]}, *user("make it blue")]
    r = chat(app, history)
    assert r.status_code == 200, r.text
    turn = llm.calls[-1]["turns"][1]
    assert turn.role == "assistant"
    assert [type(p).__name__ for p in turn.parts] == ["TextPart", "MediaPart", "MediaPart"]
    assert turn.parts[0].text == "Seen 0 media. DRAW AND SING"
    assert np.array_equal(turn.parts[1].data, _decoded(data_of(first["images"][0]["image_url"]["url"])))
    assert turn.parts[2].modality is AUDIO and len(turn.parts[2].data) > 1000


def test_history_sent_back_whole_takes_each_medium_once():
    """A client that keeps the whole message (content, arrays with data URLs, audio, parts) sends each medium
    three ways; the turn holds it once. An array medium that content does not reference is appended."""
    app, llm, _ = make()
    first = _first_turn(app)
    whole = {**first, "images": [*first["images"], {"type": "image_url", "image_url": {"url": data_url(
        photo_png(), "image/png")}}]}
    assert chat(app, [*user("draw and sing"), whole, *user("again")]).status_code == 200
    parts = llm.calls[-1]["turns"][1].parts
    assert [type(p).__name__ for p in parts] == ["TextPart", "MediaPart", "MediaPart", "MediaPart"]
    assert [p.modality for p in parts[1:]] == [IMAGE, AUDIO, IMAGE] and np.array_equal(parts[3].data,
                                                                                         _decoded(photo_png()))
    # arrays alone (content without references), with artifact URLs; OpenAI's audio id alone
    url_first = _first_turn(app, media_format="url")
    only_arrays = {"role": "assistant", "content": "here", "images": url_first["images"]}
    assert chat(app, [*user("a"), only_arrays, *user("b")]).status_code == 200
    assert [type(p).__name__ for p in llm.calls[-1]["turns"][1].parts] == ["TextPart", "MediaPart"]
    only_audio = {"role": "assistant", "content": None, "audio": {"id": first["audio"]["id"]}}
    assert chat(app, [*user("a"), only_audio, *user("b")]).status_code == 200
    assert llm.calls[-1]["turns"][1].parts[0].modality is AUDIO


def test_history_refusals_name_the_field_and_nothing_is_fetched(monkeypatch):
    from services.ingress.media_input import MediaReader

    fetched = []

    async def fake_fetch(self, url, param):
        fetched.append(url)
        return "image/png", b""

    monkeypatch.setattr(MediaReader, "_fetch", fake_fetch)
    app, llm, _ = make(ServerSettings(allowed_remote_hosts=("media.example.org",)))
    first = _first_turn(app)
    gone = first["content"].replace(first["parts"][1]["artifact_id"], "art_expiredexpired1")
    cases = [
        ({"role": "assistant", "content": gone}, "messages[1].content", "artifact_not_found"),
        ({"role": "assistant", "content": "see ![cat](https://media.example.org/cat.png)"}, "messages[1].content",
         "invalid_history_reference"),
        ({"role": "assistant", "content": [{"type": "image_url", "image_url": {
            "url": "https://media.example.org/c.png"}}]}, "messages[1].content[0].image_url.url",
         "invalid_history_reference"),
        ({"role": "assistant", "content": "x", "images": [{"type": "image_url", "image_url": {
            "url": "https://media.example.org/c.png"}}]}, "messages[1].images[0].image_url.url",
         "invalid_history_reference"),
        ({"role": "assistant", "content": "x", "images": ["not an item"]}, "messages[1].images[0]", None),
        ({"role": "assistant", "content": "x", "audio": {"id": "audio_not_ours"}}, "messages[1].audio.id",
         "artifact_not_found"),
    ]
    for message, param, code in cases:
        r = chat(app, [*user("a"), message, *user("b")])
        assert r.status_code == 400 and (err(r)["param"], err(r)["code"]) == (param, code), (message, r.text)
    assert fetched == []
    # an artifact past its TTL is refused the same way
    short = make(ServerSettings(artifact_ttl_s=1))[0]
    msg = _first_turn(short)
    time.sleep(2.1)
    r = chat(short, [*user("a"), {"role": "assistant", "content": msg["content"]}, *user("b")])
    assert r.status_code == 400 and err(r)["code"] == "artifact_not_found" and "expired" in err(r)["message"]


def test_a_data_url_in_assistant_markdown_is_the_medium_itself():
    app, llm, _ = make()
    content = f"A photo: ![photo]({data_url(photo_png(), 'image/png')}) there."
    assert chat(app, [*user("a"), {"role": "assistant", "content": content}, *user("b")]).status_code == 200
    parts = llm.calls[-1]["turns"][1].parts
    assert parts[0] == TextPart("A photo:") and parts[2] == TextPart("there.")
    assert np.array_equal(parts[1].data, _decoded(photo_png()))


def test_links_stay_text_and_user_parts_may_name_our_artifacts():
    app, llm, _ = make()
    first = _first_turn(app)
    ref = first["content"][first["content"].index("![image 1]"):].split(")")[0] + ")"
    text = f"A link [docs](https://example.org) and our {ref}"
    assert chat(app, [*user("a"), {"role": "assistant", "content": "see [docs](https://example.org/d)"},
                      *user(text)]).status_code == 200
    turns = llm.calls[-1]["turns"]
    assert turns[1].parts == (TextPart("see [docs](https://example.org/d)"),) and turns[2].parts == (TextPart(text),)
    url = first["parts"][1]["image_url"]["url"].replace("http://test", "http://elsewhere.example")
    r = chat(app, user({"type": "text", "text": "edit"}, {"type": "image_url", "image_url": {"url": url}}))
    assert r.status_code == 200, r.text
    part = llm.calls[-1]["turns"][0].parts[1]
    assert isinstance(part, MediaPart)
    assert np.array_equal(part.data, _decoded(data_of(first["images"][0]["image_url"]["url"])))


def test_every_answer_has_a_string_content_and_the_model_card_states_modalities():
    app, _, _ = make()
    for fields in ({}, {"modalities": ["text"]}, {"modalities": ["image", "audio", "video"]}):
        assert isinstance(chat(app, user("hi"), **fields).json()["choices"][0]["message"]["content"], str)
    card = call(app, "GET", "/v1/models").json()["data"][0]
    assert card["architecture"] == {"modality": "text+image+audio+video->text+image+audio+video",
                                    "input_modalities": ["text", "image", "audio", "video"],
                                    "output_modalities": ["text", "image", "audio", "video"]}
    only_image = make(modalities=(IMAGE,))[0]
    arch = call(only_image, "GET", "/v1/models/tiny").json()["architecture"]
    assert arch["output_modalities"] == ["text", "image"] and arch["input_modalities"][0] == "text"
