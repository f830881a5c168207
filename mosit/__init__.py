"""MosIT dataset construction: LLM-written modality-switching dialogues with real media.

Entry points: :func:`mosit.job.build` (``polymodal mosit build``), :mod:`mosit.review`, the config in
:mod:`mosit.config`, the validation rules in :mod:`mosit.validate`. This package imports polymodal (its
presets and pipeline), never the other way round.
"""

from mosit.config import ConfigError, MositConfig, load_config, parse_config
from mosit.dialogue import Dialogue, Message, parse_dialogue
from mosit.modes import MODES, Mode, get_mode
from mosit.validate import RULES, Rules, Violation, validate_dialogue

__all__ = [
    "MODES", "RULES", "ConfigError", "Dialogue", "Message", "Mode", "MositConfig", "Rules", "Violation",
    "get_mode", "load_config", "parse_config", "parse_dialogue", "validate_dialogue",
]
