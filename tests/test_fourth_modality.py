"""A fourth output modality, added inside this test without touching a product file: a ``pointcloud`` spec and
codec (float32 (P, 3) points as ``.npy`` bytes), a tiny decoder kind and a preset entry (``tiny`` plus that
modality's decoder and output projector; its signal count comes from the spec). It goes through the in-process
pipeline and through the HTTP ingress on the ``--no-ray`` host (``LocalBackend`` + ``build_app``) as a part of the
answer. Teardown unregisters it, so every other test sees the product's own modalities.
"""

from __future__ import annotations

import base64
import io
import subprocess
from pathlib import Path

import numpy as np
import pytest

from polymodal.media_io import MediaCodec, MediaError
from polymodal.modality import Modality, ModalitySpec, register_modality, unregister_modality

ROOT = Path(__file__).resolve().parent.parent
PRODUCT = ("polymodal", "decoders", "projectors", "services", "mosit", "training")
COND_SHAPE = (4, 6)  # (Q, D_cond): a medium of Q * D_cond / 3 = 8 points

pytestmark = pytest.mark.timeout(300)
REGISTERED = [m.value for m in Modality]  # the product's own modalities (image, audio, video, object3d)


class NpyPointCodec(MediaCodec):
    """Point clouds: float32 (P, 3) <-> ``.npy`` bytes (numpy's own format, no pickles)."""

    mime_type = "application/x-npy"
    ext = "npy"

    def sniff(self, head: bytes) -> bool:
        return head.startswith(b"\x93NUMPY")

    def decode(self, data, *, limits, options, name=None):
        from polymodal.types import MediaPart

        try:
            points = np.load(io.BytesIO(bytes(data)), allow_pickle=False)
        except ValueError as e:
            raise MediaError(self.modality, "corrupt", f"not a .npy file ({e})") from None
        self.validate(points, {})
        return MediaPart(self.modality, points, name=name)

    def validate(self, data, meta) -> None:
        if not (data.dtype == np.float32 and data.ndim == 2 and data.shape[1] == 3):
            raise ValueError(f"pointcloud data must be float32 (P, 3), got {data.dtype} {data.shape}")

    def encode(self, data, meta):
        buf = io.BytesIO()
        np.save(buf, data, allow_pickle=False)
        return buf.getvalue(), self.mime_type, self.ext


POINTCLOUD_SPEC = ModalitySpec(
    name="pointcloud",
    label="point cloud",
    noun="point cloud",
    signal_prefix="PTS",
    default_signal_count=3,
    input_markers=("<Pointcloud>", "</Pointcloud>"),
    content_part="pointcloud_url",
    answer_field="pointclouds",
    input_mime_types=("application/x-npy",),
    file_extensions=(".npy",),
    option_fields=("num_inference_steps",),
    codec=NpyPointCodec(),
)


class PointCloudDecoder:
    """A decoder kind without weights: the conditioning (Q, D_cond) of each item read as (Q * D_cond / 3, 3) points
    (deterministic, so the test can recompute every medium from its signal group)."""

    modality: Modality  # set when registered

    def __init__(self, config):
        self.config = config
        self.defaults = config.defaults
        self.cond_shape = (config.cond_tokens, config.cond_dim)
        self.init_state = "random"

    @classmethod
    def from_config(cls, config, *, device="cpu", seed: int = 0) -> "PointCloudDecoder":
        return cls(config)

    def render(self, prompt_embeds, seeds, options=None, should_cancel=None, on_step=None):
        from decoders.media import Medium

        embeds = prompt_embeds.detach().float().cpu().numpy()  # (B, Q, D_cond)
        if on_step is not None:
            on_step(0)
        return [Medium(self.modality, embeds[k].reshape(-1, 3).astype(np.float32), seed=s)
                for k, s in enumerate(seeds)]


@pytest.fixture(scope="module")
def pointcloud():
    from decoders import register_decoder, unregister_decoder

    m = register_modality(POINTCLOUD_SPEC)
    PointCloudDecoder.modality = m
    register_decoder(PointCloudDecoder)
    try:
        yield m
    finally:
        unregister_decoder(m)
        unregister_modality(m)
    assert [x.value for x in Modality] == REGISTERED


@pytest.fixture(scope="module")
def preset(pointcloud):
    """``tiny`` plus the pointcloud decoder and output projector; ``signals.counts`` does not list it (the spec's
    default count applies)."""
    from polymodal.config import DecoderConfig, DecoderDefaults, PresetConfig, ProjectorConfig
    from polymodal.presets import get_preset

    data = get_preset("tiny").model_dump()
    data["name"] = "tiny-pointcloud"
    data["decoders"][pointcloud] = DecoderConfig(cond_tokens=COND_SHAPE[0], cond_dim=COND_SHAPE[1],
                                                 defaults=DecoderDefaults(num_inference_steps=1))
    data["output_projectors"][pointcloud] = ProjectorConfig(
        kind="transformer", hidden_dim=32, options={"num_layers": 1, "num_heads": 2, "ff_dim": 64})
    assert pointcloud not in data["signals"]["counts"]
    return PresetConfig.model_validate(data)


