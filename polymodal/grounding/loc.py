"""Our own grounding tokens (Kosmos-2 style): a grid of location tokens, phrase markers, task identifiers.

A box is two location tokens: the grid cell holding its top-left corner and the cell holding its
bottom-right corner. With a G x G grid over the image, cell ``i`` is row ``i // G``, column ``i % G``; the
box decodes to the outer edges of the cells it touches::

    x1 = col_a * W / G    y1 = row_a * H / G    x2 = (col_b + 1) * W / G    y2 = (row_b + 1) * H / G

(Kosmos-2, arXiv 2306.14824, uses a 32 x 32 grid and the cell centres; our grid is the preset's and a box
covers every cell it touches, so ``encode`` then ``decode`` contains the original box.) A phrase and its
boxes read ``<p>two dogs</p><loc_a><loc_b><loc_c><loc_d>`` (one pair of location tokens per box; with
``box_markers`` each pair sits between them). Task identifiers (``[grounding]``, ``[refer]``, as
MiniGPT-v2's, arXiv 2310.09478) go at the start of the user's request.

With ``format="loc"`` every one of these strings is added to the vocabulary as one special token (like the
signal tokens): user text that types them stays plain text, they never appear in the streamed answer, and
their embedding rows are trained by the instruct stage.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from polymodal.grounding.boxes import BoxPx

_TASK_NAME = re.compile(r"^[a-z][a-z0-9_-]{0,31}$")


@dataclass(frozen=True)
class LocGrid:
    """The location-token grid of a preset (see the module docstring).

    Attributes:
        grid_size: G (cells per side); G * G location tokens.
        token_format: the token of cell i, ``token_format.format(i=i)``.
        phrase_markers: (begin, end) around a phrase.
        box_markers: (begin, end) around each pair of location tokens, or ``None``.
        task_tokens: task name -> identifier token.
    """

    grid_size: int = 16
    token_format: str = "<loc_{i}>"
    phrase_markers: tuple[str, str] = ("<p>", "</p>")
    box_markers: tuple[str, str] | None = None
    task_tokens: tuple[tuple[str, str], ...] = (("grounding", "[grounding]"), ("refer", "[refer]"))

    @property
    def num_cells(self) -> int:
        return self.grid_size * self.grid_size

    def token(self, i: int) -> str:
        return self.token_format.format(i=i)

    def loc_tokens(self) -> list[str]:
        return [self.token(i) for i in range(self.num_cells)]

    def all_tokens(self) -> list[str]:
        """Every token this grid adds to the vocabulary, in a fixed order."""
        markers = [*self.phrase_markers, *(self.box_markers or ())]
        return [*self.loc_tokens(), *markers, *(t for _, t in self.task_tokens)]

    def cells(self, box_px: BoxPx, width_px: int, height_px: int) -> tuple[int, int]:
        """(top-left cell, bottom-right cell) of a box in pixels (clamped to the grid).

        Raises:
            ValueError: a reversed box or a non-positive image size.
        """
        x1, y1, x2, y2 = box_px
        if width_px <= 0 or height_px <= 0:
            raise ValueError(f"image size must be positive, got {width_px}x{height_px}")
        if x2 < x1 or y2 < y1:
            raise ValueError(f"box {box_px} is reversed (x2 < x1 or y2 < y1)")
        g = self.grid_size

        def lo(v: float, n: int) -> int:
            return min(max(math.floor(v / n * g), 0), g - 1)

        def hi(v: float, n: int, first: int) -> int:
            return min(max(math.ceil(v / n * g) - 1, first), g - 1)

        c1, r1 = lo(x1, width_px), lo(y1, height_px)
        c2, r2 = hi(x2, width_px, c1), hi(y2, height_px, r1)
        return r1 * g + c1, r2 * g + c2

    def decode(self, a: int, b: int, width_px: int, height_px: int) -> BoxPx | None:
        """Cells (a, b) -> box in pixels; ``None`` if a cell is off the grid or b is not below-right of a."""
        g = self.grid_size
        if not (0 <= a < g * g and 0 <= b < g * g):
            return None
        r1, c1 = divmod(a, g)
        r2, c2 = divmod(b, g)
        if c2 < c1 or r2 < r1:
            return None
        return (c1 * width_px / g, r1 * height_px / g, (c2 + 1) * width_px / g, (r2 + 1) * height_px / g)

    def encode_box(self, box_px: BoxPx, width_px: int, height_px: int) -> str:
        """One box as its location tokens (inside the box markers, if any)."""
        a, b = self.cells(box_px, width_px, height_px)
        pair = self.token(a) + self.token(b)
        return f"{self.box_markers[0]}{pair}{self.box_markers[1]}" if self.box_markers else pair

    def encode(self, phrase: str, boxes_px: list[BoxPx] | tuple[BoxPx, ...], width_px: int, height_px: int) -> str:
        """``<p>phrase</p>`` followed by each box's tokens (the answer text the instruct stage trains on)."""
        begin, end = self.phrase_markers
        return f"{begin}{phrase}{end}" + "".join(self.encode_box(b, width_px, height_px) for b in boxes_px)


