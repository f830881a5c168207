"""The clients people already use, against a real ``polymodal serve --no-ray`` (uvicorn on a loopback port; one server
per preset for the whole session, tests/local_server.py): the official ``openai`` client, litellm and LangChain's
``ChatOpenAI``. ``tiny`` (random weights) where the point is the shape, ``toy`` (``make serve``'s preset) where the
media must mean something: the toy world's checkers read what was drawn or played.

What each client sees of an answer with media: ``content`` (a string with ``![image 1](URL)`` / ``[audio 1](URL)``,
URL the stored artifact) everywhere; ``message.images`` / ``delta.images`` (litellm); ``message.audio`` (openai,
litellm, LangChain's ``additional_kwargs``). A second turn sends the history back as the client stores it and the
LLM stage receives the first turn's image.
"""

from __future__ import annotations

import base64
import io
import os
import re

import httpx
import numpy as np
import pytest
from PIL import Image

from training.toyworld import checkers

pytestmark = pytest.mark.timeout(600)

REF = re.compile(r"(!?)\[(image|audio|video) (\d+)\]\((http://127\.0\.0\.1:\d+/v1/artifacts/(art_\w+)\.(\w+))\)")


def refs(content: str) -> list[tuple[str, str]]:
    """``(label, url)`` of each media reference in ``content``."""
    return [(m.group(2), m.group(4)) for m in REF.finditer(content)]


def artifact_id(url: str) -> str:
    return url.rsplit("/", 1)[1].split(".")[0]


def fetch(url: str) -> bytes:
    r = httpx.get(url, timeout=120)
    assert r.status_code == 200, r.text
    return r.content


def data_of(url: str) -> bytes:
    assert url.startswith("data:"), url[:40]
    return base64.b64decode(url.split(",", 1)[1])


@pytest.fixture(scope="module")
def litellm():
    os.environ["LITELLM_LOCAL_MODEL_COST_MAP"] = "True"  # before the import: no fetch of the cost map
    import litellm

    litellm.telemetry = False
    return litellm


@pytest.fixture
def llm_turns(monkeypatch):
    """The turns every request hands the LLM stage (the server runs in this process)."""
    from polymodal.pipeline import LLMStage

    seen: list[list] = []
    original = LLMStage.stream

    def stream(self, turns, **kw):
        seen.append(list(turns))
        return original(self, turns, **kw)

    monkeypatch.setattr(LLMStage, "stream", stream)
    return seen


def openai_client(base: str):
    import openai

    return openai.OpenAI(base_url=base + "/v1", api_key="none", max_retries=0, timeout=120)


def chat_openai(base: str, model: str, **kw):
    from langchain_openai import ChatOpenAI

    return ChatOpenAI(model=model, base_url=base + "/v1", api_key="none", max_retries=0, timeout=120, **kw)


def assert_turn_holds(turn, png: bytes) -> None:
    """An assistant turn the LLM stage received holds the image ``png`` decodes to."""
    from polymodal.types import MediaPart

    images = [p for p in turn.parts if isinstance(p, MediaPart)]
    expected = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))
    assert turn.role == "assistant" and len(images) == 1 and np.array_equal(images[0].data, expected)


# ---- tiny: the shape ---------------------------------------------------------------------------------------
def test_every_client_gets_a_string_content_with_and_without_media(tiny_server, litellm):
    msgs = [{"role": "user", "content": "hello"}]
    plain = openai_client(tiny_server).chat.completions.create(model="tiny", messages=msgs, max_tokens=8, seed=1)
    assert isinstance(plain.choices[0].message.content, str)
    media = openai_client(tiny_server).chat.completions.create(
        model="tiny", messages=msgs, max_tokens=8, seed=1, modalities=["text", "image", "audio", "video"])
    m = media.choices[0].message
    assert [label for label, _ in refs(m.content)] == ["image", "audio", "video"]
    assert (len(m.images), len(m.audios), len(m.videos)) == (1, 1, 1)
    assert m.audio.id == artifact_id(refs(m.content)[1][1])
    out = litellm.completion(model="openai/tiny", api_base=tiny_server + "/v1", api_key="none", messages=msgs,
                             max_tokens=8, seed=1, modalities=["image", "audio", "video"])
    assert isinstance(out.choices[0].message.content, str) and len(refs(out.choices[0].message.content)) == 3
    lc = chat_openai(tiny_server, "tiny", max_tokens=8, seed=1)
    assert isinstance(lc.invoke("hello").content, str)
    assert all(isinstance(c.content, str) for c in lc.stream("hello"))


# ---- toy: the official client ------------------------------------------------------------------------------
def test_openai_client_draws_and_a_second_turn_sees_the_drawing(toy_server, llm_turns):
    client = openai_client(toy_server)
    first = client.chat.completions.create(model="toy", messages=[{"role": "user", "content": "Draw a blue triangle."}],
                                           seed=1)
    m = first.choices[0].message
    [(label, url)] = refs(m.content)
    png = fetch(url)
    reading = checkers.check_bytes("image", png)
    assert label == "image" and (reading.colour, reading.shape) == ("blue", "triangle")
    assert data_of(m.images[0]["image_url"]["url"]) == png and m.parts[-1]["image_url"]["url"] == url
    # the client's own message object sent back: the LLM stage gets the same image in the assistant turn
    second = client.chat.completions.create(model="toy", seed=2, messages=[
        {"role": "user", "content": "Draw a blue triangle."}, m, {"role": "user", "content": "What colour is it?"}])
    assert_turn_holds(llm_turns[-1][1], png)
    assert "blue" in second.choices[0].message.content.lower()


