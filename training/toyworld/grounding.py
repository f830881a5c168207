"""Grounding in the toy world: "where is the red circle?" on a random-layout toy image, answered with a box.

Rows are RefCOCO-style (the ``grounding`` reader of :mod:`training.align.data`): ``{"image", "phrase",
"box" [x1, y1, x2, y2] px, "box_format": "xyxy", "question", "task": "grounding"}``. The box is the shape's
square (:func:`true_box`). Training rows use :data:`TRAIN_QUESTIONS` only, the benchmark
:data:`HELDOUT_QUESTIONS` only (:func:`training.toyworld.phrasings.assert_disjoint` checks whole strings).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

TRAIN_QUESTIONS: tuple[str, ...] = (
    "where is the {phrase}?", "Where is the {phrase}?", "Find the {phrase}.", "Locate the {phrase}.",
    "Where is the {phrase} in this picture?", "Point to the {phrase}.",
)
HELDOUT_QUESTIONS: tuple[str, ...] = (
    "Can you show me where the {phrase} is?", "Which part of the image holds the {phrase}?",
    "Mark the {phrase}, please.", "In this image, where can I see the {phrase}?",
)


def phrase(attributes: dict) -> str:
    """``"red circle"``: the colour and shape of a toy image's attributes."""
    return f"{attributes['colour']} {attributes['shape']}"


def true_box(attributes: dict) -> list[float]:
    """The shape's box [x1, y1, x2, y2] in pixels of its image (``x_px``, ``y_px``, ``size_px`` of the data)."""
    x, y, side = (float(attributes[k]) for k in ("x_px", "y_px", "size_px"))
    return [x, y, x + side, y + side]


def questions(n: int, *, heldout: bool, seed: int = 0) -> list[str]:
    """``n`` question templates (with ``{phrase}``) drawn from the train or held-out bank."""
    bank = HELDOUT_QUESTIONS if heldout else TRAIN_QUESTIONS
    rng = np.random.default_rng([seed, 3, 1 if heldout else 0])
    return [bank[int(i)] for i in rng.integers(len(bank), size=n)]


def all_questions(*, heldout: bool) -> set[str]:
    """Every question string a bank makes for every colour and shape (disjointness checks)."""
    from training.toyworld.data import COLOURS, SHAPES

    bank = HELDOUT_QUESTIONS if heldout else TRAIN_QUESTIONS
    return {q.format(phrase=f"{c} {s}") for q in bank for c in COLOURS for s in SHAPES}


def write_grounding_rows(catalog: str | Path, out: str | Path, *, seed: int = 0) -> Path:
    """RefCOCO-style rows for every image of a toy ``catalog.jsonl`` (training questions), written atomically.

    Image paths are absolute. Returns ``out``.

    Raises:
        FileNotFoundError: no catalog.
    """
    catalog, out = Path(catalog), Path(out)
    items = [json.loads(x) for x in catalog.read_text().splitlines() if x.strip()]
    items = [r for r in items if r.get("modality") == "image"]
    qs = questions(len(items), heldout=False, seed=seed)
    rows = []
    for item, q in zip(items, qs):
        a = item["attributes"]
        rows.append({"image": str((catalog.parent / item["path"]).resolve()), "phrase": phrase(a),
                     "box": true_box(a), "box_format": "xyxy", "question": q,
                     "task": "grounding"})
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(rows, indent=1))
    tmp.replace(out)
    return out
