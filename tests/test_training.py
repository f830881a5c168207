"""Alignment training on the tiny preset with a tiny real dataset (photos from scikit-image, captions
written for them).

The captions follow one pattern, "<colour> <thing> <place>", four per photo, so that each held-out
caption recombines words seen in training: a random tiny LLM knows no language, so it can only carry over
what the training captions taught it.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from polymodal.modality import Modality
from training.align import (
    MissingMediaError,
    TrainConfig,
    TrainError,
    load_parts,
    read_metrics,
    train,
)
from training.align.config import DataSource

IMAGE = Modality.IMAGE

# photo -> (thing, colours, places); captions are "<colour> <thing> <place>"
PHOTOS = {
    "astronaut": ("astronaut", ["white", "happy"], ["by the flag", "in the suit"]),
    "camera": ("man", ["black", "old"], ["with the camera", "in the field"]),
    "chelsea": ("cat", ["orange", "small"], ["on the floor", "by the wall"]),
    "coffee": ("cup", ["red", "white"], ["on the table", "of coffee"]),
    "rocket": ("rocket", ["white", "big"], ["in the sky", "by the sea"]),
    "horse": ("horse", ["black", "small"], ["on the floor", "in the field"]),
    "moon": ("moon", ["grey", "white"], ["in the sky", "at night"]),
    "coins": ("coins", ["old", "small"], ["on the table", "in rows"]),
    "clock": ("clock", ["white", "old"], ["on the wall", "in the house"]),
    "brick": ("wall", ["red", "old"], ["of the house", "in the city"]),
    "grass": ("grass", ["green", "long"], ["in the field", "by the river"]),
    "hubble_deep_field": ("stars", ["blue", "small"], ["in the sky", "at night"]),
    "stereo_motorcycle": ("motorbike", ["red", "big"], ["in the house", "on the street"]),
}
CAPTIONS = [(p, f"{c} {t} {pl}") for p, (t, cs, pls) in PHOTOS.items() for c in cs for pl in pls]
# one held-out caption per photo, each a new combination of a seen colour and a seen thing
HELD_OUT = [i for i in range(len(CAPTIONS)) if i % 4 == (i // 4) % 4]
TRAIN = [i for i in range(len(CAPTIONS)) if i not in HELD_OUT]


def _photo(name: str, size_px: int = 48) -> np.ndarray:
    import skimage.data
    from PIL import Image
    from skimage.util import img_as_ubyte

    arr = getattr(skimage.data, name)()
    if name == "stereo_motorcycle":
        arr = arr[0]
    arr = img_as_ubyte(arr)
    arr = arr[..., :3] if arr.ndim == 3 else np.repeat(arr[..., None], 3, 2)
    return np.array(Image.fromarray(arr).resize((size_px, size_px), Image.BILINEAR))


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    from PIL import Image

    d = tmp_path_factory.mktemp("training-data")
    (d / "images").mkdir()
    for name in PHOTOS:
        Image.fromarray(_photo(name)).save(d / "images" / f"{name}.png")
    rows = [{"path": f"images/{CAPTIONS[i][0]}.png", "caption": CAPTIONS[i][1], "modality": "image"} for i in TRAIN]
    (d / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    # MosIT records (as `polymodal mosit build` writes them): a photo in, a photo out
    recs = []
    for k in range(0, len(TRAIN) - 1, 2):
        (pin, cin), (pout, cout) = CAPTIONS[TRAIN[k]], CAPTIONS[TRAIN[k + 1]]
        recs.append({
            "image_list": [{"name": f"{pin}.png", "data_source": "skimage", "caption": cin},
                           {"name": f"{pout}.png", "data_source": "skimage", "caption": cout}],
            "audio_list": [], "video_list": [],
            "conversation": [
                {"from": "human", "value": f"What is this? <Image>{pin}.png</Image>"},
                {"from": "gpt", "value": f"It is a {cin}."},
                {"from": "human", "value": f"Now show me a {cout}."},
                {"from": "gpt", "value": f"Here it is. <Image>{pout}.png</Image>"},
            ],
        })
    (d / "mosit.json").write_text(json.dumps(recs, indent=1))
    return d


@pytest.fixture(scope="module")
def parts():
    return load_parts("tiny", output_modalities=[IMAGE])


def _config(data_dir: Path, out: Path, **kw) -> TrainConfig:
    base = {"stage": "decode", "data": [DataSource(path=str(data_dir / "train.jsonl"))], "out_dir": str(out),
            "progress": False, "tensorboard": False, "log_every": 1}
    return TrainConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def aligned(parts, data_dir, tmp_path_factory):
    """Decoding alignment: output projector + LM-head signal rows, LLM frozen (its states cached)."""
    out = tmp_path_factory.mktemp("decode-run")
    cfg = _config(data_dir, out, max_steps=400, batch_size=len(TRAIN), lr=1e-2, token_rows="output", log_every=50)
    return train(cfg, parts.fresh_copy())


@pytest.fixture(scope="module")
def exported_pipe(aligned):
    from polymodal.pipeline import AnyToAnyPipeline

    return AnyToAnyPipeline.from_preset("tiny", export_dir=str(aligned.export_dir))


def _states(llm_stage, captions):
    """Signal groups exactly as inference makes them: the caption as the user's message, the image group
    forced right after the assistant prefix."""
    from polymodal.types import TextPart, Turn

    groups = []
    for c in captions:
        r = llm_stage.generate([Turn("user", (TextPart(c),))], modalities=[IMAGE], max_new_tokens=0, seed=0)
        groups.append(r.groups[0])
    return groups


def _retrieval(llm_stage, decoder_stage, captions, train_targets):
    """(top-1 rate, mean-baseline distance / our distance) of projector outputs on ``captions``."""
    with torch.no_grad():
        pred = decoder_stage.project(_states(llm_stage, captions)).float()  # (B, Q, D_cond)
        target = decoder_stage.decoder.encode_text(list(captions)).float()
    dist = torch.stack([torch.linalg.vector_norm(p[None] - target, dim=-1).mean(-1) for p in pred])  # (B, B)
    top1 = (dist.argmin(1) == torch.arange(len(captions))).float().mean().item()
    mean = train_targets.float().mean(0)
    baseline = torch.linalg.vector_norm(mean[None] - target, dim=-1).mean(-1).mean().item()
    return top1, baseline / dist.diag().mean().item()


def test_decoding_alignment_generalises_to_held_out_captions(aligned, exported_pipe, parts):
    held = [CAPTIONS[i][1] for i in HELD_OUT]
    chance = 1 / len(held)  # 13 held-out captions: 7.7%
    targets = aligned.model.targets[IMAGE]  # the training captions' targets
    top1, factor = _retrieval(exported_pipe.llm_stage, exported_pipe.decoder_stages[IMAGE], held, targets)
    # the model as it was before training, through the same path
    top1_0, factor_0 = _retrieval(parts.llm, parts.decoders[IMAGE], held, targets)
    print(f"held-out top-1 {top1:.2f} (untrained {top1_0:.2f}, chance {chance:.2f}); "
          f"mean-baseline distance / ours {factor:.2f} (untrained {factor_0:.2f})")
    assert top1 >= 0.5, f"top-1 {top1:.2f} on held-out captions; chance is {chance:.2f}"
    assert factor >= 1.25, f"distance only {factor:.2f}x better than always predicting the mean target"
    assert top1_0 < 0.3 and factor_0 < 1.0
    rows = read_metrics(aligned.out_dir)
    assert rows[-1]["mse"] < 0.5 * rows[0]["mse"]
    assert rows[-1]["ce"] < rows[0]["ce"]  # the LM-head signal rows learned to predict the group
    assert aligned.cached_states and aligned.completed


def test_export_round_trips_into_the_pipeline(aligned, exported_pipe, parts):
    from polymodal.export import read_manifest

    manifest = read_manifest(aligned.export_dir)
    assert set(manifest["parts"]) == {"output_image", "token_rows"} and manifest["stage"] == "decode"
    trained = aligned.model.output_projectors["image"].state_dict()
    loaded = exported_pipe.decoder_stages[IMAGE].projector.state_dict()
    assert trained.keys() == loaded.keys() and all(torch.equal(trained[k], loaded[k]) for k in trained)
    assert exported_pipe.decoder_stages[IMAGE].init_state == "random"  # the tiny decoder stays random
    assert exported_pipe.decoder_stages[IMAGE].projector_state == "pretrained"
    engine = exported_pipe.llm_stage.engine
    ids = engine.signal_ids[IMAGE]
    head = engine.model.get_output_embeddings().weight
    assert torch.equal(head[ids], aligned.model.rows.output_rows.detach().to(head.dtype))
    base_head = parts.llm.engine.model.get_output_embeddings().weight
    assert not torch.equal(head[ids], base_head[ids])
    others = [i for i in range(head.shape[0]) if i not in ids]
    assert torch.equal(head[others], base_head[others])  # the frozen vocabulary is untouched

    group = _states(exported_pipe.llm_stage, ["white cat on the table"])
    with torch.no_grad():
        out = exported_pipe.decoder_stages[IMAGE].project(group)
        hs = torch.as_tensor(group[0].hidden_states)[None]
        te = torch.as_tensor(group[0].token_embeds)[None]
        direct = aligned.model.output_projectors["image"](hs, te)
        untrained = parts.decoders[IMAGE].projector(hs, te)
    assert torch.allclose(out, direct, atol=1e-6)
    assert (out - untrained).abs().max() > 1e-2
    answer = exported_pipe.generate("white cat on the table", modalities=[IMAGE], seed=0, max_new_tokens=2)
    assert [m.modality for m in answer.media] == [IMAGE] and answer.media[0].data.shape[-1] == 3


def test_stop_and_resume_equals_an_uninterrupted_run(parts, data_dir, tmp_path):
    """Live path (token rows feed the LLM) with the noise-prediction loss (random timesteps and noise) and
    weight decay: the resumed run must restore weights, optimizer, scheduler, RNG and data position."""
    kw = {"max_steps": 6, "batch_size": 4, "lr": 5e-3, "weight_decay": 0.1, "warmup_steps": 2, "noise_weight": 0.5,
          "token_rows": "all", "checkpoint_every": 100}
    full = train(_config(data_dir, tmp_path / "full", **kw), parts.fresh_copy())
    first = train(_config(data_dir, tmp_path / "split", stop_after=3, **kw), parts.fresh_copy())
    assert not first.completed and first.step == 3 and first.export_dir is None
    with pytest.raises(TrainError, match="--resume"):
        train(_config(data_dir, tmp_path / "split", **kw), parts.fresh_copy())
    resumed = train(_config(data_dir, tmp_path / "split", resume=True, **kw), parts.fresh_copy())
    assert resumed.completed and resumed.step == 6 and not resumed.cached_states
    a, b = full.model.trainable(), resumed.model.trainable()
    assert a.keys() == b.keys() and {"rows.input_rows", "rows.output_rows"} <= set(a)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    m_full, m_split = read_metrics(tmp_path / "full"), read_metrics(tmp_path / "split")
    assert [r["step"] for r in m_split] == list(range(1, 7))
    assert [r["loss"] for r in m_full] == [r["loss"] for r in m_split]
    assert "noise" in m_full[0]
    # the rows learned in their own parameter; weight decay never reached the frozen vocabulary
    emb = full.model.engine.model.get_input_embeddings().weight
    base = parts.llm.engine.model.get_input_embeddings().weight
    ids = full.model.engine.signal_ids[IMAGE]
    others = torch.ones(emb.shape[0], dtype=torch.bool)
    others[ids] = False
    assert torch.equal(emb[others], base[others]) and not torch.equal(emb[ids], base[ids])
    groups = {g["name"]: g for g in full.optimizer.param_groups}
    assert groups["token_rows"]["weight_decay"] == 0.0 and groups["projectors"]["weight_decay"] == 0.1
    assert {id(p) for p in groups["token_rows"]["params"]} == {id(a["rows.input_rows"]), id(a["rows.output_rows"])}
    in_optimizer = {id(p) for g in groups.values() for p in g["params"]}
    assert id(full.model.engine.model.get_input_embeddings().weight) not in in_optimizer


def test_encode_stage_trains_only_the_input_projector(parts, data_dir, tmp_path):
    """Encoding alignment: the caption CE given the photo falls, through the input projector alone.

    A random frozen LLM predicts any caption about as badly (CE near ln V), so the reachable drop is small;
    it is measured on all training examples, with the trained projector against the untrained one."""
    cfg = _config(data_dir, tmp_path / "enc", stage="encode", max_steps=40, batch_size=8, lr=0.1, log_every=10)
    p = parts.fresh_copy()
    llm_before = {k: v.clone() for k, v in p.llm.engine.model.state_dict().items()}
    proj = p.llm.input_projectors[IMAGE]
    proj_before = {k: v.clone() for k, v in proj.state_dict().items()}
    res = train(cfg, p)
    assert set(res.model.trainable()) == {"input_projectors.image.fc.weight", "input_projectors.image.fc.bias",
                                          "rows.input_rows", "rows.output_rows"}
    everything = range(len(res.model.examples))
    with torch.no_grad():
        ce_trained = res.model(everything).parts["ce"].item()
        trained = {k: v.clone() for k, v in proj.state_dict().items()}
        proj.load_state_dict(proj_before)
        ce_untrained = res.model(everything).parts["ce"].item()
        proj.load_state_dict(trained)
    assert ce_trained < ce_untrained - 0.005, (ce_trained, ce_untrained)
    rows = read_metrics(tmp_path / "enc")
    assert rows[-1]["ce"] < rows[0]["ce"], rows
    after = p.llm.engine.model.state_dict()
    marker_ids = list(p.llm.engine.marker_ids[IMAGE])
    for k, v in llm_before.items():
        if "embed_tokens" in k or "lm_head" in k:  # only the marker rows changed
            keep = torch.ones(v.shape[0], dtype=torch.bool)
            keep[marker_ids] = False
            assert torch.equal(after[k][keep], v[keep]), k
        else:
            assert torch.equal(after[k], v), k
    from polymodal.export import read_manifest

    assert set(read_manifest(res.export_dir)["parts"]) == {"input_image", "token_rows"}


def test_instruct_stage_trains_a_lora_that_loads_for_inference(parts, data_dir, tmp_path):
    from polymodal.export import apply_llm_export, read_manifest

    cfg = _config(data_dir, tmp_path / "it", stage="instruct", data=[DataSource(path=str(data_dir / "mosit.json"))],
                  max_steps=8, batch_size=4, lr=1e-2, lora_r=4, lora_dropout=0.0, log_every=2)
    res = train(cfg, parts.fresh_copy())
    names = set(res.model.trainable())
    assert any("lora_A" in n for n in names) and any("lora_B" in n for n in names)
    assert {"input_projectors.image.fc.weight", "output_projectors.image.out_fc.weight"} <= names
    assert all("lora_" in n or not n.startswith("llm.") for n in names)  # the base LLM stays frozen
    rows = read_metrics(tmp_path / "it")
    assert rows[-1]["loss"] < rows[0]["loss"]
    assert set(read_manifest(res.export_dir)["parts"]) == {"input_image", "output_image", "token_rows", "lora"}
    assert (res.export_dir / "lora" / "adapter_config.json").is_file()

    # the adapter, merged into a fresh copy of the base model, gives the trained model's states
    fresh = parts.fresh_copy().llm.engine
    ids = torch.tensor([fresh.tokenizer("white cat on the table")["input_ids"]])
    with torch.no_grad():
        before = fresh.model(input_ids=ids).logits
        assert "lora" in apply_llm_export(fresh, res.export_dir)
        merged = fresh.model(input_ids=ids).logits
        res.model.llm.eval()
        trained = res.model.llm(input_ids=ids).logits
    assert (merged - before).abs().max() > 1e-4
    assert torch.allclose(merged, trained, atol=1e-4)


def test_missing_medium_names_the_row(data_dir, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"path": str(data_dir / "images" / "astronaut.png"), "caption": "a", "modality": "image"})
                   + "\n" + json.dumps({"path": "images/nowhere.png", "caption": "b", "modality": "image"}) + "\n")
    cfg = _config(data_dir, tmp_path / "x", stage="encode", data=[DataSource(path=str(bad))])
    with pytest.raises(MissingMediaError, match=r"bad.jsonl line 2: image file not found: .*nowhere.png"):
        train(cfg)


def test_cli_errors_and_help(tmp_path):
    from typer.testing import CliRunner

    from training.align.cli import app

    runner = CliRunner()
    r = runner.invoke(app, ["--help"])
    assert r.exit_code == 0 and "--stage" in r.output
    r = runner.invoke(app, ["--stage", "decode", "--data", str(tmp_path / "none.jsonl"), "--out", str(tmp_path / "o"),
                            "--no-progress"])
    assert r.exit_code == 2 and "data file not found" in r.output
    r = runner.invoke(app, ["--stage", "fly", "--data", "builtin", "--out", str(tmp_path / "o")])
    assert r.exit_code == 2 and "stage" in r.output


@pytest.mark.slow
def test_ray_train_two_workers_on_cpu(data_dir, tmp_path):
    cfg = _config(data_dir, tmp_path / "ray", max_steps=12, batch_size=8, lr=5e-3, token_rows="all", log_every=3,
                  ray=True, num_workers=2)
    res = train(cfg)
    rows = read_metrics(tmp_path / "ray")
    assert res.completed and res.step == 12 and [r["step"] for r in rows] == [3, 6, 9, 12]
    assert rows[-1]["loss"] < 0.8 * rows[0]["loss"], rows
    assert (res.export_dir / "output_image.safetensors").is_file() and res.num_examples == len(TRAIN)


def test_signal_ce_first_labels_only_the_token_that_opens_a_group(parts):
    from training.align.data import Dialogue, MediaRef, Message
    from training.align.model import IGNORE, SequenceBuilder

    eng = parts.llm.engine
    image = Modality.IMAGE
    rec = Dialogue((Message("user", ("draw a red circle",)),
                    Message("assistant", ("Here it is.", MediaRef(image, None, "a red circle")))), "t")
    group = eng.signal_ids[image]
    labelled = {}
    for mode in ("all", "first"):
        ex = SequenceBuilder(eng, {}, 512, signal_ce=mode).build(rec)
        start = ex.outputs[0].positions[0]
        assert ex.ids[start:start + len(group)] == tuple(group)
        labelled[mode] = ex.labels[start:start + len(group)]
        assert ex.labels[start + len(group)] != IGNORE  # the turn suffix after the group is learned either way
    assert labelled["all"] == tuple(group)
    assert labelled["first"] == (group[0],) + (IGNORE,) * (len(group) - 1)
    with pytest.raises(ValueError, match="signal_ce"):
        SequenceBuilder(eng, {}, 512, signal_ce="none")