@pytest.fixture(scope="module")
def pipe(preset):
    from polymodal.pipeline import AnyToAnyPipeline

    return AnyToAnyPipeline.from_preset(preset)


def _expected_points(pipe, group) -> np.ndarray:
    """What the decoder must render from ``group``: the output projector's (Q, D_cond) read as points."""
    stage = pipe.decoder_stages[group.modality]
    return stage.project([group])[0].detach().float().numpy().reshape(-1, 3)


def test_the_product_does_not_know_the_modality(pointcloud):
    """No product file names it: everything it needs came from this test's registrations."""
    r = subprocess.run(["git", "grep", "-il", "pointcloud", "--", *PRODUCT], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 1 and r.stdout == "", r.stdout
    assert pointcloud is Modality("pointcloud") is Modality.parse("PointCloud") is Modality.POINTCLOUD
    assert pointcloud in Modality and len(Modality) == len(REGISTERED) + 1 and list(Modality)[-1] is pointcloud


def test_the_preset_round_trips_and_counts_from_the_spec(preset, pointcloud):
    from polymodal.config import PresetConfig

    assert preset.signals.counts[pointcloud] == POINTCLOUD_SPEC.default_signal_count == 3
    assert list(preset.signals.counts)[:3] == [Modality.IMAGE, Modality.AUDIO, Modality.VIDEO]  # ids kept in order
    again = PresetConfig.from_yaml(preset.to_yaml())
    assert again == preset and "pointcloud" in preset.to_yaml()
    spec = preset.signals.spec()
    assert spec.tokens[pointcloud] == ("<PTS0>", "<PTS1>", "<PTS2>")
    assert spec.input_markers[pointcloud] == ("<Pointcloud>", "</Pointcloud>")


def test_in_process_pipeline_renders_the_fourth_modality(pipe, pointcloud):
    answer = pipe.generate("make a point cloud of a chair", modalities=[pointcloud], seed=0)
    groups = [g for g in answer.llm.groups if g.modality is pointcloud]
    assert len(groups) == 1 and groups[0].hidden_states.shape == (3, pipe.llm_stage.engine.d_llm)
    media = [p for p in answer.media if getattr(p, "modality", None) is pointcloud]
    assert len(media) == 1, answer.parts
    points = media[0].data
    assert points.dtype == np.float32 and points.shape == (COND_SHAPE[0] * COND_SHAPE[1] // 3, 3)
    np.testing.assert_allclose(points, _expected_points(pipe, groups[0]), rtol=1e-5, atol=1e-6)
    data, mime, ext = media[0].encode()
    assert (mime, ext) == ("application/x-npy", "npy")
    np.testing.assert_array_equal(np.load(io.BytesIO(data)), points)
    assert media[0].duration_s is None


def _answer_media(client, message: dict, modality: Modality) -> list[bytes]:
    """The files of ``modality`` in an answer message, found by the spec (not by a position in ``content``): the
    ordered parts of type ``spec.content_part`` and/or the ``spec.answer_field`` array; data URLs or artifact
    URLs."""
    spec = modality.spec
    parts = list(message.get(spec.answer_field) or [])
    content = message.get("content")
    if isinstance(content, list):
        parts += [p for p in content if isinstance(p, dict) and p.get("type") == spec.content_part]
    urls = list(dict.fromkeys(p[spec.content_part]["url"] if spec.content_part in p else p["url"] for p in parts))
    out = []
    for url in urls:
        if url.startswith("data:"):
            out.append(base64.b64decode(url.split(",", 1)[1]))
        else:
            r = client.get(url)
            assert r.status_code == 200, r.text
            out.append(r.content)
    return out


def test_http_ingress_on_the_no_ray_host_answers_with_the_fourth_modality(pipe, preset, pointcloud):
    from fastapi.testclient import TestClient

    from services.ingress import build_app
    from services.local import LocalBackend

    backend = LocalBackend.from_preset(preset)
    assert pointcloud in backend.output_modalities
    with TestClient(build_app(backend)) as client:
        models = client.get("/v1/models").json()["data"][0]
        assert "pointcloud" in models["output_modalities"]
        r = client.post("/v1/chat/completions", json={
            "model": "tiny-pointcloud", "seed": 0, "modalities": ["text", "pointcloud"],
            "messages": [{"role": "user", "content": "make a point cloud of a chair"}]})
        assert r.status_code == 200, r.text
        files = _answer_media(client, r.json()["choices"][0]["message"], pointcloud)
        unknown = client.post("/v1/chat/completions", json={
            "model": "tiny-pointcloud", "modalities": ["hologram"],
            "messages": [{"role": "user", "content": "hi"}]})
    assert len(files) == 1
    points = np.load(io.BytesIO(files[0]), allow_pickle=False)
    same = pipe.generate("make a point cloud of a chair", modalities=[pointcloud], seed=0)  # the same preset and seed
    want = next(p for p in same.media if getattr(p, "modality", None) is pointcloud).data
    np.testing.assert_allclose(points, want, rtol=1e-5, atol=1e-6)
    assert unknown.status_code == 400 and "pointcloud" in unknown.json()["error"]["message"]
