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
from dataclasses import dataclass

from polymodal.grounding.boxes import BoxPx


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
