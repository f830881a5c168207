"""The toy world's 3D part (issue #29): the procedural point clouds, their non-learned checker (>= 98% on generated
clouds, near chance on noise), the toy 3D decoder's training (a few steps: cached, resumable) and the ``toy-3d``
preset over a build folder."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from polymodal.media.object3d import OBJECT3D
from training.toyworld.data import COLOURS
from training.toyworld.object3d import (
    SHAPES_3D,
    SIZES,
    Object3DDecoderRecipe,
    check_object3d,
    make_cloud,
    make_item,
    object3d_tokenizer,
    train_object3d_decoder,
)

pytestmark = pytest.mark.timeout(600)
CHANCE = 1 / (len(SHAPES_3D) * len(COLOURS))
TINY = Object3DDecoderRecipe(num_items=40, num_points=32, cond_tokens=8, cond_dim=16, text_layers=1, width=16,
                             num_layers=1, num_heads=2, steps=6, batch_size=4, checkpoint_every=2,
                             num_inference_steps=2, guidance_scale=2.0)


def test_the_generator_is_deterministic_and_covers_every_attribute():
    a, b = make_item(7, seed=0), make_item(7, seed=0)
    np.testing.assert_array_equal(a.points, b.points)
    assert a.caption == b.caption and a.points.shape == (256, 6) and a.points.dtype == np.float32
    items = [make_item(i) for i in range(300)]
    assert {it.attributes["shape"] for it in items} == set(SHAPES_3D)
    assert {it.attributes["colour"] for it in items} == set(COLOURS)
    assert {it.attributes["size"] for it in items} == set(SIZES)
    assert all(it.attributes["colour"] in it.caption and it.attributes["shape"] in it.caption for it in items)
    rng = np.random.default_rng(0)
    big, small = make_cloud("cube", "red", "large", rng), make_cloud("cube", "red", "small", rng)
    assert np.abs(big[:, :3]).max() > 0.85 and np.abs(small[:, :3]).max() < 0.6
    with pytest.raises(ValueError, match="choose from: sphere"):
        make_cloud("cone", "red", "large", rng)
    ids = object3d_tokenizer(16)(items[0].caption).input_ids
    assert object3d_tokenizer(16).unk_token_id not in ids  # every caption word is in the vocabulary


def test_the_checker_reads_generated_clouds():
    n = 600
    items = [make_item(i, seed=3) for i in range(n)]
    readings = [check_object3d(it.points) for it in items]
    correct = sum(r.shape == it.attributes["shape"] and r.colour == it.attributes["colour"]
                  for r, it in zip(readings, items))
    assert correct / n >= 0.98, correct / n
    sizes = sum(r.size == it.attributes["size"] for r, it in zip(readings, items))
    assert sizes / n >= 0.98
    # a shuffled order of the points reads the same (a set)
    perm = np.random.default_rng(0).permutation(256)
    assert check_object3d(items[0].points[perm]) == readings[0]


def test_the_checker_is_near_chance_on_noise():
    rng = np.random.default_rng(0)
    n = 400
    hits = 0
    for k in range(n):
        asked = make_item(k, seed=9).attributes
        kind = k % 3
        if kind == 0:  # uniform in a cube, random colours
            pts = np.concatenate([rng.uniform(-1, 1, (256, 3)), rng.uniform(0, 1, (256, 3))], 1)
        elif kind == 1:  # a Gaussian blob of one palette colour (drawn independently of what was asked)
            colour = list(COLOURS)[rng.integers(len(COLOURS))]
            pts = np.concatenate([rng.normal(0, 0.4, (256, 3)), np.tile(np.asarray(COLOURS[colour]) / 255, (256, 1))],
                                 1)
        else:  # another item's cloud with its coordinates shuffled per axis (the marginals kept, the shape gone)
            p = make_item(10_000 + k, seed=9).points.copy()
            for a in range(3):
                p[:, a] = rng.permutation(p[:, a])
            pts = p
        r = check_object3d(pts.astype(np.float32))
        hits += int(r.shape == asked["shape"] and r.colour == asked["colour"])
    sd = math.sqrt(CHANCE * (1 - CHANCE) / n)
    assert hits / n <= CHANCE + 3 * sd, hits / n
    with pytest.raises(ValueError, match="P, 6"):
        check_object3d(np.zeros((10, 3)))


def test_the_3d_checker_is_registered_with_a_ply_reader():
    from decoders.media import Medium
    from training.toyworld.checkers import check, check_bytes, matches

    it = make_item(1)
    data, _, _ = Medium(OBJECT3D, it.points, seed=0).encode()
    reading = check_bytes(OBJECT3D, data)
    assert reading == check(OBJECT3D, it.points) or (reading.shape, reading.colour) == (
        it.attributes["shape"], it.attributes["colour"])
    assert matches(reading, {"shape": it.attributes["shape"], "colour": it.attributes["colour"]})


def test_training_is_cached_and_resumable(tmp_path):
    out = tmp_path / "decoders"
    part = train_object3d_decoder(out, TINY, progress=False, stop_after=3)
    assert part == {"partial": 3}
    ckpt = out / "object3d.partial" / "checkpoint.pt"
    assert ckpt.is_file() and not (out / "object3d").exists()
    entry = train_object3d_decoder(out, TINY, progress=False)  # resumes at 3, ends at 6
    assert entry["figures"]["steps"] == 6 and not ckpt.exists()
    manifest = json.loads((out / "toyworld-decoders.json").read_text())
    assert manifest["decoders"]["object3d"]["config_hash"] == TINY.config_hash()
    # resuming gave the same weights as one uninterrupted run
    straight = tmp_path / "straight"
    train_object3d_decoder(straight, TINY, progress=False)
    from safetensors.torch import load_file

    a = load_file(next((out / "object3d" / "denoiser").glob("*.safetensors")))
    b = load_file(next((straight / "object3d" / "denoiser").glob("*.safetensors")))
    assert a.keys() == b.keys() and all(np.allclose(a[k].numpy(), b[k].numpy(), atol=1e-6) for k in a)
    assert {str(v.dtype) for v in a.values()} == {"torch.float16"}  # stored at half the size
    # cached: a second call returns the entry without training (the folder's mtime is kept)
    stamp = (out / "object3d" / "model_index.json").stat().st_mtime_ns
    assert train_object3d_decoder(out, TINY, progress=False) == entry
    assert (out / "object3d" / "model_index.json").stat().st_mtime_ns == stamp
    # generation fields are not in the hash; trained ones are
    assert TINY.config_hash() == Object3DDecoderRecipe(**{**TINY.__dict__, "guidance_scale": 9.0}).config_hash()
    assert TINY.config_hash() != TINY.scaled(2.0).config_hash()

    from decoders import build_decoder
    from polymodal.presets.toy import decoder_config

    config = decoder_config(out, OBJECT3D)
    dec = build_decoder(OBJECT3D, config)
    assert dec.pipeline.denoiser.dtype == torch.float32  # loaded at the decoder's dtype, computed as trained
    media = dec.render(dec.encode_text(["a large red torus"]), [0])
    assert media[0].data.shape == (32, 6)
    # the decoder's own score, per attribute, at other generation settings than its defaults
    from training.toyworld.object3d import score_object3d_decoder

    score = score_object3d_decoder(out, count=6, steps=2, guidance_scale=1.0)
    assert score["n"] == 6 and score["accuracy"] <= min(score["shape_accuracy"], score["colour_accuracy"])
    assert sum(score["shape_errors"].values()) == round(6 * (1 - score["shape_accuracy"]))


def test_the_recipe_chooses_the_beta_schedule():
    import dataclasses

    from training.toyworld.object3d import build_point_pipeline

    cosine = dataclasses.replace(TINY, beta_schedule="squaredcos_cap_v2")
    linear = dataclasses.replace(TINY, beta_schedule="linear")
    assert cosine.config_hash() != linear.config_hash()  # a trained field
    assert build_point_pipeline(cosine).scheduler.config.beta_schedule == "squaredcos_cap_v2"
    assert build_point_pipeline(linear).scheduler.config.beta_schedule == "linear"


def _fake_toy_root(tmp_path: Path) -> Path:
    """A toy build folder whose decoders are the shipped toy's manifest (folders linked) plus a tiny 3D decoder."""
    from polymodal.presets.toy import ASSETS

    shipped = ASSETS / "decoders"
    if not (shipped / "toyworld-decoders.json").is_file():
        pytest.skip("no shipped toy build")
    root = tmp_path / "toy"
    (root / "decoders").mkdir(parents=True)
    for m in ("image", "audio", "video"):
        if (shipped / m).is_dir():
            (root / "decoders" / m).symlink_to(shipped / m)
    shutil.copy(shipped / "toyworld-decoders.json", root / "decoders" / "toyworld-decoders.json")
    return root


