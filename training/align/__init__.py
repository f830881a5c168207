"""Alignment training: NExT-GPT's three stages (encode, decode, instruct), in one process or on Ray Train.

Entry points: :func:`train` with a :class:`TrainConfig`, the ``polymodal train`` command
(:mod:`training.align.cli`; also ``python -m training.align``). See :mod:`.trainer` for the loop,
:mod:`.data` for the readers, :mod:`.model` for what learns and the losses.

Decoding-side alignment of the ``smol`` preset on CPU (LLM states cached once, then only the output
projectors learn)::

    polymodal train --stage decode --preset smol \
        --data /work/shared/data/audiocaps_val.csv --modality audio \
        --data builtin:image --data builtin:video --max-examples 200 \
        --token-rows none --max-steps 300 --batch-size 32 --lr 3e-3 --out runs/smol-decode
    polymodal serve --preset smol --projectors runs/smol-decode/export

(``--data builtin`` alone uses the caption list shipped in :mod:`training.align.captions`.)
"""

from training.align.config import STAGES, DataSource, TrainConfig
from training.align.data import (
    READERS,
    CaptionPair,
    DataFormatError,
    DataSpec,
    Dialogue,
    MediaRef,
    Message,
    MissingMediaError,
    read_records,
)
from training.align.launch import train
from training.align.model import AlignmentModel, TokenRows, per_token_l2
from training.align.trainer import (
    Parts,
    TrainError,
    TrainResult,
    batch_indices,
    checkpoint_path,
    export_trained,
    load_parts,
    read_metrics,
    run,
    setup,
)

__all__ = [
    "READERS",
    "STAGES",
    "AlignmentModel",
    "CaptionPair",
    "DataFormatError",
    "DataSource",
    "DataSpec",
    "Dialogue",
    "MediaRef",
    "Message",
    "MissingMediaError",
    "Parts",
    "TokenRows",
    "TrainConfig",
    "TrainError",
    "TrainResult",
    "batch_indices",
    "checkpoint_path",
    "export_trained",
    "load_parts",
    "per_token_l2",
    "read_metrics",
    "read_records",
    "run",
    "setup",
    "train",
]
