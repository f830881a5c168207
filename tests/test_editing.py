"""Editing (issue #27): the decoders render from a source medium (img2img with ``strength``, inpainting with a mask,
video-to-video) through stock diffusers pipelines composed over the loaded components; ``POST /v1/images/edits``.

Tiny random components on CPU: what is checked is the plumbing (same weights, the stock pipeline's output, the
source's pixels kept outside a mask, outputs that follow their sources), not what an edit looks like.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionImg2ImgPipeline

from decoders import DecodeError, Medium, build_decoder
from polymodal.modality import Modality
from polymodal.presets import get_preset
from polymodal.types import EditSource

IMAGE, AUDIO, VIDEO = Modality.IMAGE, Modality.AUDIO, Modality.VIDEO
SHARED = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")


@pytest.fixture(scope="module")
def configs():
    return get_preset("tiny").decoders


@pytest.fixture(scope="module")
def image_dec(configs):
    return build_decoder(IMAGE, configs[IMAGE], seed=0)


@pytest.fixture(scope="module")
def video_dec(configs):
    return build_decoder(VIDEO, configs[VIDEO], seed=0)


def picture(h: int, w: int, seed: int) -> np.ndarray:
    """A source image with structure (a bright square on a dark gradient), uint8 (H, W, 3)."""
    rng = np.random.default_rng(seed)
    img = np.zeros((h, w, 3), np.uint8)
    img[..., 0] = np.linspace(0, 120, w, dtype=np.uint8)[None, :]
    y, x = rng.integers(0, h // 2), rng.integers(0, w // 2)
    img[y:y + h // 2, x:x + w // 2] = rng.integers(100, 255, 3, dtype=np.uint8)
    return img


def edit_options(dec, **update):
    return dec.defaults.model_copy(update={"num_inference_steps": 4, "strength": 0.5, **update})


def test_edit_pipelines_share_the_loaded_components(image_dec, video_dec, configs):
    before = {id(p) for p in image_dec.pipeline.unet.parameters()}
    for dec, kinds in ((image_dec, ("whole", "masked")), (video_dec, ("whole",))):
        assert dec.edit_kinds == kinds
        for kind in kinds:
            pipe = dec.edit_pipeline(kind)
            assert pipe is dec.edit_pipeline(kind)  # composed once
            for name in SHARED:
                assert getattr(pipe, name) is getattr(dec.pipeline, name), (kind, name)
    assert {id(p) for p in image_dec.edit_pipeline("masked").unet.parameters()} == before
    audio = build_decoder(AUDIO, configs[AUDIO], seed=0)
    assert audio.edit_kinds == ()
    with pytest.raises(ValueError, match="cannot render a 'whole' edit"):
        audio.edit_pipeline("whole")


def test_img2img_equals_the_stock_pipeline(image_dec):
    emb = image_dec.encode_text(["a red circle"])
    src = picture(32, 32, 0)
    opts = edit_options(image_dec, guidance_scale=3.0)
    ours = image_dec.render(emb, [7], opts, sources=[EditSource(IMAGE, src)])[0]
    stock = StableDiffusionImg2ImgPipeline(**{k: getattr(image_dec.pipeline, k) for k in (
        *SHARED, "safety_checker", "feature_extractor")}, requires_safety_checker=False)
    stock.set_progress_bar_config(disable=True)
    from PIL import Image
    out = stock(image=Image.fromarray(src), strength=0.5, num_inference_steps=4, guidance_scale=3.0,
                prompt_embeds=emb, negative_prompt_embeds=image_dec.negative_prompt_embeds[None],
                generator=torch.Generator("cpu").manual_seed(7), output_type="np").images[0]
    assert isinstance(ours, Medium)
    assert np.abs(ours.data.astype(int) - (np.clip(out, 0, 1) * 255).round().astype(int)).max() <= 1


def test_edits_follow_their_sources_and_batch_items_equal_items_alone(image_dec):
    emb = image_dec.encode_text(["a cat", "a cat"])
    a, b = picture(32, 32, 1), picture(32, 32, 2)
    opts = edit_options(image_dec)
    both = image_dec.render(emb, [3, 3], opts, sources=[EditSource(IMAGE, a), EditSource(IMAGE, b)])
    alone = image_dec.render(emb[:1], [3], opts, sources=[EditSource(IMAGE, a)])[0]
    assert np.abs(both[0].data.astype(int) - alone.data.astype(int)).max() <= 1
    assert np.abs(both[0].data.astype(int) - both[1].data.astype(int)).mean() > 1  # same seed, other source


def test_edit_keeps_the_source_size(image_dec):
    out = image_dec.render(image_dec.encode_text(["x"]), [0], edit_options(image_dec),
                           sources=[EditSource(IMAGE, picture(40, 48, 0))])[0]
    assert out.data.shape == (40, 48, 3)


def test_inpainting_keeps_the_source_outside_the_mask(image_dec):
    src = picture(32, 32, 3)
    mask = np.zeros((32, 32), bool)
    mask[8:24, 8:24] = True
    out = image_dec.render(image_dec.encode_text(["green"]), [5], edit_options(image_dec, strength=1.0),
                           sources=[EditSource(IMAGE, src, mask)])[0]
    assert isinstance(out, Medium)
    assert np.array_equal(out.data[~mask], src[~mask])
    assert np.abs(out.data[mask].astype(int) - src[mask].astype(int)).mean() > 5


def test_video_to_video_keeps_the_frames_and_follows_the_source(video_dec):
    d = video_dec.defaults
    emb = video_dec.encode_text(["a", "a"])
    a = np.stack([picture(d.height_px, d.width_px, k) for k in range(d.num_frames)])
    b = a[::-1].copy()
    opts = edit_options(video_dec)
    out = video_dec.render(emb, [1, 1], opts, sources=[EditSource(VIDEO, a), EditSource(VIDEO, b)])
    alone = video_dec.render(emb[:1], [1], opts, sources=[EditSource(VIDEO, a)])[0]
    assert out[0].data.shape == a.shape
    assert np.abs(out[0].data.astype(int) - alone.data.astype(int)).max() <= 1
    assert np.abs(out[0].data.astype(int) - out[1].data.astype(int)).mean() > 1


def test_edit_refusals(image_dec, configs):
    emb = image_dec.encode_text(["x", "y"])
    src = picture(32, 32, 0)
    opts = edit_options(image_dec)
    with pytest.raises(ValueError, match="one source per item"):
        image_dec.render(emb, [0, 1], opts, sources=[EditSource(IMAGE, src)])
    with pytest.raises(ValueError, match="mask has shape"):
        image_dec.render(emb[:1], [0], opts, sources=[EditSource(IMAGE, src, np.ones((8, 8), bool))])
    with pytest.raises(ValueError, match="share the source's shape"):
        image_dec.render(emb, [0, 1], opts, sources=[EditSource(IMAGE, src), EditSource(IMAGE, src, np.ones((32, 32), bool))])
    with pytest.raises(ValueError, match="leaves no denoising step"):
        image_dec.render(emb[:1], [0], edit_options(image_dec, strength=0.1), sources=[EditSource(IMAGE, src)])
    with pytest.raises(ValueError, match="video source sent to the image decoder"):
        image_dec.render(emb[:1], [0], opts, sources=[EditSource(VIDEO, src[None])])
    audio = build_decoder(AUDIO, configs[AUDIO], seed=0)
    with pytest.raises(ValueError, match="cannot render"):
        audio.render(audio.encode_text(["x"]), [0], audio.defaults,
                     sources=[EditSource(AUDIO, np.zeros(1600, np.float32))])


def test_a_degenerate_edit_is_a_decode_error_not_a_black_file(image_dec):
    black = np.zeros((32, 32, 3), np.uint8)
    mask = np.zeros((32, 32), bool)  # nothing may change: the source (black) is the answer
    out = image_dec.render(image_dec.encode_text(["x"]), [0], edit_options(image_dec),
                           sources=[EditSource(IMAGE, black, mask)])[0]
    assert isinstance(out, DecodeError)


# ---- POST /v1/images/edits through a real --no-ray host (the shared tiny_server), with the official client ----

def png(image: np.ndarray, alpha: np.ndarray | None = None) -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    img = Image.fromarray(image) if alpha is None else Image.fromarray(np.dstack([image, alpha]).astype(np.uint8),
                                                                       "RGBA")
    img.save(buf, format="PNG")
    return buf.getvalue()


def decode_png(b64: str) -> np.ndarray:
    import base64
    import io

    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB"))


@pytest.fixture(scope="module")
def client(tiny_server):
    from openai import OpenAI

    return OpenAI(base_url=tiny_server + "/v1", api_key="none", max_retries=0)


def test_openai_client_images_edit_returns_images_of_the_asked_size(client):
    src = picture(64, 48, 0)
    out = client.images.edit(image=("src.png", png(src), "image/png"), prompt="make it green", n=2, size="48x40",
                             extra_body={"seed": 3, "num_inference_steps": 4, "strength": 0.5})
    assert len(out.data) == 2
    images = [decode_png(d.b64_json) for d in out.data]
    assert all(im.shape == (40, 48, 3) for im in images)
    assert [d.model_extra["seed"] for d in out.data] == [3, 4]
    assert not np.array_equal(images[0], images[1])


def test_an_edit_follows_its_source(client):
    """Same prompt, seed and options, two sources: the outputs differ (rendered from the source, not from noise)."""
    kw = dict(prompt="make it green", size="32x32", extra_body={"seed": 5, "num_inference_steps": 4, "strength": 0.5})
    a = decode_png(client.images.edit(image=("a.png", png(picture(32, 32, 1)), "image/png"), **kw).data[0].b64_json)
    a2 = decode_png(client.images.edit(image=("a.png", png(picture(32, 32, 1)), "image/png"), **kw).data[0].b64_json)
    b = decode_png(client.images.edit(image=("b.png", png(picture(32, 32, 2)), "image/png"), **kw).data[0].b64_json)
    assert np.array_equal(a, a2)  # deterministic for its seed
    assert np.abs(a.astype(int) - b.astype(int)).mean() > 1


def test_a_mask_keeps_the_rest_of_the_image(client):
    src = picture(32, 32, 4)
    alpha = np.full((32, 32), 255, np.uint8)
    alpha[8:24, 8:24] = 0  # transparent: may change (OpenAI's convention)
    out = client.images.edit(image=("src.png", png(src), "image/png"), mask=("mask.png", png(src, alpha), "image/png"),
                             prompt="a green square", size="32x32", response_format="url",
                             extra_body={"seed": 1, "num_inference_steps": 2, "strength": 1.0})
    import httpx

    from PIL import Image
    import io

    got = np.asarray(Image.open(io.BytesIO(httpx.get(out.data[0].url, timeout=60).content)).convert("RGB"))
    keep = alpha > 0
    assert np.array_equal(got[keep], src[keep])
    assert not np.array_equal(got[~keep], src[~keep])


@pytest.mark.parametrize("files, data, param", [
    ({}, {"prompt": "x"}, "image"),
    ({"image": ("a.txt", b"not an image", "text/plain")}, {"prompt": "x"}, "image"),
    ({"image": ("a.png", png(picture(32, 32, 0)), "image/png")}, {}, "prompt"),
    ({"image": ("a.png", png(picture(32, 32, 0)), "image/png")}, {"prompt": "x", "n": "99"}, "n"),
    ({"image": ("a.png", png(picture(32, 32, 0)), "image/png")}, {"prompt": "x", "size": "33x33"}, "size"),
    ({"image": ("a.png", png(picture(32, 32, 0)), "image/png")}, {"prompt": "x", "strength": "0"}, "strength"),
    ({"image": ("a.png", png(picture(32, 32, 0)), "image/png")},
     {"prompt": "x", "strength": "0.1", "num_inference_steps": "2"}, "strength"),
    ({"image": ("a.png", png(picture(32, 32, 0)), "image/png"),
      "mask": ("m.png", png(picture(32, 32, 0)), "image/png")}, {"prompt": "x"}, "mask"),  # no alpha
    ({"image": ("a.png", png(picture(32, 32, 0)), "image/png"),
      "mask": ("m.png", png(picture(16, 16, 0), np.zeros((16, 16))), "image/png")}, {"prompt": "x"}, "mask"),
    ({"image": ("a.png", png(picture(32, 32, 0)), "image/png")}, {"prompt": "x", "model": "gpt-image-1"}, "model"),
    # an img2img decoder reads strength, not InstructPix2Pix's image guidance: refused, never ignored
    ({"image": ("a.png", png(picture(32, 32, 0)), "image/png")}, {"prompt": "x", "image_guidance_scale": "2"},
     "image_guidance_scale"),
])
def test_bad_edit_requests_are_4xx_naming_the_field(tiny_server, files, data, param):
    import httpx

    r = httpx.post(tiny_server + "/v1/images/edits", files=files or {"dummy": ("d", b"", "text/plain")}, data=data,
                   timeout=60)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param, r.json()


def test_two_images_and_json_bodies_are_refused(tiny_server, client):
    import httpx
    import openai

    one = ("a.png", png(picture(32, 32, 0)), "image/png")
    with pytest.raises(openai.BadRequestError) as e:
        client.images.edit(image=[one, one], prompt="x")
    assert e.value.body["param"] == "image"
    r = httpx.post(tiny_server + "/v1/images/edits", json={"prompt": "x"}, timeout=60)
    assert r.status_code == 400 and r.json()["error"]["param"] == "image"


# ---- chat edits: turn 2 edits turn 1's image by id (no re-upload), the rule for edit=true ----

def _image_of(msg) -> np.ndarray:
    import base64
    import io

    from PIL import Image

    url = msg.model_extra["images"][0]["image_url"]["url"]
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))).convert("RGB"))


EDIT_OPTS = {"seed": 11, "image": {"strength": 0.5, "num_inference_steps": 4}}


def test_two_turn_chat_edits_turn_ones_image_by_id(client):
    import re

    first = [{"role": "user", "content": "draw a red triangle"}]
    one = client.chat.completions.create(model="tiny", messages=first, modalities=["text", "image"], max_tokens=4,
                                         seed=1).choices[0].message
    art = re.search(r"/v1/artifacts/(art_\w+)\.png", one.content).group(1)
    history = [*first, {"role": "assistant", "content": one.content},
               {"role": "user", "content": "make it green"}]
    by_id = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "make it green"}],
                                           max_tokens=4, extra_body={"edit": art, **EDIT_OPTS}).choices[0].message
    latest = client.chat.completions.create(model="tiny", messages=history, max_tokens=4,
                                            extra_body={"edit": True, **EDIT_OPTS}).choices[0].message
    other = client.chat.completions.create(
        model="tiny", max_tokens=4, extra_body={"edit": True, **EDIT_OPTS},
        messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "data:image/png;base64," + __import__("base64").b64encode(
                png(picture(32, 32, 9))).decode()}},
            {"type": "text", "text": "make it green"}]}]).choices[0].message
    a, b, c = _image_of(by_id), _image_of(latest), _image_of(other)
    assert a.shape == b.shape == _image_of(one).shape
    assert np.abs(a.astype(int) - c.astype(int)).mean() > 1  # the edit follows its source
    # edit=true found turn 1's image in the history: the same source as by id (the prompts differ, so the LLM's
    # signal states may too; the source is what both share: closer to each other than to the other source's edit)
    assert np.abs(a.astype(int) - b.astype(int)).mean() < np.abs(b.astype(int) - c.astype(int)).mean()


@pytest.mark.parametrize("edit, messages, code", [
    ("art_unknownunknownunknown", [{"role": "user", "content": "make it green"}], "artifact_not_found"),
    ("http://example.com/a.png", [{"role": "user", "content": "make it green"}], "invalid_history_reference"),
    (True, [{"role": "user", "content": "make it green"}], "no_image_to_edit"),
])
def test_chat_edit_references_resolve_from_the_store_only(client, edit, messages, code):
    import openai

    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny", messages=messages, max_tokens=4, extra_body={"edit": edit})
    assert e.value.body["param"] == "edit" and e.value.body["code"] == code, e.value.body


# ---- artifacts belong to the key that made them (in process: the ingress over the fake stages) ----

def test_with_api_keys_an_artifact_belongs_to_the_key_that_made_it():
    import asyncio

    import httpx

    from services.ingress import build_app
    from services.local import LocalBackend
    from services.settings import ServerSettings
    from tests.serve_fakes import fake_stages

    preset, llm, decoders = fake_stages((IMAGE,))
    app = build_app(LocalBackend(preset, llm, decoders), ServerSettings(api_keys=("alice", "bob")))
    alice, bob = {"Authorization": "Bearer alice"}, {"Authorization": "Bearer bob"}

    async def go():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t", timeout=60) as c:
            made = await c.post("/v1/images/generations", headers=alice,
                                json={"prompt": "a red triangle", "response_format": "url"})
            path = "/v1/artifacts/" + made.json()["data"][0]["url"].rsplit("/", 1)[1]
            art = path.rsplit("/", 1)[1].split(".")[0]
            gets = [(await c.get(path, headers=h)).status_code for h in (alice, bob, {})]

            def edit_chat(headers, edit):
                return c.post("/v1/chat/completions", headers=headers, json={
                    "model": "tiny", "messages": [{"role": "user", "content": "make it green"}], "edit": edit})

            mine, theirs = await edit_chat(alice, art), await edit_chat(bob, art)
            history = await c.post("/v1/chat/completions", headers=bob, json={"model": "tiny", "messages": [
                {"role": "user", "content": "draw"}, {"role": "assistant", "content": f"![image 1](http://t{path})"},
                {"role": "user", "content": "again"}]})
            return gets, mine, theirs, history

    gets, mine, theirs, history = asyncio.run(go())
    assert gets == [200, 404, 401]
    assert mine.status_code == 200, mine.text
    source = decoders[IMAGE].calls[-1]["sources"][0]  # alice's edit rendered from her image
    assert source is not None and source.data.shape == (preset.decoders[IMAGE].defaults.height_px,
                                                        preset.decoders[IMAGE].defaults.width_px, 3)
    assert theirs.status_code == 400 and theirs.json()["error"]["code"] == "artifact_not_found"
    assert history.status_code == 400 and history.json()["error"]["code"] == "artifact_not_found"


def test_the_decoder_worker_never_mixes_edits_and_generations_in_one_call():
    import pickle

    from services.protocol import RenderRequest
    from services.workers import BatchItem, DecoderWorker
    from tests.serve_fakes import D_LLM, fake_stages
    from polymodal.types import SignalGroup

    preset, _, decoders = fake_stages((IMAGE,))
    stage = decoders[IMAGE]
    opts = stage.defaults
    g = SignalGroup(IMAGE, np.zeros((4, D_LLM), np.float32), np.zeros((4, D_LLM), np.float32), 0, 0)
    src, other = EditSource(IMAGE, picture(32, 32, 0)), EditSource(IMAGE, picture(32, 32, 1), np.ones((32, 32), bool))
    reqs = [RenderRequest("r", g, 0, opts), RenderRequest("r", g, 1, opts, src), RenderRequest("r", g, 2, opts),
            RenderRequest("r", g, 3, opts, src), RenderRequest("r", g, 4, opts, other)]
    back = pickle.loads(pickle.dumps(reqs[1]))  # what crosses Ray
    assert np.array_equal(back.source.data, src.data) and back.source.mask is None
    out = DecoderWorker(stage).run_batch([BatchItem(r) for r in reqs])
    assert [o.seed for o in out] == [0, 1, 2, 3, 4]
    calls = sorted((c["seeds"], None if c["sources"] is None else [s.signature for s in c["sources"]])
                   for c in stage.calls)
    assert calls == [([0, 2], None), ([1, 3], [src.signature] * 2), ([4], [other.signature])]


def test_a_streamed_chat_edit_sends_the_edited_image(client):
    import base64

    src = "data:image/png;base64," + base64.b64encode(png(picture(32, 32, 3))).decode()
    msgs = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": src}},
                                         {"type": "text", "text": "make it green"}]}]
    whole = _image_of(client.chat.completions.create(model="tiny", messages=msgs, max_tokens=4,
                                                     extra_body={"edit": True, **EDIT_OPTS}).choices[0].message)
    images = [img for chunk in client.chat.completions.create(model="tiny", messages=msgs, max_tokens=4, stream=True,
                                                              extra_body={"edit": True, **EDIT_OPTS})
              for img in (chunk.choices[0].delta.model_extra or {}).get("images", []) if chunk.choices]
    assert len(images) == 1
    url = images[0]["image_url"]["url"]
    from PIL import Image
    import io

    streamed = np.asarray(Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))).convert("RGB"))
    assert np.array_equal(streamed, whole)  # the same edit, streamed or not


def test_a_toy_chat_edit_opens_its_answer_with_the_edited_image(toy_server):
    """A free-text chat edit is planned as /v1/images/edits plans one: the toy's lead-in is 0, so the edited image's
    group opens the answer and the model's words cannot lead it astray (with words first, "make it a {shape}" kept
    the source's shape on about half: bench/editing.py --quality --path chat); it ends with finish_reason stop."""
    import base64

    from openai import OpenAI

    from training.toyworld.checkers import check_image
    from training.toyworld.editing import edit_requests

    client = OpenAI(base_url=toy_server + "/v1", api_key="none", max_retries=0)
    reqs = [q for q in edit_requests(24, 32) if q["kinds"]["reshape"][0].lower().startswith("make it")][:4]
    right = 0
    for q in reqs:
        url = "data:image/png;base64," + base64.b64encode(png(q["image"])).decode()
        msgs = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                             {"type": "text", "text": q["kinds"]["reshape"][0]}]}]
        r = client.chat.completions.create(model="toy", messages=msgs, extra_body={"edit": True, "seed": 5})
        assert r.choices[0].message.content.startswith("![image 1](") and r.choices[0].finish_reason == "stop"
        got = check_image(_image_of(r.choices[0].message))
        right += got.shape == q["kinds"]["reshape"][1]["shape"] and got.colour == q["attrs"]["colour"]
    assert right >= 3, right
    chunks = list(client.chat.completions.create(model="toy", messages=msgs, stream=True,
                                                 extra_body={"edit": True, "seed": 5}))
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"


