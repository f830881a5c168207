"""Masks as part of an answer: a binary mask of one image, as COCO-style run-length encoding.

Encoding (what :meth:`SkillMask.rle` returns and what clients receive): COCO's *uncompressed* RLE,
``{"size": [H, W], "counts": [c0, c1, ...]}``: the mask is read in column-major (Fortran) order, x slowest,
i.e. down the first column, then the second, ...; the counts alternate between runs of 0 and runs of 1, starting
with 0 (``c0`` may be 0 when the first pixel is set); they sum to ``H * W``. This is what pycocotools'
``frPyObjects`` reads for an uncompressed mask, and what ``decode_rle`` here inverts. COCO's compressed string
form is not produced. :meth:`SkillMask.png` gives the same mask as an 8-bit greyscale PNG (0 / 255).

No torch and no OpenCV here: the HTTP ingress reads these types and draws them (:func:`draw_masks`).
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from polymodal.grounding.boxes import BoxPx


def encode_rle(mask: np.ndarray) -> tuple[int, ...]:
    """Binary mask (H, W) -> COCO uncompressed RLE counts (column-major, starting with a run of 0s).

    Raises:
        ValueError: ``mask`` is not 2-D.
    """
    m = np.asarray(mask)
    if m.ndim != 2:
        raise ValueError(f"a mask must be (H, W), got shape {m.shape}")
    flat = m.astype(bool).ravel(order="F")
    if flat.size == 0:
        return ()
    change = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    edges = np.concatenate([[0], change, [flat.size]])
    runs = np.diff(edges).astype(np.int64)
    counts = runs.tolist()
    if flat[0]:
        counts = [0, *counts]
    return tuple(int(c) for c in counts)


def decode_rle(counts: Sequence[int], size_hw: tuple[int, int]) -> np.ndarray:
    """COCO uncompressed RLE -> bool (H, W).

    Raises:
        ValueError: negative counts, or counts that do not sum to H * W.
    """
    h, w = (int(v) for v in size_hw)
    c = np.asarray(list(counts), dtype=np.int64)
    if (c < 0).any() or int(c.sum()) != h * w:
        raise ValueError(f"RLE counts must be non-negative and sum to H * W = {h * w}, got sum {int(c.sum())}")
    values = np.zeros(len(c), dtype=bool)
    values[1::2] = True
    flat = np.repeat(values, c)
    return flat.reshape((h, w), order="F")


@dataclass(frozen=True)
class SkillMask:
    """One mask of an answer, in pixels of the image the user sent.

    Attributes:
        label: the phrase or class the mask belongs to (``""`` when none).
        image_index: which input image (0-based among the request's images, in message order).
        size_hw: (H, W) of that image.
        counts: COCO uncompressed RLE of the mask (see the module docstring).
        bbox_px: (x1, y1, x2, y2) of the set pixels, x2 / y2 exclusive (a one-pixel mask at (x, y) has
            (x, y, x + 1, y + 1)); (0, 0, 0, 0) for an empty mask.
        area_px: number of set pixels.
        score: the producer's confidence, when it has one.
    """

    label: str
    image_index: int
    size_hw: tuple[int, int]
    counts: tuple[int, ...]
    bbox_px: BoxPx
    area_px: int
    score: float | None = None

    @classmethod
    def from_array(cls, mask: np.ndarray, *, label: str = "", image_index: int = 0,
                   score: float | None = None) -> "SkillMask":
        """From a binary mask (H, W) (any dtype; non-zero is set).

        Raises:
            ValueError: ``mask`` is not 2-D.
        """
        m = np.asarray(mask).astype(bool)
        if m.ndim != 2:
            raise ValueError(f"a mask must be (H, W), got shape {m.shape}")
        ys, xs = np.nonzero(m)
        bbox: BoxPx = ((float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1))
                       if len(xs) else (0.0, 0.0, 0.0, 0.0))
        return cls(label=label, image_index=int(image_index), size_hw=(int(m.shape[0]), int(m.shape[1])),
                   counts=encode_rle(m), bbox_px=bbox, area_px=int(len(xs)), score=score)

    def to_array(self) -> np.ndarray:
        """The mask, bool (H, W)."""
        return decode_rle(self.counts, self.size_hw)

    def rle(self) -> dict:
        """COCO JSON form: ``{"size": [H, W], "counts": [...]}`` (uncompressed)."""
        return {"size": [int(self.size_hw[0]), int(self.size_hw[1])], "counts": [int(c) for c in self.counts]}

    def png(self) -> bytes:
        """The mask as an 8-bit greyscale PNG (H, W): 255 set, 0 not set (Pillow)."""
        from PIL import Image

        buf = io.BytesIO()
        Image.fromarray(self.to_array().astype(np.uint8) * 255, mode="L").save(buf, format="PNG")
        return buf.getvalue()

    def to_dict(self) -> dict:
        """JSON-able form (what an HTTP answer's ``masks`` entry carries; RLE, not PNG)."""
        return {"label": self.label, "image_index": self.image_index, "bbox_px": list(self.bbox_px),
                "area_px": self.area_px, "score": self.score, "rle": self.rle()}


def mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    """Intersection over union of two binary masks of one shape; two empty masks give 0.

    Raises:
        ValueError: the shapes differ.
    """
    a, b = np.asarray(a).astype(bool), np.asarray(b).astype(bool)
    if a.shape != b.shape:
        raise ValueError(f"masks of different shapes: {a.shape} and {b.shape}")
    union = int((a | b).sum())
    return int((a & b).sum()) / union if union else 0.0


def draw_masks(image: np.ndarray, masks: Sequence[SkillMask], *, alpha: float = 0.45) -> np.ndarray:
    """Blend each mask's colour into a copy of ``image`` (one colour per label, the box overlay's palette) and
    mark its outline.

    Args:
        image: uint8 (H, W, 3), the image the masks refer to.
        masks: masks of that image (``size_hw`` equal to (H, W)).
        alpha: opacity of the fill, 0..1.
    Returns:
        uint8 (H, W, 3).
    Raises:
        ValueError: an image that is not (H, W, 3) uint8, a mask of another size, ``alpha`` outside 0..1.
    """
    from polymodal.grounding.overlay import PALETTE

    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"expected a uint8 (H, W, 3) image, got {image.dtype} {image.shape}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in 0..1, got {alpha}")
    out = image.astype(np.float32)
    colours: dict[str, tuple[int, int, int]] = {}
    for mk in masks:
        if tuple(mk.size_hw) != image.shape[:2]:
            raise ValueError(f"mask of size {mk.size_hw} on an image of size {image.shape[:2]}")
        colour = np.asarray(colours.setdefault(mk.label, PALETTE[len(colours) % len(PALETTE)]), np.float32)
        m = mk.to_array()
        out[m] = (1.0 - alpha) * out[m] + alpha * colour
        inner = m.copy()
        inner[1:, :] &= m[:-1, :]
        inner[:-1, :] &= m[1:, :]
        inner[:, 1:] &= m[:, :-1]
        inner[:, :-1] &= m[:, 1:]
        out[m & ~inner] = colour
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)
