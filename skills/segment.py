"""``segment``: a box on an image -> the object's mask, with OpenCV's GrabCut (Rother et al., 2004).

GrabCut fits two colour mixtures (object, background) from the pixels inside and outside the box and cuts the
image graph; no learned weights. The box comes from the request, from ``detect`` / ``ocr`` / grounding, in pixels
of the sent image. On flat-coloured toy shapes it is exact (mask IoU 1.0 for circles and triangles, where a
box-filling mask scores 0.79 and 0.5); on a busy photo background it sometimes keeps background inside the box
(see ``bench/skills.py`` and the tests).
"""

from __future__ import annotations

import math

import numpy as np
from pydantic import Field, field_validator

from polymodal.types import MediaPart
from skills.base import Skill, SkillError, SkillParams, SkillResult, input_image
from skills.masks import SkillMask


class SegmentParams(SkillParams):
    """Arguments of ``segment``."""

    box_px: tuple[float, float, float, float] = Field(
        description="the object's box (x1, y1, x2, y2) in pixels of the image, x right, y down, x2 > x1, y2 > y1")
    image_index: int = Field(0, ge=0, description="which input image (0-based among the request's images)")
    label: str = Field("", max_length=200, description="the phrase or class the mask is for")
    iterations: int = Field(5, ge=1, le=20, description="GrabCut iterations (each costs about the same)")
    margin_px: int = Field(2, ge=0, le=64,
                           description="grow the box by this many pixels first, so edges on its border stay inside")

    @field_validator("box_px")
    @classmethod
    def _ordered(cls, v: tuple[float, float, float, float]) -> tuple[float, float, float, float]:
        if not all(math.isfinite(c) for c in v):
            raise ValueError("box_px must be finite numbers")
        if v[2] <= v[0] or v[3] <= v[1]:
            raise ValueError(f"box_px must be (x1, y1, x2, y2) with x2 > x1 and y2 > y1, got {list(v)}")
        return v


class SegmentSkill(Skill):
    """GrabCut box -> mask."""

    name = "segment"
    description = ("Cut out the object inside a box (pixels, e.g. from detect) with GrabCut; returns its mask "
                   "(COCO RLE, bounding box, area).")
    Params = SegmentParams
    accepts = ("image",)
    returns = ("text", "masks", "data")
    weight = "light"

    def _run(self, params: SegmentParams, media: tuple[MediaPart, ...]) -> SkillResult:
        import cv2

        image = input_image(media, params.image_index, min_side_px=2)
        h, w = image.shape[:2]
        x1, y1, x2, y2 = params.box_px
        m = params.margin_px
        rx1, ry1 = max(0, int(math.floor(x1)) - m), max(0, int(math.floor(y1)) - m)
        rx2, ry2 = min(w, int(math.ceil(x2)) + m), min(h, int(math.ceil(y2)) + m)
        if rx2 - rx1 < 2 or ry2 - ry1 < 2:
            raise SkillError(f"box_px {list(params.box_px)} leaves under 2x2 px inside the {w}x{h} px image",
                             "invalid_input")
        if rx1 == 0 and ry1 == 0 and rx2 == w and ry2 == h:
            raise SkillError(f"the box (grown by margin_px={m}) covers the whole {w}x{h} px image: GrabCut needs "
                             "background pixels outside it; send a tighter box or a smaller margin_px",
                             "invalid_input")
        mask = np.zeros((h, w), np.uint8)
        bgd, fgd = np.zeros((1, 65), np.float64), np.zeros((1, 65), np.float64)
        cv2.grabCut(np.ascontiguousarray(image[:, :, ::-1]), mask, (rx1, ry1, rx2 - rx1, ry2 - ry1), bgd, fgd,
                    params.iterations, cv2.GC_INIT_WITH_RECT)
        fg = (mask == cv2.GC_FGD) | (mask == cv2.GC_PR_FGD)
        sk = SkillMask.from_array(fg, label=params.label, image_index=params.image_index)
        box_area = float((x2 - x1) * (y2 - y1))
        if sk.area_px:
            bx = [int(v) for v in sk.bbox_px]
            text = (f"segmented {params.label or 'the object'} in image {params.image_index}: {sk.area_px} px "
                    f"({sk.area_px / box_area:.0%} of the box), mask bbox {bx}")
        else:
            text = f"found no object inside the box in image {params.image_index}: the mask is empty"
        return SkillResult(self.name, text, masks=(sk,),
                           data={"area_px": sk.area_px, "bbox_px": list(sk.bbox_px), "box_fill": sk.area_px / box_area,
                                 "rect_px": [rx1, ry1, rx2, ry2], "image_size_px": [w, h]})
