"""Converters from released checkpoints into polymodal export folders (:mod:`polymodal.export`).

- :func:`convert_nextgpt`: NExT-GPT's 7b_tiva_v0 delta (``pytorch_model.pt``) -> token rows, a peft LoRA
  adapter, input and output projectors; served with ``--preset nextgpt-7b --projectors DIR``.

Command line: ``polymodal convert nextgpt CKPT --out DIR`` (:data:`training.convert.cli.app`).
"""

from training.convert.nextgpt import (
    BaseModelInfo,
    ConversionError,
    ConversionReport,
    NextGPTDelta,
    convert_nextgpt,
    load_nextgpt_checkpoint,
    parse_nextgpt_state_dict,
    write_nextgpt_export,
)

__all__ = [
    "BaseModelInfo",
    "ConversionError",
    "ConversionReport",
    "NextGPTDelta",
    "convert_nextgpt",
    "load_nextgpt_checkpoint",
    "parse_nextgpt_state_dict",
    "write_nextgpt_export",
]
