"""Boxes drawn on the image they refer to (Pillow; no torch, the HTTP ingress uses it)."""

from __future__ import annotations

import io
from collections.abc import Sequence

import numpy as np

from polymodal.grounding.boxes import GroundedPhrase

# distinct, saturated colours; one per phrase, in order of first appearance
PALETTE = ((230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180), (70, 240, 240),
           (240, 50, 230), (210, 245, 60), (0, 128, 128), (255, 225, 25))


def draw_boxes(image: np.ndarray, boxes: Sequence[GroundedPhrase]) -> np.ndarray:
    """Draw each box (outline and phrase label) on a copy of ``image``.

    Args:
        image: uint8 (H, W, 3), the image the boxes' pixels refer to.
        boxes: boxes in pixels of that image.
    Returns:
        uint8 (H, W, 3).
    Raises:
        ValueError: an image that is not (H, W, 3) uint8.
    """
    from PIL import Image, ImageDraw

    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"expected a uint8 (H, W, 3) image, got {image.dtype} {image.shape}")
    h, w = image.shape[:2]
    im = Image.fromarray(image)
    draw = ImageDraw.Draw(im)
    width = max(1, round(min(w, h) / 160))
    colours: dict[str, tuple[int, int, int]] = {}
    for b in boxes:
        colour = colours.setdefault(b.phrase, PALETTE[len(colours) % len(PALETTE)])
        x1, y1, x2, y2 = b.box_px
        # the outline inside the box: pixel columns x1 .. x2 - 1
        draw.rectangle((x1, y1, max(x1, x2 - 1), max(y1, y2 - 1)), outline=colour, width=width)
        if b.phrase:
            left, top, right, bottom = draw.textbbox((0, 0), b.phrase)
            tw, th = right - left + 4, bottom - top + 4
            ty = y1 - th if y1 - th >= 0 else y1
            draw.rectangle((x1, ty, x1 + tw, ty + th), fill=colour)
            draw.text((x1 + 2 - left, ty + 2 - top), b.phrase, fill=(255, 255, 255))
    return np.asarray(im)


def overlay_png(image: np.ndarray, boxes: Sequence[GroundedPhrase]) -> bytes:
    """:func:`draw_boxes`, encoded as PNG."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(draw_boxes(image, boxes)).save(buf, format="PNG")
    return buf.getvalue()
