"""The 3D modality (issue #29): its spec and codec (PLY point clouds, GLB meshes), its decoder kind (Shap-E over a
tiny random folder loaded strictly; the point-set pipeline), and the rest of the system treating it through the spec
(signal tokens, the answer's arrays and ordered parts, ``--out`` files)."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

from polymodal.media.object3d import (
    GLB_MIME,
    OBJECT3D,
    OBJECT3D_SPEC,
    PLY_MIME,
    Mesh3D,
    decode_glb,
    decode_ply,
)
from polymodal.modality import Modality

pytestmark = pytest.mark.timeout(300)


def _cloud(n: int = 50, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.concatenate([rng.normal(size=(n, 3)), rng.uniform(0, 1, (n, 3))], axis=1).astype(np.float32)


def _tetrahedron() -> Mesh3D:
    v = np.array([[0, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1]], np.float32)
    f = np.array([[0, 2, 1], [0, 1, 3], [0, 3, 2], [1, 2, 3]], np.int32)
    c = np.array([[255, 0, 0], [0, 255, 0], [0, 0, 255], [255, 255, 0]], np.uint8)
    return Mesh3D(v, f, c)


# ------------------------------------------------------------------------------------------------- spec, codec


def test_the_spec_is_registered_after_the_built_ins_with_its_own_tokens():
    assert [m.value for m in Modality][:4] == ["image", "audio", "video", "object3d"]
    assert Modality("object3d") is OBJECT3D is Modality.OBJECT3D and OBJECT3D.spec is OBJECT3D_SPEC
    from polymodal.config import SignalConfig

    spec = SignalConfig(counts={Modality.IMAGE: 4, OBJECT3D: 4}).spec()
    assert spec.tokens[OBJECT3D] == ("<3D0>", "<3D1>", "<3D2>", "<3D3>")
    assert OBJECT3D.spec.reference(1, "u") == "[object3d 1](u)"


def test_point_clouds_round_trip_through_ply():
    from decoders.media import Medium

    pts = _cloud()
    data, mime, ext = Medium(OBJECT3D, pts, seed=0).encode()
    assert (mime, ext) == (PLY_MIME, "ply") and data.startswith(b"ply\n")
    back = decode_ply(data)
    np.testing.assert_allclose(back[:, :3], pts[:, :3], rtol=0, atol=0)  # xyz float32, exact
    np.testing.assert_allclose(back[:, 3:], pts[:, 3:], atol=0.5 / 255 + 1e-6)  # rgb as uint8
    from polymodal.media_io import sniff_modality

    assert sniff_modality(data) is OBJECT3D


def test_meshes_round_trip_through_glb():
    from decoders.media import Medium

    mesh = _tetrahedron()
    m = Medium(OBJECT3D, mesh, seed=3)
    data, mime, ext = m.encode()
    assert (mime, ext) == (GLB_MIME, "glb") and data[:4] == b"glTF"
    back = decode_glb(data)
    np.testing.assert_allclose(back.vertices, mesh.vertices)
    np.testing.assert_array_equal(back.faces, mesh.faces)
    np.testing.assert_array_equal(back.colors, mesh.colors)
    assert m.duration_s is None and mesh.shape == (4, 4)


@pytest.mark.parametrize("bad, why", [
    (np.zeros((5, 3), np.float32), "float32 \\(P, 6\\)"),
    (np.zeros((5, 6), np.float64), "float32 \\(P, 6\\)"),
    (np.zeros((0, 6), np.float32), "P >= 1"),
    (np.full((5, 6), np.nan, np.float32), "finite"),
    (np.concatenate([np.zeros((5, 3)), np.full((5, 3), 2.0)], 1).astype(np.float32), "colours must be in"),
])
def test_the_codec_refuses_malformed_points(bad, why):
    from decoders.media import Medium

    with pytest.raises(ValueError, match=why):
        Medium(OBJECT3D, bad, seed=0)


def test_malformed_meshes_are_refused_and_degenerate_media_named():
    v = np.zeros((3, 3), np.float32)
    with pytest.raises(ValueError, match="index vertices"):
        Mesh3D(v, np.array([[0, 1, 5]], np.int32), np.zeros((3, 3), np.uint8))
    with pytest.raises(ValueError, match="int32"):
        Mesh3D(v, np.array([[0, 1, 2]], np.int64), np.zeros((3, 3), np.uint8))
    codec = OBJECT3D.spec.codec
    assert codec.degenerate(np.zeros((9, 6), np.float32)) == "every point at one place"
    assert codec.degenerate(_cloud()) is None
    assert codec.degenerate(Mesh3D(v, np.zeros((0, 3), np.int32), np.zeros((3, 3), np.uint8))) == \
        "a mesh without faces"


def test_a_3d_file_as_input_is_refused_by_name():
    from polymodal.media_io import DEFAULT_LIMITS, DecodeOptions, MediaError

    with pytest.raises(MediaError, match="object3d: 3D files are an output only") as e:
        OBJECT3D.spec.codec.decode(b"ply\nformat", limits=DEFAULT_LIMITS, options=DecodeOptions())
    assert e.value.code == "unsupported"


# ---------------------------------------------------------------------------------------------- decoder kinds


@pytest.fixture(scope="module")
def shap_e_folder(tmp_path_factory):
    from decoders import save_tiny_checkpoint
    from polymodal.config import DecoderConfig

    path = tmp_path_factory.mktemp("shap-e") / "tiny-shap-e"
    save_tiny_checkpoint(OBJECT3D, DecoderConfig(cond_tokens=1, cond_dim=32), path, seed=0)
    return path


def _shap_e_config(path, **kw):
    from polymodal.config import DecoderConfig, DecoderDefaults

    return DecoderConfig(source="pretrained", path=str(path), cond_tokens=1, cond_dim=32,
                         defaults=DecoderDefaults(num_inference_steps=2, guidance_scale=3.0), **kw)


def test_shap_e_loads_a_tiny_random_folder_strictly_and_writes_a_glb(shap_e_folder, tmp_path):
    import torch
    from diffusers import ShapEPipeline

    from decoders import build_decoder
    from decoders.object3d import ProjectedShapEPipeline

    index = json.loads((shap_e_folder / "model_index.json").read_text())
    assert index["_class_name"] == "ShapEPipeline"  # the hub's layout (openai/shap-e)
    dec = build_decoder(OBJECT3D, _shap_e_config(shap_e_folder))
    assert dec.init_state == "pretrained" and dec.cond_shape == (1, 32)
    assert type(dec.pipeline) is ProjectedShapEPipeline and isinstance(dec.pipeline, ShapEPipeline)
    # only _encode_prompt is ours: every other attribute of the class is the stock pipeline's
    assert [k for k in vars(ProjectedShapEPipeline) if not k.startswith("__")] == ["_encode_prompt"]
    embeds = dec.encode_text(["a red cube", "a blue torus"])
    assert embeds.shape == (2, 1, 32)
    np.testing.assert_allclose(embeds.norm(dim=-1).numpy(), np.sqrt(32), rtol=1e-5)  # normalised, scaled
    states = torch.randn(1, 1, 32, generator=torch.Generator().manual_seed(0))
    out = dec.render(states, [7])  # one item: Shap-E's marching cubes runs on a 128^3 grid (~10 s on CPU)
    assert not isinstance(out[0], Exception), str(out[0])
    m = out[0]
    assert isinstance(m.data, Mesh3D) and len(m.data.faces) > 0 and m.seed == 7
    data, mime, ext = m.encode()
    assert (mime, ext) == ("model/gltf-binary", "glb")
    (tmp_path / f"mesh.{ext}").write_bytes(data)
    back = decode_glb((tmp_path / "mesh.glb").read_bytes())
    np.testing.assert_allclose(back.vertices, m.data.vertices)
    np.testing.assert_array_equal(back.faces, m.data.faces)
    import trimesh

    # a closed surface, as marching cubes makes: every edge of the written faces is shared by exactly two faces.
    # process=False: trimesh's default merge of near-equal vertices can weld a few of the ~2M random-field
    # vertices that happen to coincide in float32 and so report a pinched (non-manifold) edge that the file lacks
    assert trimesh.Trimesh(back.vertices, back.faces, process=False).is_watertight
    assert dec.render(states, [7], should_cancel=lambda: True)[0].reason == "cancelled"


def test_the_tiny_marching_cubes_table_closes_surfaces():
    """The table the tiny random renderer gets (the real checkpoint ships its own) makes closed, outward meshes."""
    import torch
    import trimesh
    from diffusers.pipelines.shap_e.renderer import MeshDecoder

    from decoders.object3d import marching_cubes_table

    md = MeshDecoder()
    md.cases, md.masks = marching_cubes_table()
    assert int(md.masks.sum(1).max()) <= 5 and not md.masks[0].any() and not md.masks[255].any()
    g = torch.linspace(-1, 1, 20)
    x, y, z = torch.meshgrid(g, g, g, indexing="ij")
    noise = torch.randn(20, 20, 20, generator=torch.Generator().manual_seed(0))
    for field in (0.7 - (x**2 + y**2 + z**2).sqrt(), noise):
        padded = torch.full((22, 22, 22), -1.0)
        padded[1:-1, 1:-1, 1:-1] = field
        m = md(padded, torch.tensor([-1.0, -1, -1]), torch.tensor([2.0, 2, 2]))
        mesh = trimesh.Trimesh(m.verts.numpy(), m.faces.numpy())
        assert mesh.is_watertight and mesh.is_winding_consistent and mesh.volume > 0


def test_shap_e_conditioning_reaches_the_prior():
    """The projected state is what the prior sees: two different states give different latents."""
    import torch

    from decoders.object3d import Object3DDecoder, tiny_shap_e_pipeline
    from polymodal.config import DecoderConfig

    config = DecoderConfig(cond_tokens=1, cond_dim=32)
    dec = Object3DDecoder(tiny_shap_e_pipeline(config), config, init_state="random")
    a, b = torch.randn(2, 32, generator=torch.Generator().manual_seed(1))
    lat = [dec.pipeline([x], generator=torch.Generator().manual_seed(0), num_inference_steps=2,
                        guidance_scale=1.0, output_type="latent").images for x in (a, b, 2 * a)]
    assert not torch.allclose(lat[0], lat[1])
    torch.testing.assert_close(lat[0], lat[2])  # normalised: the scale of a state does not matter
    both = dec.pipeline([a, b], generator=[torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)],
                        num_inference_steps=2, guidance_scale=1.0, output_type="latent").images
    torch.testing.assert_close(both[1:], lat[1], atol=1e-3, rtol=1e-3)  # item k of a batch = item k alone


def test_a_shap_e_folder_with_a_missing_weight_is_refused(shap_e_folder, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    from decoders import build_decoder
    from decoders.errors import DecoderLoadError

    broken = tmp_path / "broken"
    shutil.copytree(shap_e_folder, broken)
    weights = next((broken / "prior").glob("*.safetensors"))
    state = load_file(weights)
    state.pop(sorted(state)[0])
    save_file(state, weights)
    with pytest.raises(DecoderLoadError, match="prior"):
        build_decoder(OBJECT3D, _shap_e_config(broken))


def test_the_point_set_pipeline_saves_loads_strictly_and_renders_points(tmp_path):

    from decoders import build_decoder
    from polymodal.config import DecoderConfig, DecoderDefaults
    from training.toyworld.object3d import Object3DDecoderRecipe, build_point_pipeline

    recipe = Object3DDecoderRecipe(num_points=32, cond_tokens=8, cond_dim=16, width=16, num_layers=1, num_heads=2,
                                   text_layers=1)
    build_point_pipeline(recipe).save_pretrained(str(tmp_path / "pts"), safe_serialization=True)
    config = DecoderConfig(source="pretrained", path=str(tmp_path / "pts"), cond_tokens=8, cond_dim=16,
                           defaults=DecoderDefaults(num_inference_steps=3, guidance_scale=2.0))
    dec = build_decoder(OBJECT3D, config)
    embeds = dec.encode_text(["a small red cube", "a large blue torus"])
    assert embeds.shape == (2, 8, 16)
    steps = []
    out = dec.render(embeds, [5, 6], on_step=steps.append)
    assert all(m.data.shape == (32, 6) and m.data.dtype == np.float32 for m in out)
    assert steps == [0, 1, 2]
    alone = dec.render(embeds[1:], [6])[0]
    np.testing.assert_allclose(alone.data, out[1].data, rtol=1e-4, atol=1e-5)
    data, mime, ext = out[0].encode()
    assert (mime, ext) == ("application/ply", "ply") and decode_ply(data).shape == (32, 6)
    cancelled = dec.render(embeds, [1, 2], should_cancel=lambda: True)
    assert all(isinstance(e, Exception) and "cancel" in str(e) for e in cancelled)
    with pytest.raises(ValueError, match="cannot edit"):
        dec.render(embeds, [1, 2], sources=[object(), object()])
    (tmp_path / "pts" / "denoiser" / "config.json").write_text(json.dumps(
        {**json.loads((tmp_path / "pts" / "denoiser" / "config.json").read_text()), "width": 32}))
    from decoders.errors import DecoderLoadError

    with pytest.raises(DecoderLoadError, match="denoiser"):
        build_decoder(OBJECT3D, config)


# ------------------------------------------------------------------------------ the system, through the spec


@pytest.fixture(scope="module")
def preset_3d(tmp_path_factory):
    """``tiny`` plus the 3D decoder (a tiny point-set folder) and its output projector; counts from the spec."""
    from polymodal.config import DecoderConfig, DecoderDefaults, PresetConfig, ProjectorConfig
    from polymodal.presets import get_preset
    from training.toyworld.object3d import Object3DDecoderRecipe, build_point_pipeline

    folder = tmp_path_factory.mktemp("pts3d") / "object3d"
    recipe = Object3DDecoderRecipe(num_points=24, cond_tokens=4, cond_dim=16, width=16, num_layers=1, num_heads=2,
                                   text_layers=1)
    build_point_pipeline(recipe).save_pretrained(str(folder), safe_serialization=True)
    data = get_preset("tiny").model_dump()
    data["name"] = "tiny-3d"
    data["decoders"][OBJECT3D] = DecoderConfig(source="pretrained", path=str(folder), cond_tokens=4, cond_dim=16,
                                               defaults=DecoderDefaults(num_inference_steps=2, guidance_scale=1.0))
    data["output_projectors"][OBJECT3D] = ProjectorConfig(
        kind="transformer", hidden_dim=32, options={"num_layers": 1, "num_heads": 2, "ff_dim": 64})
    return PresetConfig.model_validate(data)


def test_presets_that_do_not_declare_3d_are_unchanged():
    from polymodal.presets import get_preset

    tiny = get_preset("tiny")
    assert OBJECT3D not in tiny.decoders and OBJECT3D not in tiny.signals.counts
    assert OBJECT3D not in tiny.signals.spec().tokens
    assert list(tiny.signals.counts) == [Modality.IMAGE, Modality.AUDIO, Modality.VIDEO]


def test_a_preset_without_signal_counts_gets_3d_tokens_only_when_it_decodes_3d(preset_3d):
    from polymodal.config import PresetConfig, SignalConfig

    # a user's YAML preset written before 3D existed (no signals.counts) keeps its token rows
    assert list(SignalConfig().counts) == [Modality.IMAGE, Modality.AUDIO, Modality.VIDEO]
    data = preset_3d.model_dump(mode="json")
    data["signals"].pop("counts")
    decoding = PresetConfig.model_validate(data)
    assert decoding.signals.counts[OBJECT3D] == OBJECT3D.spec.default_signal_count
    assert list(decoding.signals.counts)[-1] is OBJECT3D  # appended: the listed modalities keep their order
    data["decoders"].pop("object3d")
    assert OBJECT3D not in PresetConfig.model_validate(data).signals.counts


def test_the_answer_carries_3d_in_its_arrays_parts_and_out_files(preset_3d, tmp_path):
    from fastapi.testclient import TestClient

    from polymodal.pipeline import AnyToAnyPipeline
    from services.ingress import build_app
    from services.local import LocalBackend

    assert preset_3d.signals.counts[OBJECT3D] == 4
    pipe = AnyToAnyPipeline.from_preset(preset_3d)
    answer = pipe.generate("make a red cube", modalities=[OBJECT3D], seed=0)
    media = [p for p in answer.media if getattr(p, "modality", None) is OBJECT3D]
    assert len(media) == 1 and media[0].data.shape == (24, 6)

    backend = LocalBackend.from_preset(preset_3d)
    with TestClient(build_app(backend)) as client:
        assert "object3d" in client.get("/v1/models").json()["data"][0]["output_modalities"]
        body = {"model": "tiny-3d", "seed": 0, "modalities": ["text", "object3d"],
                "messages": [{"role": "user", "content": "make a red cube"}]}
        r = client.post("/v1/chat/completions", json=body)
        assert r.status_code == 200, r.text
        msg = r.json()["choices"][0]["message"]
        assert isinstance(msg["content"], str) and "[object3d 1](" in msg["content"]
        items = msg["objects3d"]
        assert len(items) == 1
        url = items[0]["object3d_url"]["url"] if "object3d_url" in items[0] else items[0]["url"]
        got = client.get(url) if not url.startswith("data:") else None
        data = got.content if got is not None else None
        assert got is None or got.status_code == 200
        if data is not None:
            assert got.headers["content-type"].startswith("application/ply")
            np.testing.assert_allclose(decode_ply(data)[:, :3], media[0].data[:, :3], rtol=1e-4, atol=1e-4)
        with client.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as s:
            text = "".join(s.iter_text())
        assert '"objects3d"' in text and "[DONE]" in text
        # the answer sent back (as LangChain keeps it: content; as the openai SDK does: with its arrays): the model
        # does not read 3D, so the medium stays its reference text, and the next turn is answered
        history = [body["messages"][0], {"role": "assistant", "content": msg["content"]},
                   {"role": "user", "content": "and a blue one"}]
        with_arrays = [history[0], {"role": "assistant", "content": msg["content"], "objects3d": items}, history[2]]
        for messages in (history, with_arrays):
            again = client.post("/v1/chat/completions", json={**body, "messages": messages})
            assert again.status_code == 200, again.text
        from services.ingress.history import AssistantTurn  # what the model reads of that turn

        turn = AssistantTurn(type("Reader", (), {"backend": backend})(), "messages[1]", 4)
        assert OBJECT3D not in backend.input_modalities
        assert turn._written_only("application/ply") is OBJECT3D and turn._written_only("image/png") is None
        # an unknown artifact id is still a 400, never taken as text
        import re

        forged = re.sub(r"art_[A-Za-z0-9_-]+", "art_unknown0000000000000", msg["content"])
        assert forged != msg["content"]
        bad = client.post("/v1/chat/completions", json={**body, "messages": [
            history[0], {"role": "assistant", "content": forged}, history[2]]})
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "messages[1].content", bad.text

    from polymodal.cli import write_answer

    out = tmp_path / "out"  # what `polymodal generate --out` writes
    write_answer(answer, out, [], preset_3d.name)
    entry = next(p for p in json.loads((out / "manifest.json").read_text())["parts"] if p.get("type") == "object3d")
    assert entry["mime"] == "application/ply" and entry["shape"] == [24, 6] and entry["file"].endswith(".ply")
    np.testing.assert_allclose(decode_ply((out / entry["file"]).read_bytes())[:, :3], media[0].data[:, :3])


# ------------------------------------------------------------------------------- artifact names follow the type


def test_a_codec_names_each_type_it_writes():
    from polymodal.modality import Modality

    codec = OBJECT3D.spec.codec
    assert (codec.extension(GLB_MIME), codec.extension("application/ply")) == ("glb", "ply")
    assert Modality.IMAGE.spec.codec.extension("image/png") == "png"
    with pytest.raises(ValueError, match="choose from: application/ply, model/gltf-binary"):
        codec.extension("image/png")


def test_each_3d_pipeline_says_which_files_it_writes(shap_e_folder, preset_3d):
    from decoders import build_decoder

    assert build_decoder(OBJECT3D, _shap_e_config(shap_e_folder)).output_mime_type == GLB_MIME
    assert build_decoder(OBJECT3D, preset_3d.decoders[OBJECT3D]).output_mime_type == "application/ply"


class _MeshStage:
    """A 3D decoder stage whose decoder writes meshes (as Shap-E's): one small tetrahedron per item."""

    modality = OBJECT3D

    def __init__(self, defaults):
        self.defaults = defaults
        self.decoder = type("MeshDecoder", (), {"output_mime_type": GLB_MIME})()
        self.init_state = "random"

    def render(self, groups, seeds, options=None, should_cancel=None, on_step=None, sources=None):
        from decoders.media import Medium

        v = np.array([[0, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1]], np.float32)
        f = np.array([[0, 2, 1], [0, 1, 3], [0, 3, 2], [1, 2, 3]], np.int32)
        mesh = Mesh3D(v, f, np.full((4, 3), 200, np.uint8))
        return [Medium(OBJECT3D, mesh, s) for s in seeds]


def test_a_mesh_artifact_link_ends_glb_also_when_streamed(preset_3d):
    """The link of a medium is written before it is rendered (streamed answers): its extension follows the type
    the backend's decoder writes (GLB for a Shap-E mesh), not the codec's first (PLY)."""
    from fastapi.testclient import TestClient

    from services.ingress import build_app
    from services.local import LocalBackend
    from tests.serve_fakes import FakeLLMStage

    backend = LocalBackend(preset_3d, FakeLLMStage(), {OBJECT3D: _MeshStage(preset_3d.decoders[OBJECT3D].defaults)})
    assert backend.output_mime_type(OBJECT3D) == GLB_MIME
    body = {"model": "tiny-3d", "seed": 0, "modalities": ["text", "object3d"], "media_format": "url",
            "messages": [{"role": "user", "content": "make a red cube"}]}
    with TestClient(build_app(backend)) as client:
        r = client.post("/v1/chat/completions", json=body)
        assert r.status_code == 200, r.text
        msg = r.json()["choices"][0]["message"]
        url = msg["objects3d"][0]["object3d_url"]["url"]
        assert url.endswith(".glb") and f"({url})" in msg["content"]
        got = client.get(url)
        assert got.status_code == 200 and got.headers["content-type"].startswith(GLB_MIME)
        assert decode_glb(got.content).faces.shape == (4, 3)
        with client.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as s:
            text = "".join(s.iter_text())
        links = re.findall(r"/v1/artifacts/[A-Za-z0-9_-]+\.(\w+)", text)
        assert links and set(links) == {"glb"}, links  # the reference in the content and the array item
