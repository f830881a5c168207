"""Atomic file writes: write a temporary sibling, flush and fsync it, then ``os.replace`` it into place.

A reader (or a restarted job) therefore sees either the previous file or the whole new one, never a torn
write; leftovers of a killed writer are ``*.tmp-<pid>`` files, removed by :func:`remove_stale_tmp`.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

TMP_MARK = ".tmp-"


def _tmp_path(path: Path) -> Path:
    return path.with_name(f"{path.name}{TMP_MARK}{os.getpid()}")


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (parents created)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_path(path)
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj: Any) -> Path:
    """Pretty, key-order-preserving, UTF-8 JSON (byte-identical for equal objects)."""
    return atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def atomic_write_jsonl(path: str | Path, rows: list[dict]) -> Path:
    return atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def atomic_copy(src: str | Path, dst: str | Path) -> Path:
    """Copy the bytes of ``src`` to ``dst`` atomically (no metadata, so copies are reproducible)."""
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_path(dst)
    with open(src, "rb") as fi, open(tmp, "wb") as fo:
        shutil.copyfileobj(fi, fo)
        fo.flush()
        os.fsync(fo.fileno())
    os.replace(tmp, dst)
    return dst


def read_jsonl(path: str | Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def remove_stale_tmp(root: str | Path) -> int:
    """Delete ``*.tmp-<pid>`` leftovers under ``root``; returns how many were removed."""
    n = 0
    root = Path(root)
    if not root.exists():
        return 0
    for p in root.rglob(f"*{TMP_MARK}*"):
        if p.is_file():
            p.unlink(missing_ok=True)
            n += 1
    return n