def test_the_toy_3d_preset_appends_3d_to_toy(tmp_path):
    from polymodal.config import PresetConfig
    from polymodal.modality import Modality
    from polymodal.presets.toy import toy_3d_preset, toy_preset

    root, root_3d = _fake_toy_root(tmp_path), tmp_path / "toy-3d"
    with pytest.raises(FileNotFoundError, match="polymodal toyworld train-3d"):
        toy_3d_preset(root, root_3d=root_3d)
    train_object3d_decoder(root / "decoders", TINY, progress=False)  # into toy's folder: not where toy-3d looks
    with pytest.raises(FileNotFoundError, match=f"train-3d --out {root_3d / 'decoders'}"):
        toy_3d_preset(root, root_3d=root_3d)
    train_object3d_decoder(root_3d / "decoders", TINY, progress=False)
    toy, toy3d = toy_preset(root), toy_3d_preset(root, root_3d=root_3d)
    assert toy3d.name == "toy-3d" and OBJECT3D not in toy.decoders  # toy is unchanged
    assert list(toy3d.signals.counts) == [Modality.IMAGE, Modality.AUDIO, Modality.VIDEO, OBJECT3D]
    spec, base = toy3d.signals.spec(), toy.signals.spec()
    assert spec.tokens[OBJECT3D] == ("<3D0>", "<3D1>", "<3D2>", "<3D3>")
    assert all(spec.tokens[m] == base.tokens[m] for m in base.tokens)  # toy's rows first, in toy's order
    dec = toy3d.decoders[OBJECT3D]
    assert dec.source == "pretrained" and (dec.cond_tokens, dec.cond_dim) == (TINY.cond_tokens, TINY.cond_dim)
    assert OBJECT3D in toy3d.output_projectors and toy3d.export_dir is None  # no ROOT3D/export yet
    assert PresetConfig.from_yaml(toy3d.to_yaml()) == toy3d