# ---- GET /v1/models says what each decoder can edit (a field OpenAI clients ignore) ----

def test_models_advertise_the_edit_kinds_of_each_decoder(tiny_server, client):
    import httpx

    card = httpx.get(tiny_server + "/v1/models", timeout=60).json()["data"][0]
    assert card["edits"] == {"image": ["whole", "masked"], "video": ["whole"]}  # audio cannot edit: left out
    assert card["edit_options"] == {"image": ["strength"], "video": ["strength"]}
    assert card["parts"]["decoders"]["audio"]["edit_kinds"] == []
    assert [m.id for m in client.models.list()] == ["tiny"]  # the official client reads the card regardless
    assert client.models.retrieve("tiny").model_extra["edits"] == card["edits"]


def test_edit_kinds_are_unknown_while_a_decoder_cannot_be_described():
    from services.ingress.routes.system import edit_kinds

    assert edit_kinds(None) is None
    assert edit_kinds({"decoders": {"image": {"edit_kinds": ["whole"]}, "video": {"error": "unreachable"}}}) is None
    assert edit_kinds({"decoders": {"image": {"edit_kinds": ["whole"]}, "audio": {"edit_kinds": []}}}) == {
        "image": ["whole"]}


# ---- video job records belong to the key that made them, as artifacts do ----

