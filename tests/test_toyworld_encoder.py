"""Toy image encoder (a tiny CLIPModel trained from scratch): the saved folder loads through the product's
``clip`` encoder unchanged, its text tower pools the end of each caption, training is deterministic and cached
by config hash, the probe measure works, and the CLI command. The trained probe figures live in
``bench/toyworld_encoder.py`` (a scaled-down run here learns nothing worth asserting)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from polymodal.config import EncoderConfig
from polymodal.encoders import build_encoder
from polymodal.modality import Modality
from training.toyworld.data import make_item, write_dataset
from training.toyworld.encoder import (
    MANIFEST,
    ImageEncoderRecipe,
    build_clip_model,
    clip_tokenizer,
    encoder_config,
    linear_probe_accuracy,
    train_encoders,
)

STEP_SCALE = 0.003  # 3 steps of the default recipe


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("toyenc-data")
    write_dataset(out, count=40, seed=3, modalities=["image"], size_px=64)
    return out


@pytest.fixture(scope="module")
def trained(tmp_path_factory, data_dir):
    out = tmp_path_factory.mktemp("toyenc")
    manifest = train_encoders(data_dir, out, step_scale=STEP_SCALE, progress=False)
    return out, manifest


def _images(n: int, seed: int = 9) -> list[np.ndarray]:
    return [make_item("image", i, seed=seed, size_px=64).data for i in range(n)]


def test_trained_folder_loads_as_clip_encoder(trained):
    from transformers import CLIPImageProcessorPil, CLIPModel

    out, manifest = trained
    entry = manifest["encoders"]["image"]
    assert entry["kind"] == "clip" and entry["dim"] == ImageEncoderRecipe().projection_dim
    assert entry["figures"]["num_items"] == 40 and np.isfinite(entry["figures"]["loss"])
    cfg = encoder_config(out)
    assert cfg == EncoderConfig(kind="clip", path=str((out / "image").resolve()), dim=entry["dim"])
    enc = build_encoder(Modality.IMAGE, cfg)
    assert enc.init_state == "pretrained"
    images = _images(5)
    emb = enc.encode(images)
    assert emb.shape == (5, cfg.dim) and torch.isfinite(emb).all()
    # the same numbers as the saved two-tower model's image features, through the saved processor
    model = CLIPModel.from_pretrained(cfg.path).eval()
    processor = CLIPImageProcessorPil.from_pretrained(cfg.path)
    pixels = processor(images=images, return_tensors="pt")["pixel_values"]
    assert pixels.shape == (5, 3, 32, 32) and -1.0 <= float(pixels.min()) and float(pixels.max()) <= 1.0
    with torch.no_grad():
        torch.testing.assert_close(emb, model.get_image_features(pixel_values=pixels).pooler_output,
                                   rtol=1e-4, atol=1e-5)
    assert torch.cdist(emb, emb)[~torch.eye(5, dtype=torch.bool)].min() > 1e-3  # distinct images, distinct vectors
    # video frames go through the same image path
    video = build_encoder(Modality.VIDEO, cfg)
    torch.testing.assert_close(video.encode([np.stack(images[:2])])[0], emb[:2].mean(0), rtol=1e-4, atol=1e-5)
    # the folder ships in the package: small
    size_mb = sum(f.stat().st_size for f in (out / "image").iterdir()) / 2**20
    assert size_mb < 2.0, size_mb


def test_text_tower_pools_the_end_of_each_caption(trained):
    """CLIPTextModel pools at the first eos_token_id: the decoders' toy tokenizer starts every text with it, so the
    encoder's tokenizer must not (else every caption gets the embedding of position 0)."""
    from transformers import AutoTokenizer, CLIPModel

    out, _ = trained
    tok = AutoTokenizer.from_pretrained(out / "image")
    ids = tok("A picture of a yellow triangle").input_ids
    assert tok.convert_ids_to_tokens(ids) == ["a", "picture", "of", "a", "yellow", "triangle", tok.eos_token]
    assert ids == clip_tokenizer(16)("a picture of a yellow triangle").input_ids
    model = CLIPModel.from_pretrained(out / "image").eval()
    assert model.config.text_config.eos_token_id == tok.eos_token_id
    batch = tok(["a red circle", "a blue square", "a red circle"], padding="max_length", return_tensors="pt")
    with torch.no_grad():
        emb = model.get_text_features(**batch).pooler_output
    assert not torch.allclose(emb[0], emb[1], atol=1e-4)
    torch.testing.assert_close(emb[0], emb[2])


