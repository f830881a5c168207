"""The media catalog: items (``id, modality, path?, caption``) read from JSONL or CSV, checked on load,
and indexed by caption embedding for retrieval.

An item without ``path`` is looked up as ``<catalog dir>/<id>.<ext>`` for the modality's usual
extensions. Items that cannot be used (missing field, unknown modality, missing or unreadable file, an
extension of another medium, duplicate id, empty caption) are returned as :class:`CatalogReject` with the
reason, and end up in the job's reject report.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from polymodal.modality import Modality



def extensions(modality: Modality) -> tuple[str, ...]:
    """File extensions of ``modality`` (its spec's ``file_extensions``, lower-case with the dot)."""
    return modality.spec.file_extensions


@dataclass(frozen=True)
class CatalogItem:
    """A usable medium: ``path`` is absolute and readable; ``source`` says where it came from."""

    id: str
    modality: Modality
    path: Path
    caption: str
    source: str = "catalog"


@dataclass(frozen=True)
class CatalogReject:
    """A catalog line that cannot be used."""

    id: str
    line: int
    reason: str


def _image_opens(path: Path) -> str | None:
    from PIL import Image

    with Image.open(path) as im:
        im.verify()
    return None


def _audio_opens(path: Path) -> str | None:
    import soundfile as sf

    return "audio file has no samples" if sf.info(str(path)).frames <= 0 else None


def _video_opens(path: Path) -> str | None:
    import av

    with av.open(str(path)) as c:
        return None if c.streams.video else "video file has no video stream"


# Quick checks that open a file's header without decoding it all; a modality without one is decoded by its codec.
_OPENS = {"image": _image_opens, "audio": _audio_opens, "video": _video_opens}


def _check_readable(modality: Modality, path: Path) -> str | None:
    """None if the file opens as that medium, else the reason."""
    try:
        opens = _OPENS.get(modality.value)
        if opens is not None:
            return opens(path)
        from polymodal.media_io import decode_media

        decode_media(modality, path.read_bytes())
    except Exception as e:  # noqa: BLE001 - any decoder failure means "unreadable"
        return f"unreadable {modality.value} file: {type(e).__name__}: {e}"
    return None


def _rows(path: Path) -> list[tuple[int, dict]]:
    if path.suffix.lower() == ".csv":
        with open(path, newline="", encoding="utf-8") as f:
            return [(i + 2, {k.strip(): (v or "").strip() for k, v in row.items() if k}) for i, row in
                    enumerate(csv.DictReader(f))]
    rows = []
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                rows.append((i, {"__error__": f"invalid JSON: {e.msg}"}))
                continue
            rows.append((i, obj if isinstance(obj, dict) else {"__error__": "a line must be a JSON object"}))
    return rows


def load_catalog(path: str | Path, *, check_files: bool = True) -> tuple[list[CatalogItem], list[CatalogReject]]:
    """Read a catalog file (``.jsonl`` or ``.csv``).

    Returns:
        (usable items in file order, rejected lines with reasons).
    Raises:
        FileNotFoundError: the catalog file itself is missing.
        ValueError: an extension other than .jsonl / .csv.
    """
    path = Path(path)
    if path.suffix.lower() not in (".jsonl", ".csv"):
        raise ValueError(f"catalog must be .jsonl or .csv, got {path.name}")
    if not path.is_file():
        raise FileNotFoundError(f"catalog file not found: {path}")
    base = path.parent
    items: list[CatalogItem] = []
    rejects: list[CatalogReject] = []
    seen: set[str] = set()
    for line, row in _rows(path):
        item_id = str(row.get("id", "") or "").strip()
        if "__error__" in row:
            rejects.append(CatalogReject(item_id, line, row["__error__"]))
            continue
        missing = [k for k in ("id", "modality", "caption") if not str(row.get(k, "") or "").strip()]
        if missing:
            rejects.append(CatalogReject(item_id, line, f"missing field(s): {', '.join(missing)}"))
            continue
        try:
            modality = Modality.parse(str(row["modality"]))
        except ValueError as e:
            rejects.append(CatalogReject(item_id, line, str(e)))
            continue
        if item_id in seen:
            rejects.append(CatalogReject(item_id, line, f"duplicate id {item_id!r}"))
            continue
        raw_path = str(row.get("path", "") or "").strip()
        if raw_path:
            p = Path(raw_path).expanduser()
            p = p if p.is_absolute() else base / p
        else:
            found = [base / f"{item_id}{ext}" for ext in extensions(modality) if (base / f"{item_id}{ext}").is_file()]
            if not found:
                rejects.append(CatalogReject(item_id, line, f"no path given and no {item_id}.<ext> next to the "
                                                            f"catalog for a {modality.value}"))
                continue
            p = found[0]
        if check_files:
            if not p.is_file():
                rejects.append(CatalogReject(item_id, line, f"missing file: {raw_path or p.name} (relative to "
                                                            "the catalog's folder)"))
                continue
            if p.suffix.lower() not in extensions(modality):
                rejects.append(CatalogReject(item_id, line, f"{p.name} is not a {modality.value} file "
                                                            f"(expected {', '.join(extensions(modality))})"))
                continue
            reason = _check_readable(modality, p)
            if reason:
                rejects.append(CatalogReject(item_id, line, reason))
                continue
        seen.add(item_id)
        items.append(CatalogItem(item_id, modality, p.resolve(), " ".join(str(row["caption"]).split()),
                                 str(row.get("source", "") or "catalog")))
    return items, rejects


@dataclass(frozen=True)
class Match:
    """Best catalog item for a query caption (``item`` is None when nothing of that modality exists)."""

    item: CatalogItem | None
    score: float


class CatalogIndex:
    """Caption embeddings of the items, per modality, for nearest-caption retrieval.

    ``embed``: a callable ``list[str] -> (B, D)`` unit-norm float32 array (e.g. :class:`mosit.embed.TextEmbedder`).
    """

    def __init__(self, items: list[CatalogItem], embed):
        self.items: dict[Modality, list[CatalogItem]] = {m: [i for i in items if i.modality is m] for m in Modality}
        self.vectors: dict[Modality, np.ndarray] = {
            m: embed([i.caption for i in its]) if its else np.zeros((0, 1), np.float32) for m, its in self.items.items()
        }

    def search(self, modality: Modality, query: np.ndarray, exclude: set[str] = frozenset()) -> Match:
        """Highest cosine similarity item of ``modality`` to ``query`` (D,), skipping ids in ``exclude``;
        ties go to the earlier catalog line."""
        its, vec = self.items[modality], self.vectors[modality]
        if not its:
            return Match(None, float("-inf"))
        scores = vec @ query.astype(np.float32)
        best, best_s = None, float("-inf")
        for k, s in enumerate(scores.tolist()):
            if its[k].id in exclude:
                continue
            if s > best_s:
                best, best_s = its[k], s
        return Match(best, best_s)