def test_with_api_keys_a_video_job_belongs_to_the_key_that_made_it():
    import asyncio

    import httpx

    from services.ingress import build_app
    from services.local import LocalBackend
    from services.settings import ServerSettings
    from tests.serve_fakes import fake_stages

    preset, llm, decoders = fake_stages((VIDEO,))
    app = build_app(LocalBackend(preset, llm, decoders), ServerSettings(api_keys=("alice", "bob")))
    alice, bob = {"Authorization": "Bearer alice"}, {"Authorization": "Bearer bob"}

    async def go():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t", timeout=60) as c:
            made = await c.post("/v1/videos", headers=alice, json={"prompt": "a square moving right"})
            assert made.status_code == 200, made.text
            path = f"/v1/videos/{made.json()['id']}"
            for _ in range(600):
                job = (await c.get(path, headers=alice)).json()
                if job["status"] in ("completed", "failed"):
                    break
                await asyncio.sleep(0.05)
            assert job["status"] == "completed", job
            assert "owner" not in job  # who made it is never shown
            jobs = [(await c.get(path, headers=h)).status_code for h in (alice, bob, {})]
            contents = [(await c.get(path + "/content", headers=h)).status_code for h in (alice, bob, {})]
            return jobs, contents, (await c.get(path, headers=bob)).json()

    jobs, contents, theirs = asyncio.run(go())
    assert jobs == [200, 404, 401] and contents == [200, 404, 401]
    assert theirs["error"]["code"] == "not_found"  # the same answer as an unknown job