def _size_mb(folder: Path) -> float:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) / 2**20 if folder.is_dir() else 0.0


def test_the_toy_3d_build_is_its_own_folder_with_its_own_size_budget(tmp_path, monkeypatch):
    """The toy build (polymodal/assets/toy) is near the 10 MB of test_toy_preset: the 3D decoder (~3.2 MB) and the
    toy-3d export go to polymodal/assets/toy-3d, checked here; asked for untrained, toy-3d names the command."""
    from polymodal.presets import get_preset
    from polymodal.presets.toy import ASSETS, ASSETS_3D, toy_3d_root

    assert ASSETS_3D.parent == ASSETS.parent and ASSETS_3D != ASSETS
    assert not (ASSETS / "decoders" / OBJECT3D.value).exists()  # nothing of 3D in the toy build
    assert _size_mb(ASSETS_3D / "decoders") < 4 and _size_mb(ASSETS_3D / "export") < 4
    assert _size_mb(ASSETS_3D) < 8
    monkeypatch.delenv("POLYMODAL_TOY_3D_DIR", raising=False)
    assert toy_3d_root() == ASSETS_3D
    if not (ASSETS_3D / "decoders" / OBJECT3D.value / "model_index.json").is_file():
        with pytest.raises(FileNotFoundError, match=f"polymodal toyworld train-3d --out {ASSETS_3D / 'decoders'}"):
            get_preset("toy-3d")
    monkeypatch.setenv("POLYMODAL_TOY_3D_DIR", str(tmp_path / "elsewhere"))
    assert toy_3d_root() == tmp_path / "elsewhere"
    with pytest.raises(FileNotFoundError, match="train-3d --out " + str(tmp_path / "elsewhere" / "decoders")):
        get_preset("toy-3d")
