"""Grounding as an output: boxes as structured parts of an answer, in pixels of the image the user sent.

- :mod:`polymodal.grounding.loc`: our location tokens (a grid of ``<loc_i>``, phrase markers, task
  identifiers).
- :mod:`polymodal.grounding.config`: :class:`GroundingConfig`, the preset's grounding switch.
- :mod:`polymodal.grounding.formats`: parsers of several models' formats, one registry
  (:data:`GROUNDING_FORMATS`), each converting its reference frame into pixels.
- :mod:`polymodal.grounding.overlay`: the boxes drawn on the image (Pillow).

No torch import here: the HTTP ingress reads these types.
"""

from polymodal.grounding.boxes import (
    GroundedPhrase,
    GroundingOutput,
    box_from_fractions,
    box_iou,
)
from polymodal.grounding.config import GroundingConfig
from polymodal.grounding.formats import (
    GROUNDING_FORMATS,
    GroundingParser,
    build_parser,
    parse_grounding,
)
from polymodal.grounding.loc import LocGrid

__all__ = [
    "GROUNDING_FORMATS",
    "GroundedPhrase",
    "GroundingConfig",
    "GroundingOutput",
    "GroundingParser",
    "LocGrid",
    "box_from_fractions",
    "box_iou",
    "build_parser",
    "parse_grounding",
]