# ---- video edits from chat (video-to-video through the video decoder's edit path) ----

def _mp4_url(frames: np.ndarray, fps: int = 4) -> str:
    import base64

    from polymodal.media.video import encode_mp4

    return "data:video/mp4;base64," + base64.b64encode(encode_mp4(frames, fps)).decode()


def _clip(num_frames: int, h: int, w: int, seed: int) -> np.ndarray:
    """A bright square moving right over a dark background in ``num_frames`` frames, uint8 (F, H, W, 3)."""
    frames = np.full((num_frames, h, w, 3), 20 + 10 * seed, np.uint8)
    for i in range(num_frames):
        x = i * (w // 2) // max(1, num_frames - 1)
        frames[i, h // 4:h // 4 + h // 3, x:x + w // 3] = (250, 250, 40)
    return frames


def test_a_chat_video_edit_renders_from_the_conversations_video():
    """In process (the ingress over the fake stages): ``edit: true`` with ``modalities`` asking for video sends the
    message's video, resized and sampled to the answer's size and frame count, to the video decoder; the refusals
    are 400s naming the field."""
    import asyncio

    import httpx

    from services.ingress import build_app
    from services.local import LocalBackend
    from services.settings import ServerSettings
    from tests.serve_fakes import fake_stages

    preset, llm, decoders = fake_stages((IMAGE, AUDIO, VIDEO))
    app = build_app(LocalBackend(preset, llm, decoders), ServerSettings())
    clip = _clip(6, 32, 48, 0)
    with_video = [{"role": "user", "content": [{"type": "video_url", "video_url": {"url": _mp4_url(clip)}},
                                                {"type": "text", "text": "make the square green"}]}]
    video = {"num_frames": 3, "height_px": 16, "width_px": 24, "num_inference_steps": 4, "strength": 0.5}

    async def go():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t", timeout=60) as c:
            async def chat(**body):
                return await c.post("/v1/chat/completions", json={"model": "tiny", "max_tokens": 4, **body})

            ok = await chat(messages=with_video, edit=True, modalities=["text", "video"], video=video)
            audio = await c.post("/v1/audio/generations", json={"prompt": "a tone", "response_format": "url"})
            audio_id = audio.json()["data"][0]["url"].rsplit("/", 1)[1].split(".")[0]
            refusals = [await chat(messages=[{"role": "user", "content": "make it green"}], edit=True,
                                   modalities=["text", "video"]),  # no video in the conversation
                        await chat(messages=with_video, edit=True),  # no modalities: an image edit, and no image
                        await chat(messages=with_video, edit=audio_id),  # audio cannot be edited
                        await chat(messages=with_video, edit=True, modalities=["text", "video"],
                                   video={"num_inference_steps": 2, "strength": 0.25})]
            return ok, refusals

    ok, refusals = asyncio.run(go())
    assert ok.status_code == 200, ok.text
    assert ok.json()["choices"][0]["message"]["videos"]
    call = decoders[VIDEO].calls[-1]
    (source,) = call["sources"]
    assert source.modality is VIDEO and source.data.shape == (3, 16, 24, 3) and source.mask is None
    # the frames sampled are the clip's segment centres (frames 1, 3, 5), resized: the square moved right
    xs = [np.argwhere(f.mean(axis=-1) > 120)[:, 1].mean() for f in source.data]
    assert xs[0] < xs[1] < xs[2], xs
    assert all(c["sources"] is None for c in decoders[IMAGE].calls)
    got = [(r.status_code, r.json()["error"]["param"], r.json()["error"]["code"]) for r in refusals]
    assert got == [(400, "edit", "no_video_to_edit"), (400, "edit", "no_image_to_edit"),
                   (400, "edit", "invalid_value"), (400, "video.strength", "invalid_value")], got


def test_chat_edits_a_stored_video_by_id_video_to_video(client):
    """Through a real ``--no-ray`` host (tiny, random weights): turn 1 makes a video, turn 2 edits it by id; the edit
    keeps the asked frame count and size, and follows its source (same seed and prompt, another source: another
    video)."""
    import base64
    import re

    import openai

    from polymodal.media.video import decode_video

    opts = {"num_frames": 4, "height_px": 32, "width_px": 32, "num_inference_steps": 4}

    def make(seed):
        msg = client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "a square moving right"}], max_tokens=4, seed=seed,
            modalities=["text", "video"], extra_body={"video": opts}).choices[0].message
        return re.search(r"/v1/artifacts/(art_\w+)\.mp4", msg.content).group(1)

    def edit(art):
        msg = client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "make it green"}], max_tokens=4, seed=7,
            modalities=["text", "video"], extra_body={"edit": art, "video": {**opts, "strength": 0.5}}
        ).choices[0].message
        url = msg.model_extra["videos"][0]["video_url"]["url"]
        frames, _ = decode_video(base64.b64decode(url.split(",", 1)[1]), num_frames=4)
        return frames

    a, b = make(1), make(2)
    ea, ea2, eb = edit(a), edit(a), edit(b)
    assert ea.shape == (4, 32, 32, 3)
    assert np.abs(ea.astype(int) - ea2.astype(int)).mean() < 2  # deterministic (up to the MP4 codec)
    assert np.abs(ea.astype(int) - eb.astype(int)).mean() > 2 * np.abs(ea.astype(int) - ea2.astype(int)).mean() + 1
    with pytest.raises(openai.BadRequestError) as e:  # a video edit answers with a video
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x"}], max_tokens=4,
                                       modalities=["text", "image"], extra_body={"edit": a})
    assert e.value.body["param"] == "edit" and "add \"video\" to modalities" in e.value.body["message"]


