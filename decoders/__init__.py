"""Diffusion decoders wrapping stock diffusers pipelines (compose, never fork).

``DECODERS`` maps each :class:`polymodal.modality.Modality` to its decoder kind (a :class:`Decoder` subclass that
names its own ``modality``): image = ``StableDiffusionPipeline``, audio = ``AudioLDMPipeline``, video =
``TextToVideoSDPipeline``, object3d (3D) = ``ShapEPipeline`` or our point-set pipeline (:mod:`decoders.object3d`).
:func:`register_decoder` adds a kind (a plug-in modality's); ``build_decoder(modality,
config)`` builds one from a :class:`polymodal.config.DecoderConfig`.
"""

from __future__ import annotations

from pathlib import Path

import torch

from decoders.audio import AudioDecoder
from decoders.base import Decoder
from decoders.errors import DecodeError, DecoderLoadError
from decoders.image import ImageDecoder
from decoders.media import Medium
from decoders.object3d import Object3DDecoder
from decoders.video import VideoDecoder
from polymodal.config import DecoderConfig, DecoderDefaults
from polymodal.modality import Modality

DECODERS: dict[Modality, type[Decoder]] = {
    cls.modality: cls for cls in (ImageDecoder, AudioDecoder, VideoDecoder, Object3DDecoder)}


def register_decoder(cls: type[Decoder], *, replace: bool = False) -> type[Decoder]:
    """Register ``cls`` as the decoder kind of ``cls.modality`` (a registered modality); returns ``cls``.

    Raises:
        ValueError: an unregistered modality, or one that already has another decoder kind (unless ``replace``).
    """
    m = Modality.parse(cls.modality)
    if not replace and DECODERS.get(m, cls) is not cls:
        raise ValueError(f"modality {m.value!r} already has the decoder {DECODERS[m].__name__}")
    DECODERS[m] = cls
    return cls


def unregister_decoder(modality: Modality | str) -> None:
    """Remove the decoder kind of ``modality`` (tests that register a plug-in kind); unknown: no-op."""
    DECODERS.pop(modality if isinstance(modality, Modality) else Modality.parse(modality), None)


def decoder_class(modality: Modality | str) -> type[Decoder]:
    """The registered decoder class of ``modality``.

    Raises:
        ValueError: unknown modality (lists the choices).
    """
    choices = ", ".join(m.value for m in DECODERS)
    try:
        return DECODERS[Modality.parse(modality)]
    except (ValueError, KeyError):
        raise ValueError(f"no decoder for {modality!r}; choose from: {choices}") from None


def build_decoder(
    modality: Modality | str, config: DecoderConfig, *, device: str | torch.device = "cpu", seed: int = 0
) -> Decoder:
    """Build the decoder of ``modality`` from ``config`` (``tiny``: random with ``seed``; ``pretrained``:
    strict load of ``config.path``).

    Raises:
        ValueError: unknown modality.
        DecoderLoadError: a pretrained load that is missing anything, or a conditioning shape unlike the config.
    """
    return decoder_class(modality).from_config(config, device=device, seed=seed)


def save_tiny_checkpoint(modality: Modality | str, config: DecoderConfig, path: str | Path, *, seed: int = 0) -> Path:
    """Write a tiny random pipeline in the real diffusers on-disk layout (model_index.json + component
    folders, safetensors) so that ``source="pretrained"`` loading runs without the hub. Returns ``path``."""
    cls = decoder_class(modality)
    pipe = cls.tiny_pipeline(config, seed=seed)
    pipe.save_pretrained(str(path), safe_serialization=True)
    return Path(path)


__all__ = [
    "DECODERS",
    "AudioDecoder",
    "DecodeError",
    "Decoder",
    "DecoderDefaults",
    "DecoderLoadError",
    "ImageDecoder",
    "Medium",
    "Object3DDecoder",
    "VideoDecoder",
    "build_decoder",
    "decoder_class",
    "register_decoder",
    "save_tiny_checkpoint",
    "unregister_decoder",
]
