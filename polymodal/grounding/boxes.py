"""Boxes as part of an answer: what a grounding parser returns, in pixels of the image the user sent.

Every format has its own reference frame (a grid over the image, 0-1000, 0-1 of the image padded to a
square, 0-100, 0-1024 with y first); :func:`box_from_fractions` converts fractions of the sent image into
pixels, clamped to the image, and refuses a reversed or non-finite box (the caller leaves such a span as
text).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

BoxPx = tuple[float, float, float, float]


@dataclass(frozen=True)
class GroundedPhrase:
    """One box of an answer.

    Attributes:
        phrase: the words the box belongs to (``""`` when the format gave none).
        box_px: (x1, y1, x2, y2) in pixels of the image the user sent (after EXIF orientation), x right,
            y down, origin at the top-left corner; x1 <= x2, y1 <= y2, inside the image.
        image_index: which input image (0-based among the request's images, in message order).
        raw: the span of the model's text the box was read from (several boxes of one span share it).
        text_span: (start, end) character offsets of ``phrase`` in the cleaned answer text, when known.
    """

    phrase: str
    box_px: BoxPx
    image_index: int
    raw: str = ""
    text_span: tuple[int, int] | None = None


@dataclass(frozen=True)
class GroundingOutput:
    """A parsed answer: ``text`` with the grounding markup removed, and its boxes in order."""

    text: str
    boxes: tuple[GroundedPhrase, ...] = ()


def box_from_fractions(x1: float, y1: float, x2: float, y2: float, width_px: int, height_px: int) -> BoxPx | None:
    """Fractions of the image (0..1, x by width, y by height) -> pixels, clamped to the image.

    Returns ``None`` for a non-finite or reversed box (x2 < x1 or y2 < y1): a malformed span.
    """
    vals = (x1, y1, x2, y2)
    if not all(math.isfinite(v) for v in vals) or x2 < x1 or y2 < y1:
        return None

    def clamp(v: float, hi: int) -> float:
        return min(max(v, 0.0), float(hi))

    return (clamp(x1 * width_px, width_px), clamp(y1 * height_px, height_px),
            clamp(x2 * width_px, width_px), clamp(y2 * height_px, height_px))


@dataclass(frozen=True)
class Span:
    """A well-formed span found by a parser: ``text[start:end]`` becomes ``replacement``; its boxes (pixels)
    belong to ``phrase``, which sits at ``phrase_at`` inside ``replacement`` (``None``: not in it)."""

    start: int
    end: int
    replacement: str
    phrase: str
    boxes: tuple[BoxPx, ...]
    phrase_at: int | None = None


def assemble(text: str, spans: Iterable[Span], image_index: int,
             leftover: Callable[[str], str] | None = None) -> GroundingOutput:
    """Replace each span (in order, non-overlapping) by its replacement and collect the boxes.

    ``leftover`` cleans the text between spans (e.g. drops stray special tokens of our own format).
    """
    out: list[str] = []
    boxes: list[GroundedPhrase] = []
    cursor = 0
    length = 0
    for s in sorted(spans, key=lambda s: s.start):
        if s.start < cursor:
            continue
        piece = text[cursor:s.start]
        piece = leftover(piece) if leftover else piece
        out.append(piece)
        length += len(piece)
        span = None
        if s.phrase_at is not None and s.phrase:
            span = (length + s.phrase_at, length + s.phrase_at + len(s.phrase))
        for b in s.boxes:
            boxes.append(GroundedPhrase(s.phrase, b, image_index, text[s.start:s.end], span))
        out.append(s.replacement)
        length += len(s.replacement)
        cursor = s.end
    tail = text[cursor:]
    out.append(leftover(tail) if leftover else tail)
    return GroundingOutput("".join(out), tuple(boxes))


def last_image(image_sizes: Sequence[tuple[int, int]]) -> tuple[int, int, int] | None:
    """``(index, width_px, height_px)`` of the image boxes refer to: the last one sent (as Qwen-VL draws on
    the latest picture); ``None`` without images."""
    if not image_sizes:
        return None
    w, h = image_sizes[-1]
    return len(image_sizes) - 1, int(w), int(h)


def box_iou(a: Sequence[float], b: Sequence[float]) -> float:
    """Intersection over union of two boxes ``[x1, y1, x2, y2]`` in one unit (pixels, fractions). An inverted
    box has area 0; two empty boxes give 0."""
    ax1, ay1, ax2, ay2 = (float(v) for v in a)
    bx1, by1, bx2, by2 = (float(v) for v in b)
    inter = max(0.0, min(ax2, bx2) - max(ax1, bx1)) * max(0.0, min(ay2, by2) - max(ay1, by1))
    union = max(0.0, ax2 - ax1) * max(0.0, ay2 - ay1) + max(0.0, bx2 - bx1) * max(0.0, by2 - by1) - inter
    return inter / union if union > 0 else 0.0