def test_a_chat_edit_refuses_the_edit_option_its_decoder_does_not_read(client):
    import openai

    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "make it green"}],
                                       extra_body={"edit": True, "image": {"image_guidance_scale": 2.0}})
    assert e.value.body["param"] == "image.image_guidance_scale"
    assert e.value.body["code"] == "unsupported_parameter"
    assert "strength" in e.value.body["message"]  # says what it reads instead


def test_edit_options_follow_the_decoder_that_serves_them():
    """An InstructPix2Pix decoder reads image_guidance_scale and no strength (nothing is noised); unknown (not
    described yet): only the strength product is checked."""
    import asyncio

    from services.errors import APIError
    from services.ingress.edit_sources import check_edit_options, decoder_edit_options

    class Backend:
        calls = 0

        async def describe(self):
            Backend.calls += 1
            return {"decoders": {"image": {"edit_kinds": ["whole"], "edit_options": ["image_guidance_scale"]}}}

    cache: dict = {}
    got = [asyncio.run(decoder_edit_options(Backend(), IMAGE, cache)) for _ in range(2)]
    assert got == [("image_guidance_scale",)] * 2 and Backend.calls == 1  # described once
    defaults = get_preset("tiny").decoders[IMAGE].defaults
    one_step = defaults.model_copy(update={"num_inference_steps": 1, "strength": 0.6})
    check_edit_options(("image_guidance_scale",), IMAGE, {"image_guidance_scale": 2.0}, one_step, "")  # no strength
    with pytest.raises(APIError) as e:
        check_edit_options(("image_guidance_scale",), IMAGE, {"strength": 0.5}, one_step, "image.")
    assert e.value.param == "image.strength" and e.value.status == 400
    with pytest.raises(APIError, match="leaves no denoising step"):
        check_edit_options(None, IMAGE, {}, one_step, "")
    check_edit_options(None, IMAGE, {"image_guidance_scale": 2.0}, defaults, "")  # unknown: not refused


