"""The preset's grounding switch, :class:`GroundingConfig`: which answer format carries boxes, our location
grid (:mod:`polymodal.grounding.loc`) and the task identifiers.

Above both :mod:`~polymodal.grounding.loc` (the grid) and :mod:`~polymodal.grounding.formats` (the parsers,
which read the grid): imports flow config -> formats -> loc, never back.
"""

from __future__ import annotations

import re

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from polymodal.grounding.formats import GROUNDING_FORMATS, GroundingParser, build_parser
from polymodal.grounding.loc import LocGrid

_TASK_NAME = re.compile(r"^[a-z][a-z0-9_-]{0,31}$")


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

    def parser(self) -> GroundingParser:
        """The :class:`polymodal.grounding.formats.GroundingParser` of ``format``."""
        return build_parser(self.format, grid=self.grid())