# ---- toy: litellm --------------------------------------------------------------------------------------------
def test_litellm_reads_images_audio_and_generates_images(toy_server, litellm):
    kw = {"model": "openai/toy", "api_base": toy_server + "/v1", "api_key": "none"}
    m = litellm.completion(messages=[{"role": "user", "content": "Draw a red circle."}], seed=1,
                           **kw).choices[0].message
    [(label, url)] = refs(m.content)
    png = fetch(url)
    assert data_of(m.images[0]["image_url"]["url"]) == png  # litellm's message.images (OpenRouter's shape)
    reading = checkers.check_bytes("image", png)
    assert (reading.colour, reading.shape) == ("red", "circle")
    m = litellm.completion(messages=[{"role": "user", "content": "Let me hear a high tone."}], modalities=["audio"],
                           seed=1, **kw).choices[0].message
    [(label, url)] = refs(m.content)
    wav = base64.b64decode(m.audio.data)
    assert label == "audio" and fetch(url) == wav and checkers.check_bytes("audio", wav).pitch == "high"
    img = litellm.image_generation(prompt="a blue triangle", **kw)  # litellm's default response format
    reading = checkers.check_bytes("image", base64.b64decode(img.data[0].b64_json))
    assert (reading.colour, reading.shape) == ("blue", "triangle")


def test_litellm_streaming_sends_the_reference_then_the_image(toy_server, litellm):
    chunks = list(litellm.completion(model="openai/toy", api_base=toy_server + "/v1", api_key="none", seed=1,
                                     messages=[{"role": "user", "content": "Draw a red circle."}], stream=True))
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    content = "".join(d.content or "" for d in deltas)
    [(_, url)] = refs(content)
    with_ref = next(i for i, d in enumerate(deltas) if d.content and "![image 1](" in d.content)
    with_image = next(i for i, d in enumerate(deltas) if getattr(d, "images", None))
    assert with_ref < with_image and data_of(deltas[with_image].images[0]["image_url"]["url"]) == fetch(url)
    built = litellm.stream_chunk_builder(chunks).choices[0].message
    assert built.content == content and data_of(built.images[0]["image_url"]["url"]) == fetch(url)


def test_litellm_second_turn_gets_the_first_turns_image(toy_server, litellm, llm_turns):
    kw = {"model": "openai/toy", "api_base": toy_server + "/v1", "api_key": "none"}
    ask = {"role": "user", "content": "What colour is it?"}
    history = [{"role": "user", "content": "Draw a red circle."}]
    first = litellm.completion(messages=history, seed=1, **kw).choices[0].message
    png = fetch(refs(first.content)[0][1])
    answer = litellm.completion(messages=[*history, first, ask], seed=2, **kw).choices[0].message.content
    assert_turn_holds(llm_turns[-1][1], png)
    assert "red" in answer.lower()
    # control: the same words with the reference of a blue triangle: the toy model answers from the image
    blue = litellm.completion(messages=[{"role": "user", "content": "Draw a blue triangle."}], seed=1, **kw)
    swapped = first.content.replace(refs(first.content)[0][1], refs(blue.choices[0].message.content)[0][1])
    answer = litellm.completion(messages=[*history, {"role": "assistant", "content": swapped}, ask], seed=2,
                                **kw).choices[0].message.content
    assert "blue" in answer.lower()


# ---- toy: LangChain ----------------------------------------------------------------------------------------
def test_langchain_gets_media_through_content_and_sends_them_back(toy_server, llm_turns):
    from langchain_core.messages import HumanMessage

    llm = chat_openai(toy_server, "toy", seed=1)
    first = llm.invoke("Draw a red circle.")
    [(label, url)] = refs(first.content)
    png = fetch(url)
    assert label == "image" and checkers.check_bytes("image", png).colour == "red"
    streamed = "".join(c.content for c in llm.stream("Draw a red circle."))
    assert [label for label, _ in refs(streamed)] == ["image"]
    assert checkers.check_bytes("image", fetch(refs(streamed)[0][1])).shape == "circle"
    answer = llm.invoke([HumanMessage("Draw a red circle."), first, HumanMessage("What colour is it?")])
    assert_turn_holds(llm_turns[-1][1], png)
    assert "red" in answer.content.lower()
    # audio: a reference in content and OpenAI's audio slot (additional_kwargs), both sent back
    sound = chat_openai(toy_server, "toy", seed=1, model_kwargs={"modalities": ["audio"]}).invoke(
        "Let me hear a high tone.")
    [(label, url)] = refs(sound.content)
    assert label == "audio" and sound.additional_kwargs["audio"]["id"] == artifact_id(url)
    assert checkers.check_bytes("audio", fetch(url)).pitch == "high"
    later = llm.invoke([HumanMessage("Let me hear a high tone."), sound, HumanMessage("Is it high or low?")])
    from polymodal.types import MediaPart

    assert isinstance(later.content, str) and sum(isinstance(p, MediaPart) for p in llm_turns[-1][1].parts) == 1
