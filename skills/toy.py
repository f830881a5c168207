"""Toy-world skills (issue #25): ``locate`` and ``count``, non-learned readers of the toy world's scenes.

A toy scene (``training.toyworld.skilluse.render_scene``) is a plain grey background with a few axis-aligned shapes
({circle, square, triangle (apex up)} in {red, green, blue, yellow}, small per-channel jitter) that do not touch. The
reader (:func:`read_scene`, numpy + scipy only, as the toy world's checkers): background = the most common border
colour; foreground = pixels farther than :data:`FOREGROUND_DISTANCE` from it; each connected part of at least
:data:`MIN_AREA_PX` pixels is one shape: colour = the palette entry nearest its median colour, shape from its fill of
its bounding box (square ~1, circle ~pi/4) and the share of its area in the box's top half (triangle ~1/4).

These skills are what the trained skill-use model (LLaVA-Plus, in the toy world) and a zero-shot brain call for
questions the image alone cannot answer to pixel precision: the pixel box of a named shape, how many shapes of a
colour. They are light (milliseconds) and opt-in (:data:`services.skill_host.SKILL_DEPLOYMENTS` ``skills-toy``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
from pydantic import Field

from polymodal.grounding.boxes import GroundedPhrase
from polymodal.types import MediaPart
from skills.base import Skill, SkillParams, SkillResult, input_image

TOY_SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
TOY_COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 70, 220),
    "yellow": (230, 210, 40),
}
"""The toy world's palette (the same as ``training.toyworld.data.COLOURS``; a test keeps them equal: the runtime
does not import the offline wing)."""

FOREGROUND_DISTANCE = 60.0
MIN_AREA_PX = 12

ToyShape = Literal[TOY_SHAPES]  # type: ignore[valid-type]
ToyColour = Literal[tuple(TOY_COLOURS)]  # type: ignore[valid-type]


@dataclass(frozen=True)
class SceneShape:
    """One shape read from a scene: ``box_px`` (x0, y0, x1, y1), x1 / y1 exclusive, in pixels of the image."""

    shape: str
    colour: str
    box_px: tuple[float, float, float, float]
    area_px: int


def _border_colour(img: np.ndarray) -> np.ndarray:
    border = np.concatenate([img[0], img[-1], img[:, 0], img[:, -1]])
    q = (border // 16).astype(np.int64)
    keys = q[:, 0] * 256 + q[:, 1] * 16 + q[:, 2]
    return np.median(border[keys == np.bincount(keys).argmax()], axis=0)


def read_scene(image: np.ndarray) -> tuple[SceneShape, ...]:
    """The shapes of a toy scene uint8 (H, W, 3), top to bottom then left to right."""
    from scipy import ndimage

    img = np.asarray(image, dtype=np.float64)[..., :3]
    mask = np.linalg.norm(img - _border_colour(img), axis=-1) > FOREGROUND_DISTANCE
    labels, n = ndimage.label(mask)
    palette = np.asarray(list(TOY_COLOURS.values()), dtype=np.float64)
    out = []
    for k, sl in enumerate(ndimage.find_objects(labels), start=1):
        if sl is None:
            continue
        part = labels[sl] == k
        area = int(part.sum())
        if area < MIN_AREA_PX:
            continue
        rgb = np.median(img[sl][part], axis=0)
        colour = list(TOY_COLOURS)[int(np.linalg.norm(palette - rgb, axis=-1).argmin())]
        h, w = part.shape
        ys = np.nonzero(part)[0]
        mid = (h - 1) / 2.0
        top_share = float((ys < mid).sum() + 0.5 * (ys == mid).sum()) / area
        fill = area / float(h * w)
        shape = "triangle" if top_share < 0.38 else ("square" if fill > 0.89 else "circle")
        box = (float(sl[1].start), float(sl[0].start), float(sl[1].stop), float(sl[0].stop))
        out.append(SceneShape(shape, colour, box, area))
    return tuple(sorted(out, key=lambda s: (s.box_px[1], s.box_px[0])))


def _box_text(b: tuple[float, float, float, float]) -> str:
    return "[" + ", ".join(str(int(v)) for v in b) + "]"


class LocateParams(SkillParams):
    """Arguments of ``locate``."""

    shape: ToyShape = Field(description="the shape to find")
    colour: ToyColour | None = Field(None, description="its colour (none: any colour)")
    image_index: int = Field(0, ge=0, description="which input image (0-based among the request's images)")


class LocateSkill(Skill):
    """The pixel box of each shape of a kind (and colour) in a toy scene."""

    name = "locate"
    description = ("Find the shapes of one kind (circle, square, triangle), optionally of one colour (red, green, "
                   "blue, yellow), in a toy scene; returns their boxes [x0, y0, x1, y1] in pixels.")
    Params = LocateParams
    accepts = ("image",)
    returns = ("text", "boxes", "data")
    weight = "light"

    def _run(self, params: LocateParams, media: tuple[MediaPart, ...]) -> SkillResult:
        image = input_image(media, params.image_index)
        found = [s for s in read_scene(image)
                 if s.shape == params.shape and (params.colour is None or s.colour == params.colour)]
        label = f"{params.colour} {params.shape}" if params.colour else params.shape
        boxes = tuple(GroundedPhrase(f"{s.colour} {s.shape}", s.box_px, params.image_index) for s in found)
        if found:
            text = f"found {len(found)} {label}(s): " + "; ".join(_box_text(s.box_px) for s in found)
        else:
            text = f"found no {label} in image {params.image_index}"
        return SkillResult(self.name, text, boxes=boxes, data={
            "found": [{"shape": s.shape, "colour": s.colour, "box_px": list(s.box_px)} for s in found]})


class CountParams(SkillParams):
    """Arguments of ``count``."""

    colour: ToyColour | None = Field(None, description="count shapes of this colour (none: any colour)")
    shape: ToyShape | None = Field(None, description="count shapes of this kind (none: any kind)")
    image_index: int = Field(0, ge=0, description="which input image (0-based among the request's images)")


class CountSkill(Skill):
    """How many shapes of a colour (and / or kind) a toy scene holds."""

    name = "count"
    description = ("Count the shapes in a toy scene, optionally only those of one colour (red, green, blue, yellow) "
                   "and / or one kind (circle, square, triangle); returns the number.")
    Params = CountParams
    accepts = ("image",)
    returns = ("text", "data")
    weight = "light"

    def _run(self, params: CountParams, media: tuple[MediaPart, ...]) -> SkillResult:
        image = input_image(media, params.image_index)
        n = sum(1 for s in read_scene(image) if (params.colour is None or s.colour == params.colour)
                and (params.shape is None or s.shape == params.shape))
        what = " ".join(x for x in (params.colour, params.shape + "s" if params.shape else "shapes") if x)
        return SkillResult(self.name, f"{n} {what}", data={"count": n})
