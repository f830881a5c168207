"""The toy-world MosIT build (training/toyworld/mosit.yaml with training.toyworld.mosit:ToyDialogueWriter) on a
36-item toy catalog: real all-MiniLM-L6-v2 retrieval, records read back by the instruct stage's reader."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from mosit.config import ConfigError, load_config, parse_config
from mosit.job import build
from polymodal.modality import Modality
from polymodal.presets.toy import SIGNAL_COUNTS
from training.align.data import DataSpec, MediaRef, read_records
from training.toyworld import phrasings
from training.toyworld.data import COLOURS, DIRECTIONS, PITCHES_HZ, SHAPES, TIMBRES, write_dataset
from training.toyworld.mosit import ToyDialogueWriter, load_toy_captions, parse_whole_prompt

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "training" / "toyworld" / "mosit.yaml"
IMAGE, AUDIO, VIDEO = Modality.IMAGE, Modality.AUDIO, Modality.VIDEO
# the words that name each attribute's values, per modality ("square" is a shape and a timbre)
VOCAB: dict[Modality, dict[str, tuple[str, ...]]] = {
    IMAGE: {"colour": tuple(COLOURS), "shape": SHAPES},
    AUDIO: {"pitch": tuple(PITCHES_HZ), "timbre": TIMBRES},
    VIDEO: {"colour": tuple(COLOURS), "shape": SHAPES, "direction": DIRECTIONS},
}
LISTS = {IMAGE: "image_list", AUDIO: "audio_list", VIDEO: "video_list"}


def stated_words(modality: Modality, text: str) -> dict[str, set[str]]:
    """Attribute -> the value words of ``text`` (whole words, tags and file names removed)."""
    words = set(re.findall(r"[a-z]+", re.sub(r"<[^>]*>[^<]*</[^>]*>", " ", text.lower())))
    return {k: words & set(vs) for k, vs in VOCAB[modality].items() if words & set(vs)}


@pytest.fixture(scope="module")
def toy_data(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("toydata")
    write_dataset(out, count=12, seed=0, size_px=32, layout="canonical")
    return out


@pytest.fixture(scope="module")
def embedder():
    from mosit.embed import TextEmbedder

    return TextEmbedder()


def toy_config(data_dir: Path, monkeypatch, **overrides):
    """The example config (its ${TOYWORLD_DATA} from the environment) with ``overrides``."""
    monkeypatch.setenv("TOYWORLD_DATA", str(data_dir))
    raw = yaml.safe_load(CONFIG.read_text())
    return parse_config({**raw, **overrides}, CONFIG.parent)


@pytest.fixture(scope="module")
def built(toy_data, embedder, tmp_path_factory):
    mp = pytest.MonkeyPatch()
    try:
        cfg = toy_config(toy_data, mp, num_dialogues=12, shard_size=5)
    finally:
        mp.undo()
    out = tmp_path_factory.mktemp("toymosit") / "ds"
    summary = build(cfg, out, progress=False, embedder=embedder, caption_encoder=None)
    return out, summary


def catalog_rows(data_dir: Path) -> dict[str, dict]:
    return {r["id"]: r for r in map(json.loads, (data_dir / "catalog.jsonl").read_text().splitlines())}


def test_config_reads_the_catalog_from_the_environment(toy_data, monkeypatch):
    cfg = toy_config(toy_data, monkeypatch)
    assert cfg.catalog.path == str(toy_data / "catalog.jsonl")
    assert cfg.llm.options["catalog"] == str(toy_data / "catalog.jsonl")
    assert (cfg.llm.strategy, cfg.generator.kind, cfg.retrieval.threshold) == ("whole", "none", 0.999)
    monkeypatch.delenv("TOYWORLD_DATA")
    with pytest.raises(ConfigError, match=r"TOYWORLD_DATA \(at catalog.path\)"):
        load_config(CONFIG)


def test_build_yields_records_whose_media_are_catalog_items(built, toy_data):
    out, summary = built
    assert summary["dialogues"]["total"] == 12
    # every placeholder found its exact caption; only the validator's repeat rule or dedup may drop one
    assert summary["dialogues"]["accepted"] >= 10, summary["reject_rules"]
    assert set(summary["reject_rules"]) <= {"repeated_message", "near_duplicate"}
    assert summary["retrieval"]["all_queries"]["min"] >= 0.999
    assert summary["media"]["image"].get("gpt_generated", 0) == 0
    records = json.loads((out / "mosit.json").read_text())
    dialogues = read_records(DataSpec(str(out / "mosit.json"), "mosit"))
    assert len(dialogues) == len(records) == summary["dialogues"]["accepted"]
    captions = {r["caption"] for r in catalog_rows(toy_data).values()}
    for rec, d in zip(records, dialogues):
        outputs, inputs = d.media("assistant"), d.media("user")
        want_out = {"T_I": [IMAGE], "T_A": [AUDIO], "T_V": [VIDEO], "I_T": []}[rec["mode"]]
        assert [m.modality for m in outputs] == want_out
        assert [m.modality for m in inputs] == ([IMAGE] if rec["mode"] == "I_T" else [])
        for m in outputs + inputs:
            assert m.path.is_file() and m.caption in captions
        for msg in d.messages:  # a medium is its own part, never left inside the text
            assert not any(isinstance(p, str) and re.search(r"<(Image|Audio|Video)>", p) for p in msg.parts)
            assert any(isinstance(p, MediaRef) or p.strip() for p in msg.parts)


def test_every_attribute_word_describes_the_medium(built, toy_data):
    out, _ = built
    rows = catalog_rows(toy_data)
    train = {m: phrasings.all_prompts(m, heldout=False) for m in SIGNAL_COUNTS}  # toy's modalities
    checked = 0
    for rec in json.loads((out / "mosit.json").read_text()):
        media = [(m, it) for m, key in LISTS.items() for it in rec[key]]
        assert len(media) == 1
        modality, item = media[0]
        attrs = rows[item["catalog_id"]]["attributes"]
        conversation = rec["conversation"]
        # every attribute value named anywhere in the dialogue is the medium's
        for msg in conversation:
            for key, values in stated_words(modality, msg["value"]).items():
                assert values == {attrs[key]}, (rec["id"], msg["value"], attrs)
        caption_says = stated_words(modality, item["caption"])
        assert caption_says and all(v == {attrs[k]} for k, v in caption_says.items())
        if item["from"] == "gpt":
            request = conversation[item["turn"] - 1]["value"]
            assert request in train[modality], request  # a training-bank request, verbatim
            assert stated_words(modality, request) == caption_says, (request, item["caption"])
        checked += 1
    assert checked >= 10


def test_no_human_message_is_a_heldout_prompt(built):
    out, _ = built
    heldout = set().union(*(phrasings.all_prompts(m, heldout=True) for m in SIGNAL_COUNTS))
    humans = [m["value"] for r in json.loads((out / "mosit.json").read_text()) for m in r["conversation"]
              if m["from"] == "human"]
    assert humans and not set(humans) & heldout


def test_build_is_deterministic(built, toy_data, embedder, tmp_path, monkeypatch):
    out, summary = built
    cfg = toy_config(toy_data, monkeypatch, num_dialogues=12, shard_size=7)  # other shards, same dialogues
    again = build(cfg, tmp_path / "again", progress=False, embedder=embedder, caption_encoder=None)
    assert again["dialogues"] == summary["dialogues"]
    assert json.loads((tmp_path / "again" / "mosit.json").read_text()) == json.loads((out / "mosit.json").read_text())
    other = build(toy_config(toy_data, monkeypatch, num_dialogues=12, seed=1), tmp_path / "seed1", progress=False,
                  embedder=embedder, caption_encoder=None)
    assert other["dialogues"]["total"] == 12
    assert (json.loads((tmp_path / "seed1" / "mosit.json").read_text())
            != json.loads((out / "mosit.json").read_text()))


def test_writer_answers_whole_prompts_and_refuses_per_turn(toy_data):
    from mosit.modes import get_mode
    from mosit.writer import P_QUESTION, DialoguePlan, WriterSettings, write_whole

    writer = ToyDialogueWriter(toy_data / "catalog.jsonl")
    plan = DialoguePlan(3, "mosit-000003", get_mode("T_A_I"), "toys", 2, ((), ()), ((), ()))
    d = write_whole(plan, writer, WriterSettings(seed=5), [])
    assert [m.speaker for m in d.messages] == ["human", "gpt", "human", "gpt"]
    assert [p.modality for m in d.messages for p in m.placeholders] == [AUDIO, IMAGE]
    assert all(m.speaker == "gpt" for m in d.messages if m.placeholders)
    assert write_whole(plan, writer, WriterSettings(seed=5), []) == d
    prompt = parse_whole_prompt("Write a new dialogue about x with exactly 3 exchanges (each ...). The Human's "
                                "messages contain, in this order: one video. GPT's messages contain no media tags.")
    assert (prompt.num_turns, prompt.inputs, prompt.outputs) == (3, (VIDEO,), ())
    with pytest.raises(ValueError, match="strategy: whole"):
        writer.chat([{"role": "user", "content": P_QUESTION.format(aspect="the history of", topic="toys")}], seed=1)


def test_catalog_whose_caption_contradicts_its_attributes_is_refused(toy_data, tmp_path):
    rows = (toy_data / "catalog.jsonl").read_text().splitlines()
    first = json.loads(rows[0])
    other = next(c for c in COLOURS if c != first["attributes"]["colour"])
    first["caption"] = f"a {other} {first['attributes']['shape']}"
    (tmp_path / "catalog.jsonl").write_text("\n".join([json.dumps(first)] + rows[1:]) + "\n")
    with pytest.raises(ValueError, match="states"):
        load_toy_captions(tmp_path / "catalog.jsonl")
    first["caption"] = "a spreadsheet of tax figures"
    (tmp_path / "catalog.jsonl").write_text(json.dumps(first) + "\n")
    with pytest.raises(ValueError, match="not a toy image caption"):
        load_toy_captions(tmp_path / "catalog.jsonl")
    with pytest.raises(FileNotFoundError):
        load_toy_captions(tmp_path / "missing.jsonl")
