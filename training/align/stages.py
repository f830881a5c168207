"""Per stage: which records it reads, how a caption pair becomes a dialogue, what learns.

One registry, :data:`STAGE_SPECS` (``encode``, ``decode``, ``instruct``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from polymodal.modality import Modality
from training.align.config import TrainConfig
from training.align.data import CaptionPair, Dialogue, MediaRef, Message, Record


@dataclass(frozen=True)
class StageSpec:
    """What a stage trains and reads.

    Attributes:
        input_projectors / output_projectors / lora: whether those learn.
        token_kinds: which new token rows may learn (``signal``, ``marker``, ``grounding``: the preset's
            grounding tokens, when the data holds grounding parts), as ``token_rows`` allows.
        to_dialogue: record -> dialogue for this stage, or ``None`` to skip the record.
        needs_input_files: input media are read (encoders).
    """

    name: str
    input_projectors: bool
    output_projectors: bool
    lora: bool
    token_kinds: tuple[str, ...]
    to_dialogue: Callable[[Record, TrainConfig], Dialogue | None]


def _keep(modalities: list[Modality] | None, refs: list[MediaRef]) -> bool:
    return modalities is None or all(r.modality in modalities for r in refs)


def _encode_dialogue(rec: Record, cfg: TrainConfig) -> Dialogue | None:
    """encode: (medium, caption) -> user [medium, instruction], assistant [caption]."""
    if isinstance(rec, CaptionPair):
        if not _keep(cfg.modalities, [rec.media]):
            return None
        ask = cfg.instruction.format(modality=rec.modality.value)
        media = MediaRef(rec.media.modality, rec.media.path, None)
        return Dialogue((Message("user", (media, ask)), Message("assistant", (rec.caption,))), rec.source)
    if rec.media("assistant") or not rec.media("user") or not _keep(cfg.modalities, rec.media("user")):
        return None
    return rec


def _decode_dialogue(rec: Record, cfg: TrainConfig) -> Dialogue | None:
    """decode: caption -> user [prompt_template(caption)], assistant [signal group of the medium]."""
    if isinstance(rec, CaptionPair):
        if not _keep(cfg.modalities, [rec.media]) or not rec.caption:
            return None
        ask = cfg.prompt_template.format(caption=rec.caption, modality=rec.modality.value)
        return Dialogue((Message("user", (ask,)), Message("assistant", (rec.media,))), rec.source)
    outs = rec.media("assistant")
    if not outs or not _keep(cfg.modalities, outs):
        return None
    return rec


def _instruct_dialogue(rec: Record, cfg: TrainConfig) -> Dialogue | None:
    """instruct: dialogues as they are; a caption pair becomes a text-to-X request (as decode)."""
    if isinstance(rec, CaptionPair):
        return _decode_dialogue(rec, cfg)
    if not _keep(cfg.modalities, rec.media()):
        return None
    return rec


STAGE_SPECS: dict[str, StageSpec] = {
    "encode": StageSpec("encode", True, False, False, ("marker",), _encode_dialogue),
    "decode": StageSpec("decode", False, True, False, ("signal",), _decode_dialogue),
    "instruct": StageSpec("instruct", True, True, True, ("signal", "marker", "grounding"), _instruct_dialogue),
}


def stage_spec(name: str) -> StageSpec:
    """Raises:
        ValueError: an unknown stage (lists the choices)."""
    if name not in STAGE_SPECS:
        raise ValueError(f"unknown stage {name!r}; choose from: {', '.join(STAGE_SPECS)}")
    return STAGE_SPECS[name]