def test_training_is_deterministic_and_cached(trained, data_dir, tmp_path, monkeypatch):
    from safetensors.torch import load_file

    from training.toyworld import encoder as toy_encoder

    out, manifest = trained
    weights = out / "image" / "model.safetensors"
    # same seed, same data, another folder: the same weights
    other = train_encoders(data_dir, tmp_path / "a", step_scale=STEP_SCALE, progress=False)
    assert other["encoders"]["image"]["config_hash"] == manifest["encoders"]["image"]["config_hash"]
    assert (tmp_path / "a" / "image" / "model.safetensors").read_bytes() == weights.read_bytes()
    # another seed: other weights
    seeded = train_encoders(data_dir, tmp_path / "b", step_scale=STEP_SCALE, progress=False,
                            recipe=ImageEncoderRecipe(seed=1))
    assert seeded["encoders"]["image"]["config_hash"] != manifest["encoders"]["image"]["config_hash"]
    w0, w1 = load_file(weights), load_file(tmp_path / "b" / "image" / "model.safetensors")
    assert not torch.equal(w0["visual_projection.weight"], w1["visual_projection.weight"])

    # up to date: no training at all; --force and a changed recipe retrain
    calls = []

    def fake_train(rows, recipe, folder, progress=True):
        calls.append(recipe)
        return {"fake": True}

    monkeypatch.setattr(toy_encoder, "train_image_encoder", fake_train)
    again = train_encoders(data_dir, out, step_scale=STEP_SCALE, progress=False)
    assert calls == [] and again == json.loads((out / MANIFEST).read_text()) == manifest
    train_encoders(data_dir, tmp_path / "a", step_scale=STEP_SCALE, force=True, progress=False)
    assert len(calls) == 1 and calls[0].steps == 3
    changed = train_encoders(data_dir, tmp_path / "a", step_scale=2 * STEP_SCALE, progress=False)
    assert len(calls) == 2 and calls[1].steps == 6
    assert changed["encoders"]["image"]["figures"] == {"fake": True}
    # a deleted folder is retrained even when the hash matches
    (tmp_path / "b" / "image" / "model.safetensors").unlink()
    train_encoders(data_dir, tmp_path / "b", step_scale=STEP_SCALE, progress=False, recipe=ImageEncoderRecipe(seed=1))
    assert len(calls) == 3


def test_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="catalog.jsonl"):
        train_encoders(tmp_path, tmp_path / "o", progress=False)
    write_dataset(tmp_path / "audio-only", count=2, modalities=["audio"])
    with pytest.raises(ValueError, match="no image items"):
        train_encoders(tmp_path / "audio-only", tmp_path / "o", progress=False)
    with pytest.raises(FileNotFoundError, match="train-encoder"):
        encoder_config(tmp_path)
    with pytest.raises(ValueError, match="patch_px"):
        build_clip_model(ImageEncoderRecipe(patch_px=5), clip_tokenizer(16))
    with pytest.raises(ValueError, match="step_scale"):
        train_encoders(tmp_path / "audio-only", tmp_path / "o", step_scale=0.0, progress=False)


def test_linear_probe_reads_a_linear_label_and_not_noise():
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 3, (400,), generator=g)
    centres = torch.randn(3, 16, generator=g) * 3
    x = centres[y] + torch.randn(400, 16, generator=g)
    assert linear_probe_accuracy(x[:200], y[:200], x[200:], y[200:]) > 0.95
    noise = torch.randn(400, 16, generator=g)
    assert linear_probe_accuracy(noise[:200], y[:200], noise[200:], y[200:]) < 0.55


def test_cli_train_encoder(tmp_path, data_dir):
    from typer.testing import CliRunner

    from training.toyworld.cli import app

    runner = CliRunner()
    res = runner.invoke(app, ["train-encoder", "--data", str(data_dir), "--out", str(tmp_path), "--step-scale",
                              str(STEP_SCALE / 3)])
    assert res.exit_code == 0, res.output
    assert "image:" in res.output and "kind clip, dim 64" in res.output
    assert (tmp_path / MANIFEST).is_file() and (tmp_path / "image" / "model.safetensors").is_file()
    res = runner.invoke(app, ["train-encoder", "--data", str(data_dir), "--out", str(tmp_path), "--step-scale",
                              str(STEP_SCALE / 3)])
    assert res.exit_code == 0 and "up to date" in res.output, res.output
    res = runner.invoke(app, ["train-encoder", "--data", str(tmp_path / "none"), "--out", str(tmp_path)])
    assert res.exit_code == 2 and "catalog.jsonl" in res.output


def test_bench_script_quick(tmp_path):
    """``bench/toyworld_encoder.py --quick`` runs end to end and reports both encoders (figures not asserted)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "bench.json"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.run([sys.executable, str(root / "bench" / "toyworld_encoder.py"), "--quick", "--out", str(out)],
                          cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads(out.read_text())
    assert [r["encoder"] for r in data["probes"]] == ["trained clip", "random tiny (256)"]
    assert [r["dim"] for r in data["probes"]] == [64, 256]
    for r in data["probes"]:
        assert 0.0 <= r["colour_probe"] <= 1.0 and 0.0 <= r["shape_probe"] <= 1.0
    assert 0.0 <= data["retrieval_top1"] <= 1.0 and 0 < data["folder_mb"] < 2.0 and data["quick"]
    assert "colour probe" in proc.stdout and "retrieval top-1" in proc.stdout
