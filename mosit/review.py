"""Human review: a static HTML page and a CSV to fill in, and the import of the reviewer's decisions.

``export_review(dataset)`` writes ``review/review.html`` (every dialogue with its media inline: ``<img>``,
``<audio controls>``, ``<video controls>``, linked relative to the dataset folder, so the folder can be
zipped or served as is) and ``review/review.csv`` (one row per dialogue: id, mode, topic, conversation,
media links, and empty ``decision`` / ``note`` columns). The reviewer writes ``accept`` or ``reject`` in
``decision``; ``import_review(dataset, csv)`` writes ``mosit.reviewed.json`` (accepted records, plus
undecided ones unless ``drop_undecided``) and ``review/rejected_by_reviewer.jsonl``, and leaves
``mosit.json`` untouched, so an import can be redone with new decisions.
"""

from __future__ import annotations

import csv
import html
import io
import json
from collections import Counter
from pathlib import Path

from mosit.fsio import atomic_write_json, atomic_write_jsonl, atomic_write_text
from mosit.schema import MEDIA_LISTS

RECORDS_FILE = "mosit.json"
REVIEWED_FILE = "mosit.reviewed.json"
# The HTML element that shows a medium on the review page (any other modality: a plain link).
_HTML_ELEMENT = {"image": "img", "audio": "audio", "video": "video"}
CSV_FIELDS = ("id", "mode", "topic", "conversation", "media", "decision", "note")
DECISIONS = ("accept", "reject", "")


class ReviewError(ValueError):
    """A decisions file that cannot be applied (unknown id, bad decision value, missing columns)."""


def _records(dataset: Path) -> list[dict]:
    path = dataset / RECORDS_FILE
    if not path.is_file():
        raise ReviewError(f"{path} not found: build the dataset first")
    return json.loads(path.read_text(encoding="utf-8"))


def _media(rec: dict) -> list[tuple[str, str, dict]]:
    """(relative link from review/, element kind, entry) per medium."""
    return [(f"../{m.spec.answer_field}/{e['name']}", _HTML_ELEMENT.get(m.value, "a"), e)
            for m, key in MEDIA_LISTS.items() for e in rec.get(key, [])]


def export_review(dataset: str | Path) -> tuple[Path, Path]:
    """Write ``review/review.html`` and ``review/review.csv``; returns their paths."""
    dataset = Path(dataset)
    records = _records(dataset)
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(CSV_FIELDS)
    cards = []
    for rec in records:
        convo = "\n".join(f"{m['from']}: {m['value']}" for m in rec["conversation"])
        media = _media(rec)
        w.writerow([rec["id"], rec["mode"], rec["topic"], convo, " ".join(link for link, _, _ in media), "", ""])
        rows = "".join(f"<p class='{html.escape(m['from'])}'><b>{html.escape(m['from'])}:</b> "
                       f"{html.escape(m['value'])}</p>" for m in rec["conversation"])
        figs = []
        for link, tag, e in media:
            src = html.escape(link, quote=True)
            el = (f"<img src='{src}' alt='{html.escape(e['caption'], quote=True)}' width='240'>" if tag == "img"
                  else f"<a href='{src}'>{html.escape(e['name'])}</a>" if tag == "a"
                  else f"<{tag} controls src='{src}'></{tag}>")
            score = "" if e.get("score") is None else f" &middot; score {e['score']:.3f}"
            figs.append(f"<figure>{el}<figcaption><a href='{src}'>{html.escape(e['name'])}</a> "
                        f"({html.escape(e['from'])}, {html.escape(e['source'])}{score})<br>caption: "
                        f"{html.escape(e['caption'])}<br>asked for: {html.escape(e['query'])}</figcaption></figure>")
        cards.append(f"<section id='{html.escape(rec['id'], quote=True)}'><h2>{html.escape(rec['id'])} "
                     f"<small>{html.escape(rec['mode'])} &middot; {html.escape(rec['topic'])}</small></h2>"
                     f"{rows}<div class='media'>{''.join(figs)}</div></section>")
    page = ("<!doctype html><html><head><meta charset='utf-8'><title>MosIT review</title><style>"
            "body{font-family:sans-serif;max-width:1000px;margin:auto}section{border-bottom:1px solid #ccc;"
            "padding:8px 0}.human{color:#064}.gpt{color:#036}figure{display:inline-block;margin:4px;"
            "max-width:320px;vertical-align:top}</style></head><body><h1>MosIT review</h1>"
            f"<p>{len(records)} dialogues. Write <code>accept</code> or <code>reject</code> in the "
            "<code>decision</code> column of <code>review.csv</code> (and a <code>note</code> if you like), "
            "then run <code>polymodal mosit import-review</code>.</p>" + "".join(cards) + "</body></html>\n")
    out = dataset / "review"
    return atomic_write_text(out / "review.html", page), atomic_write_text(out / "review.csv", buf.getvalue())


def import_review(dataset: str | Path, decisions: str | Path, *, drop_undecided: bool = False) -> dict:
    """Apply a filled-in review CSV; returns counts ``{"accepted", "rejected", "undecided", "kept"}``.

    Raises:
        ReviewError: missing ``id`` / ``decision`` columns, a decision other than accept / reject / empty
            (case-insensitive), an id that is not in the dataset, or an id given twice.
    """
    dataset = Path(dataset)
    records = _records(dataset)
    by_id = {r["id"]: r for r in records}
    with open(decisions, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        if not reader.fieldnames or not {"id", "decision"} <= set(reader.fieldnames):
            raise ReviewError(f"{decisions}: needs the columns 'id' and 'decision'")
        chosen: dict[str, tuple[str, str]] = {}
        for line, row in enumerate(reader, start=2):
            rid = (row.get("id") or "").strip()
            dec = (row.get("decision") or "").strip().lower()
            if dec not in DECISIONS:
                raise ReviewError(f"{decisions} line {line}: decision {row.get('decision')!r}; use accept, reject "
                                  "or leave it empty")
            if rid not in by_id:
                raise ReviewError(f"{decisions} line {line}: id {rid!r} is not in {dataset / RECORDS_FILE}")
            if rid in chosen:
                raise ReviewError(f"{decisions} line {line}: id {rid!r} appears twice")
            chosen[rid] = (dec, (row.get("note") or "").strip())
    kept, rejected = [], []
    counts = Counter()
    for rec in records:
        dec, note = chosen.get(rec["id"], ("", ""))
        counts[dec or "undecided"] += 1
        if dec == "reject":
            rejected.append({"kind": "dialogue", "id": rec["id"], "stage": "review", "rules": ["reviewer"],
                             "reasons": [note or "rejected by the reviewer"], "record": rec})
        elif dec == "accept" or not drop_undecided:
            kept.append(rec)
    atomic_write_json(dataset / REVIEWED_FILE, kept)
    atomic_write_jsonl(dataset / "review" / "rejected_by_reviewer.jsonl", rejected)
    return {"accepted": counts["accept"], "rejected": counts["reject"], "undecided": counts["undecided"],
            "kept": len(kept)}
