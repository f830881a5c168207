"""Toy-world grounding data (:mod:`training.toyworld.grounding`): the rows the toy-grounding instruct stage reads."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from training.align.data import DataSpec, read_grounding
from training.toyworld import grounding as G
from training.toyworld.data import write_dataset


def test_question_banks_are_disjoint_and_mixed():
    train, held = G.all_questions(heldout=False), G.all_questions(heldout=True)
    assert train and held and not train & held
    drawn = G.questions(40, heldout=True, seed=1)
    assert set(drawn) <= set(G.HELDOUT_QUESTIONS) and len(set(drawn)) > 1
    assert drawn == G.questions(40, heldout=True, seed=1) != G.questions(40, heldout=True, seed=2)


def test_rows_hold_the_box_around_the_coloured_shape(tmp_path):
    catalog = write_dataset(tmp_path / "data", count=6, seed=3, modalities=["image"], size_px=64)
    rows_path = G.write_grounding_rows(catalog, tmp_path / "rows.json")
    rows = json.loads(rows_path.read_text())
    assert len(rows) == 6 and not list(tmp_path.glob("*.tmp"))
    items = [json.loads(x) for x in catalog.read_text().splitlines()]
    for row, item in zip(rows, items):
        a = item["attributes"]
        assert row["phrase"] == f"{a['colour']} {a['shape']}" and row["task"] == "grounding"
        x1, y1, x2, y2 = (int(v) for v in row["box"])
        img = np.asarray(Image.open(row["image"]).convert("RGB")).astype(int)
        # every pixel far from the background grey lies inside the box, and the box is not empty of them
        off = np.abs(img - a["background"]).sum(axis=2) > 60
        ys, xs = np.nonzero(off)
        assert len(xs) > 20
        assert x1 <= xs.min() and xs.max() < x2 and y1 <= ys.min() and ys.max() < y2
    # the training reader takes them as they are: image, task identifier, question -> grounded phrase
    dialogues = read_grounding(rows_path, DataSpec(str(rows_path), "grounding"))
    assert len(dialogues) == 6
    user, answer = dialogues[0].messages
    assert user.parts[2] == rows[0]["question"].replace("{phrase}", rows[0]["phrase"])
    assert answer.parts[0].boxes_px == (tuple(float(v) for v in rows[0]["box"]),)
    assert answer.parts[0].image_size == (64, 64)


def test_missing_catalog_is_an_error(tmp_path):
    with pytest.raises(FileNotFoundError):
        G.write_grounding_rows(tmp_path / "none.jsonl", tmp_path / "rows.json")
    assert not Path(tmp_path / "rows.json").exists()