class GroundingConfig(BaseModel):
    """Grounding of a preset: which answer format carries boxes, and the task identifiers.

    ``format``: a key of :data:`polymodal.grounding.GROUNDING_FORMATS` (``loc`` is ours; the others read
    the output of models trained on their own formats, whose tokenizers already hold their tags).
    ``tasks``: request ``task`` name -> the identifier put at the start of the user's request (for ``loc``
    each identifier is one added token). Grid fields apply to ``loc`` only.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    format: str = "loc"
    grid_size: int = Field(16, ge=2, le=64, description="loc: cells per side (G * G location tokens)")
    loc_token: str = Field("<loc_{i}>", description="loc: token of cell i")
    phrase_markers: tuple[str, str] = ("<p>", "</p>")
    box_markers: tuple[str, str] | None = None
    tasks: dict[str, str] = Field(default_factory=lambda: {"grounding": "[grounding]", "refer": "[refer]"})

    @field_validator("format")
    @classmethod
    def _known_format(cls, v: str) -> str:
        from polymodal.grounding.formats import GROUNDING_FORMATS

        if v not in GROUNDING_FORMATS:
            raise ValueError(f"unknown grounding format {v!r}; choose from: {', '.join(GROUNDING_FORMATS)}")
        return v

    @model_validator(mode="after")
    def _check(self) -> GroundingConfig:
        if "{i}" not in self.loc_token:
            raise ValueError("loc_token must contain {i}")
        for name, ident in self.tasks.items():
            if not _TASK_NAME.match(name):
                raise ValueError(f"task name {name!r}: lowercase letters, digits, '-' or '_' (at most 32)")
            if not ident.strip():
                raise ValueError(f"task {name!r} has an empty identifier")
        strings = [*self.phrase_markers, *(self.box_markers or ()), *self.tasks.values()]
        if any(not s for s in strings) or len(set(strings)) != len(strings):
            raise ValueError("phrase markers, box markers and task identifiers must be distinct, non-empty strings")
        return self

    def grid(self) -> LocGrid:
        return LocGrid(self.grid_size, self.loc_token, tuple(self.phrase_markers),
                       tuple(self.box_markers) if self.box_markers else None, tuple(self.tasks.items()))

    def added_tokens(self) -> list[str]:
        """Tokens added to the LLM's vocabulary: the whole grid for ``loc``; none for other formats."""
        return self.grid().all_tokens() if self.format == "loc" else []

    def never_generated(self) -> list[str]:
        """Added tokens the model must never emit (the task identifiers)."""
        return list(self.tasks.values()) if self.format == "loc" else []

    def task_identifier(self, task: str) -> str:
        """Raises:
            ValueError: an unknown task (lists the choices)."""
        if task not in self.tasks:
            raise ValueError(f"unknown task {task!r}; choose from: {', '.join(self.tasks)}")
        return self.tasks[task]

    def parser(self):
        """The :class:`polymodal.grounding.formats.GroundingParser` of ``format``."""
        from polymodal.grounding.formats import build_parser

        return build_parser(self.format, grid=self.grid())