# ---- an InstructPix2Pix image decoder: one pipeline that generates (zero source latents) and edits ----

@pytest.fixture(scope="module")
def ip2p_dec(configs):
    return build_decoder(IMAGE, configs[IMAGE].model_copy(update={"options": {"pipeline": "instruct-pix2pix"}}),
                         seed=0)


def _stock_ip2p(dec, **kw):
    out = dec.pipeline(prompt_embeds=kw.pop("emb"), negative_prompt_embeds=dec.negative_prompt_embeds[None],
                       generator=torch.Generator("cpu").manual_seed(kw.pop("seed")), output_type="np", **kw)
    return (np.clip(out.images[0], 0, 1) * 255).round().astype(int)


def test_instruct_pix2pix_generates_from_zero_latents_and_edits_from_its_source(ip2p_dec):
    from PIL import Image

    dec = ip2p_dec
    assert type(dec.pipeline).__name__ == "StableDiffusionInstructPix2PixPipeline"
    assert dec.pipeline.unet.config.in_channels == 8
    assert dec.edit_kinds == ("whole", "masked") and dec.edit_options == ("image_guidance_scale",)
    assert dec.edit_pipeline("whole") is dec.pipeline  # it edits itself: no second pipeline, no second weights
    emb = dec.encode_text(["a red circle"])
    opts = dec.defaults.model_copy(update={"num_inference_steps": 3, "guidance_scale": 3.0})
    gen = dec.render(emb, [4], opts)[0]
    assert isinstance(gen, Medium) and gen.data.shape == (opts.height_px, opts.width_px, 3)
    zeros = torch.zeros(1, 4, opts.height_px // dec.pipeline.vae_scale_factor,
                        opts.width_px // dec.pipeline.vae_scale_factor)
    stock = _stock_ip2p(dec, emb=emb, seed=4, image=zeros, num_inference_steps=3, guidance_scale=3.0,
                        image_guidance_scale=1.0)
    assert np.abs(gen.data.astype(int) - stock).max() <= 1
    src = picture(32, 32, 6)
    edit = dec.render(emb, [4], opts.model_copy(update={"image_guidance_scale": 2.0}),
                      sources=[EditSource(IMAGE, src)])[0]
    stock = _stock_ip2p(dec, emb=emb, seed=4, image=Image.fromarray(src), num_inference_steps=3,
                        guidance_scale=3.0, image_guidance_scale=2.0)
    assert np.abs(edit.data.astype(int) - stock).max() <= 1
    other = dec.render(emb, [4], opts, sources=[EditSource(IMAGE, picture(32, 32, 7))])[0]
    assert np.abs(edit.data.astype(int) - other.data.astype(int)).mean() > 1  # it follows its source
    # no strength here: one step with the default strength is not refused (nothing is noised)
    assert isinstance(dec.render(emb, [4], opts.model_copy(update={"num_inference_steps": 1}),
                                 sources=[EditSource(IMAGE, src)])[0], Medium)


def test_instruct_pix2pix_masked_edit_keeps_the_source_outside_the_mask(ip2p_dec):
    src = picture(32, 32, 8)
    mask = np.zeros((32, 32), bool)
    mask[4:20, 10:28] = True
    out = ip2p_dec.render(ip2p_dec.encode_text(["green"]), [2], ip2p_dec.defaults.model_copy(
        update={"num_inference_steps": 3}), sources=[EditSource(IMAGE, src, mask)])[0]
    assert np.array_equal(out.data[~mask], src[~mask])
    assert np.abs(out.data[mask].astype(int) - src[mask].astype(int)).mean() > 5


def test_an_instruct_pix2pix_folder_loads_as_one(ip2p_dec, configs, tmp_path):
    from decoders.errors import DecoderLoadError

    ip2p_dec.save_pretrained(tmp_path / "ip2p")
    loaded = build_decoder(IMAGE, configs[IMAGE].model_copy(update={"source": "pretrained",
                                                                    "path": str(tmp_path / "ip2p")}))
    assert loaded.edit_options == ("image_guidance_scale",)
    emb = loaded.encode_text(["x"])
    a = loaded.render(emb, [1], loaded.defaults)[0].data
    b = ip2p_dec.render(emb, [1], ip2p_dec.defaults)[0].data
    assert np.abs(a.astype(int) - b.astype(int)).max() <= 1
    with pytest.raises(DecoderLoadError, match="unknown options"):
        build_decoder(IMAGE, configs[IMAGE].model_copy(update={"options": {"pipline": "instruct-pix2pix"}}))
    with pytest.raises(DecoderLoadError, match="choices"):
        build_decoder(IMAGE, configs[IMAGE].model_copy(update={"options": {"pipeline": "pix2pix"}}))
