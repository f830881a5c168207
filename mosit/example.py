"""Build a small real media catalog from a recipe (the example config uses this, so no binary media live
in the repository).

A recipe is YAML: ``items`` with ``id``, ``modality``, ``caption``, optional ``source``, and ``make``:

- ``{skimage: NAME}``: a photo from ``skimage.data`` (scikit-image ships them), saved as PNG, longest side
  ``max_side_px`` (default 256).
- ``{speech: TEXT, voice: en-us, words_per_minute: 150}``: speech rendered by ``espeak-ng`` to WAV. When
  ``espeak-ng`` is not installed the item is skipped with a warning.
- ``{video_from: NAME, motion: zoom|pan, duration_s: 2, fps: 8, size_px: 128}``: a short MP4 (h264,
  PyAV) moving over a ``skimage.data`` photo.

:func:`build_catalog_from_recipe` writes the files and a ``catalog.jsonl`` with paths relative to it.
"""

from __future__ import annotations

import logging
import shutil
import subprocess
import tempfile
from fractions import Fraction
from pathlib import Path

import numpy as np
import yaml

from mosit.fsio import atomic_write_bytes, atomic_write_jsonl

log = logging.getLogger(__name__)

DEFAULT_RECIPE = Path(__file__).resolve().parent.parent / "examples" / "mosit" / "catalog_recipe.yaml"


class RecipeError(ValueError):
    """A recipe item that cannot be built (unknown photo, bad make spec)."""


def _photo(name: str) -> np.ndarray:
    """uint8 (H, W, 3) from ``skimage.data``."""
    import skimage.data

    fn = getattr(skimage.data, name, None)
    if fn is None or not callable(fn):
        raise RecipeError(f"skimage.data has no photo {name!r}")
    img = fn()
    img = img[0] if isinstance(img, tuple) else img
    img = np.asarray(img)
    if img.dtype == bool:
        img = img.astype(np.uint8) * 255
    if img.ndim == 2:
        img = np.repeat(img[..., None], 3, axis=-1)
    return np.ascontiguousarray(img[..., :3].astype(np.uint8))


def _png(img: np.ndarray, max_side_px: int) -> bytes:
    import io

    from PIL import Image

    im = Image.fromarray(img, "RGB")
    scale = max_side_px / max(im.size)
    if scale < 1:
        im = im.resize((max(1, round(im.width * scale)), max(1, round(im.height * scale))), Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def espeak_available() -> bool:
    return shutil.which("espeak-ng") is not None


def _speech(text: str, voice: str, wpm: int) -> bytes:
    with tempfile.TemporaryDirectory() as d:
        out = Path(d) / "speech.wav"
        subprocess.run(["espeak-ng", "-v", voice, "-s", str(wpm), "-w", str(out), text], check=True,
                       capture_output=True, timeout=60)
        return out.read_bytes()


def _frames(img: np.ndarray, motion: str, num_frames: int, size_px: int) -> np.ndarray:
    """uint8 (F, size, size, 3): a square window zooming into the centre or panning left to right."""
    from PIL import Image

    h, w = img.shape[:2]
    side = min(h, w)
    im = Image.fromarray(img, "RGB")
    frames = []
    for f in range(num_frames):
        t = f / max(1, num_frames - 1)
        if motion == "zoom":
            s = side * (1.0 - 0.4 * t)
            cx, cy = w / 2, h / 2
            box = (cx - s / 2, cy - s / 2, cx + s / 2, cy + s / 2)
        elif motion == "pan":
            x0 = (w - side) * t
            box = (x0, (h - side) / 2, x0 + side, (h + side) / 2)
        else:
            raise RecipeError(f"unknown motion {motion!r}; choose from: zoom, pan")
        frames.append(np.asarray(im.resize((size_px, size_px), Image.Resampling.BILINEAR, box=box)))
    return np.stack(frames)


def _mp4(frames: np.ndarray, fps: int) -> bytes:
    import io

    import av

    buf = io.BytesIO()
    with av.open(buf, mode="w", format="mp4") as c:
        s = c.add_stream("libx264", rate=fps)
        s.width, s.height = frames.shape[2], frames.shape[1]
        s.pix_fmt = "yuv420p"
        s.time_base = Fraction(1, fps)
        s.options = {"crf": "23", "threads": "1"}
        for k, fr in enumerate(frames):
            vf = av.VideoFrame.from_ndarray(fr, format="rgb24")
            vf.pts = k
            for pkt in s.encode(vf):
                c.mux(pkt)
        for pkt in s.encode():
            c.mux(pkt)
    return buf.getvalue()


def build_catalog_from_recipe(recipe: str | Path | None, dest: str | Path) -> Path:
    """Materialise ``recipe`` (default: the repository's example recipe) into ``dest``; returns the path
    of ``dest/catalog.jsonl``.

    Raises:
        RecipeError: unreadable recipe or a bad item.
    """
    recipe = Path(recipe) if recipe else DEFAULT_RECIPE
    try:
        spec = yaml.safe_load(recipe.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as e:
        raise RecipeError(f"cannot read catalog recipe {recipe}: {e}") from e
    items = (spec or {}).get("items") if isinstance(spec, dict) else None
    if not isinstance(items, list) or not items:
        raise RecipeError(f"{recipe}: needs a non-empty 'items' list")
    dest = Path(dest)
    rows = []
    for k, it in enumerate(items):
        try:
            iid, modality, caption, make = it["id"], it["modality"], it["caption"], it["make"]
        except (KeyError, TypeError):
            raise RecipeError(f"{recipe} item {k}: needs id, modality, caption and make") from None
        if "skimage" in make:
            rel, data = f"images/{iid}.png", _png(_photo(make["skimage"]), int(make.get("max_side_px", 256)))
        elif "speech" in make:
            if not espeak_available():
                log.warning("espeak-ng is not installed: skipping speech item %r (apt-get install espeak-ng)", iid)
                continue
            rel, data = f"audios/{iid}.wav", _speech(str(make["speech"]), str(make.get("voice", "en-us")),
                                                      int(make.get("words_per_minute", 150)))
        elif "video_from" in make:
            fps = int(make.get("fps", 8))
            n = max(2, int(round(float(make.get("duration_s", 2.0)) * fps)))
            frames = _frames(_photo(make["video_from"]), str(make.get("motion", "zoom")), n, int(make.get("size_px", 128)))
            rel, data = f"videos/{iid}.mp4", _mp4(frames, fps)
        else:
            raise RecipeError(f"{recipe} item {iid!r}: make needs one of skimage, speech, video_from")
        atomic_write_bytes(dest / rel, data)
        rows.append({"id": iid, "modality": modality, "path": rel, "caption": caption,
                     "source": it.get("source", next(iter(make)))})
    return atomic_write_jsonl(dest / "catalog.jsonl", rows)
