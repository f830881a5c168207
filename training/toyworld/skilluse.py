"""Skill use in the toy world (issue #25): scenes of several shapes, the task families, their answer checks and
chance levels. The trained part (LLaVA-Plus dialogues from the MosIT job, the instruct stage) and
``bench/skilluse.py`` read them from here.

Scene: uint8 (S, S, 3), S = 64 by default, a plain grey background (one of the toy world's greys) with
:data:`SCENE_SHAPES` shapes (3 or 4) of side 12-20 px that do not touch (2 px apart at least), each a random
{circle, square, triangle} in a random {red, green, blue, yellow}. The image alone (a 64 px scene through the toy
encoder's one token) cannot give a pixel box or a count: the skill is needed.

Families (each with its answer check and its chance level, written down before any model is measured):

- ``locate``: "Where is the <colour> <shape>?" (that pair is unique in the scene). Right skill: ``locate``; right
  arguments: ``shape`` and ``colour`` equal to the asked ones. Check: the answer holds a box (the first four numbers
  in it, x0 y0 x1 y1 in pixels) whose IoU with the true box is >= 0.5. Chance: naming one of the scene's shapes at
  random, 1/k for k shapes: mean 1/k over the requests (about 0.29 for k in {3, 4}).
- ``count``: "How many <colour> shapes are there?" (colour drawn uniformly; 0 to k of them). Right skill: ``count``;
  right arguments: ``colour`` equal, no ``shape`` (or null). Check: the first number in the answer (digits or an
  English number word up to ten) equals the true count. Chance: always answering the most frequent count of the
  requests (the majority guess; about 0.4).
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from training.toyworld.data import BACKGROUND_GREYS, COLOURS, COLOUR_JITTER, SHAPES, draw_shape

SCENE_SIZE_PX = 64
SCENE_SHAPES = (3, 4)
SIDE_RANGE_PX = (12, 20)
GAP_PX = 2
FAMILIES = ("locate", "count")

LOCATE_PHRASINGS = {
    "train": ("Where is the {colour} {shape}?", "Give the box of the {colour} {shape}.",
              "Find the {colour} {shape} in the picture.", "Locate the {colour} {shape}.",
              "What is the pixel box of the {colour} {shape}?", "Show me where the {colour} {shape} is.",
              "Mark the {colour} {shape} with its bounding box.", "Tell me the box of the {colour} {shape} in this image.",
              "Can you find the {colour} {shape} and give its box?"),
    "heldout": ("Which pixels hold the {colour} {shape}? Give its box.", "Point out the {colour} {shape} with a box."),
}
COUNT_PHRASINGS = {
    "train": ("How many {colour} shapes are there?", "Count the {colour} shapes.",
              "What number of {colour} shapes does the picture hold?", "Give me the count of {colour} shapes.",
              "Tell me how many {colour} shapes this image has.", "What is the number of {colour} shapes here?",
              "Count how many {colour} shapes the picture shows.", "Please count the {colour} shapes in the picture."),
    "heldout": ("How many shapes are {colour}?", "Tell me the count of {colour} shapes in this image."),
}
NUMBER_WORDS = {w: k for k, w in enumerate(("zero", "one", "two", "three", "four", "five", "six", "seven", "eight",
                                            "nine", "ten"))}


@dataclass(frozen=True, eq=False)
class Scene:
    """A rendered scene and what is in it (``shapes``: (shape, colour, box_px (x0, y0, x1, y1), x1 / y1 exclusive))."""

    image: np.ndarray
    shapes: tuple[tuple[str, str, tuple[float, float, float, float]], ...]


@dataclass(frozen=True, eq=False)
class SkillTask:
    """One request of a family: the scene, the question, the skill and arguments a right call has, the truth."""

    family: str
    scene: Scene
    question: str
    skill: str
    arguments: dict
    truth: object  # locate: the box (x0, y0, x1, y1); count: the number
    meta: dict = field(default_factory=dict)


def render_scene(rng: np.random.Generator, size_px: int = SCENE_SIZE_PX, n_shapes: int | None = None) -> Scene:
    """A scene of ``n_shapes`` (default: drawn from :data:`SCENE_SHAPES`) shapes that do not touch."""
    n = int(n_shapes or rng.choice(SCENE_SHAPES))
    grey = int(BACKGROUND_GREYS[rng.integers(len(BACKGROUND_GREYS))])
    canvas = np.full((size_px, size_px, 3), grey, dtype=np.uint8)
    placed: list[tuple[str, str, tuple[float, float, float, float]]] = []
    for _ in range(200 * n):
        if len(placed) == n:
            break
        side = int(rng.integers(SIDE_RANGE_PX[0], SIDE_RANGE_PX[1] + 1))
        x0, y0 = int(rng.integers(0, size_px - side + 1)), int(rng.integers(0, size_px - side + 1))
        box = (float(x0), float(y0), float(x0 + side), float(y0 + side))
        if any(box[0] < b[2] + GAP_PX and b[0] < box[2] + GAP_PX and box[1] < b[3] + GAP_PX and b[1] < box[3] + GAP_PX
               for _, _, b in placed):
            continue
        shape = SHAPES[rng.integers(len(SHAPES))]
        colour = list(COLOURS)[rng.integers(len(COLOURS))]
        rgb = tuple(int(v) for v in np.clip(np.asarray(COLOURS[colour]) + rng.integers(-COLOUR_JITTER, COLOUR_JITTER + 1, 3), 0, 255))
        canvas = draw_shape(canvas, shape, rgb, x0, y0, side)
        placed.append((shape, colour, box))
    return Scene(canvas, tuple(placed))


def make_task(family: str, index: int, *, seed: int = 0, split: str = "heldout") -> SkillTask:
    """Request ``index`` of ``family`` (deterministic in ``(family, seed, index)``); ``split``: the phrasings
    (``train`` / ``heldout``, disjoint).

    Raises:
        ValueError: unknown family or split (lists the choices).
    """
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; choose from: {', '.join(FAMILIES)}")
    if split not in ("train", "heldout"):
        raise ValueError(f"unknown split {split!r}; choose from: train, heldout")
    rng = np.random.default_rng([seed, FAMILIES.index(family), index])
    while True:
        scene = render_scene(rng)
        if family == "locate":
            pairs = Counter((s, c) for s, c, _ in scene.shapes)
            unique = [(s, c, b) for s, c, b in scene.shapes if pairs[(s, c)] == 1]
            if not unique:
                continue
            shape, colour, box = unique[rng.integers(len(unique))]
            q = LOCATE_PHRASINGS[split][rng.integers(len(LOCATE_PHRASINGS[split]))]
            return SkillTask(family, scene, q.format(colour=colour, shape=shape), "locate",
                             {"shape": shape, "colour": colour}, box, {"k": len(scene.shapes)})
        colour = list(COLOURS)[rng.integers(len(COLOURS))]
        n = sum(1 for _, c, _ in scene.shapes if c == colour)
        q = COUNT_PHRASINGS[split][rng.integers(len(COUNT_PHRASINGS[split]))]
        return SkillTask(family, scene, q.format(colour=colour), "count", {"colour": colour}, n,
                         {"k": len(scene.shapes)})


def _numbers(text: str) -> list[float]:
    out = []
    for tok in re.findall(r"-?\d+(?:\.\d+)?|[A-Za-z]+", text):
        if tok.lower() in NUMBER_WORDS:
            out.append(float(NUMBER_WORDS[tok.lower()]))
        elif tok[0].isdigit() or tok[0] == "-":
            out.append(float(tok))
    return out


def box_iou(a, b) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


MEDIA_LINK = re.compile(r"!?\[[^\]]*\]\([^)]*\)")
"""A markdown media reference (``![image 1](URL)``): dropped before an answer is checked (its digits are no answer)."""


def answer_passes(task: SkillTask, answer: str) -> bool:
    """The family's check of a final answer (see the module); media references in it are ignored."""
    answer = MEDIA_LINK.sub(" ", answer)
    if task.family == "locate":
        nums = [n for n in re.findall(r"-?\d+(?:\.\d+)?", answer)]
        if len(nums) < 4:
            return False
        box = tuple(float(v) for v in nums[:4])
        return box[2] > box[0] and box[3] > box[1] and box_iou(box, task.truth) >= 0.5
    nums = _numbers(answer)
    return bool(nums) and nums[0] == float(task.truth)


def arguments_right(task: SkillTask, arguments: dict) -> bool:
    """Whether a call's arguments are the family's right ones (``image_index`` 0 or absent)."""
    if arguments.get("image_index", 0) != 0:
        return False
    if task.family == "locate":
        return arguments.get("shape") == task.arguments["shape"] and arguments.get("colour") == task.arguments["colour"]
    return arguments.get("colour") == task.arguments["colour"] and arguments.get("shape") is None


def chance(tasks: list[SkillTask]) -> float:
    """The family's chance level over ``tasks`` (see the module)."""
    if not tasks:
        return 0.0
    if tasks[0].family == "locate":
        return float(np.mean([1.0 / t.meta["k"] for t in tasks]))
    counts = Counter(int(t.truth) for t in tasks)
    return max(counts.values()) / len(tasks)
