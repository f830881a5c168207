"""Skills: tools the model or a client can call, the decoding side's other half (Visual ChatGPT, LLaVA-Plus).

One registry, :data:`SKILLS` (name -> skill class); :func:`get_skill` looks one up, :func:`build_skill` builds it
with its heavy parts passed in. Every skill is typed (a pydantic parameter model whose JSON schema the model and
clients see), runs on the request's media, and returns a :class:`SkillResult` (text for the model, boxes, masks,
media, data, or an error: a failing call never raises). Built-ins, all offline:

============== ====== ========================================================= =============================
name           weight model / algorithm                                         returns
============== ====== ========================================================= =============================
detect         light  OpenCV Haar cascades (faces, eyes, cat faces, bodies...)  boxes
ocr            heavy  PP-OCR det + rec ONNX (rapidocr-onnxruntime 1.4.4)        boxes, lines of text
segment        light  OpenCV GrabCut, box -> mask                               masks (COCO RLE)
generate_image heavy  the preset's image decoder through its own text encoder   image
generate_audio heavy  the preset's audio decoder through its own text encoder   audio
generate_video heavy  the preset's video decoder through its own text encoder   video
detect_objects gpu    OWL-ViT (transformers) by hub id or folder, strict load   boxes with scores
transcribe     heavy  pocketsphinx 5.1.1 (en-us model in the wheel) or Whisper  transcript, segment/word times
synthesize_    light  flite / espeak-ng programs, or VITS (transformers);       audio (24 kHz mono speech)
speech                named voices (OpenAI's names too), sentence by sentence
============== ====== ========================================================= =============================

Speech: :mod:`skills.asr` (recognisers, :data:`ASR_BACKENDS`) and :mod:`skills.tts` (voices, :data:`TTS_BACKENDS`,
the sentence-by-sentence :class:`Synthesizer`) are also used directly by the speech server (``services.speech``).

Importing this package imports neither torch nor OpenCV nor onnxruntime nor pocketsphinx (the HTTP ingress lists
the skills' schemas): each skill imports its libraries when it first runs.
"""

from __future__ import annotations

from typing import Any

from skills.base import (
    MAX_IMAGE_PIXELS,
    Skill,
    SkillError,
    SkillLoadError,
    SkillParams,
    SkillResult,
    SkillSpec,
    images,
    input_image,
)
from skills.asr import ASR_BACKENDS, Transcript, TranscribeParams, TranscribeSkill
from skills.detect import CASCADES, DetectParams, DetectSkill
from skills.generate import GenerateAudioSkill, GenerateImageSkill, GenerateParams, GenerateVideoSkill
from skills.masks import SkillMask, decode_rle, draw_masks, encode_rle, mask_iou
from skills.objects import OBJECT_DETECTORS, DetectObjectsParams, DetectObjectsSkill
from skills.ocr import OcrParams, OcrSkill
from skills.segment import SegmentParams, SegmentSkill
from skills.tts import TTS_BACKENDS, SpeakParams, Synthesizer, SynthesizeSpeechSkill, Voice

SKILLS: dict[str, type[Skill]] = {
    cls.name: cls
    for cls in (DetectSkill, OcrSkill, SegmentSkill, GenerateImageSkill, GenerateAudioSkill, GenerateVideoSkill,
                DetectObjectsSkill, TranscribeSkill, SynthesizeSpeechSkill)
}


def get_skill(name: str) -> type[Skill]:
    """The registered skill class called ``name`` (its ``spec()`` needs no model).

    Raises:
        ValueError: unknown name (lists the choices).
    """
    try:
        return SKILLS[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown skill {name!r}; choose from: {', '.join(SKILLS)}") from None


def build_skill(name: str, **parts: Any) -> Skill:
    """Build skill ``name`` with its heavy parts: ``decoder=`` for ``generate_*``, ``path=`` (and ``device=``,
    ``dtype=``) for ``detect_objects``; ``threads=`` optionally for ``ocr``; nothing for ``detect`` / ``segment``;
    optionally ``backend=``, ``model=``, ``device=`` (or a ready ``asr=``) for ``transcribe`` and ``backends=``,
    ``model=``, ``default_voice=`` (or a ready ``synthesizer=``) for ``synthesize_speech``.

    Raises:
        ValueError: unknown name (lists the choices), or a decoder of the wrong modality.
        TypeError: parts the skill does not take, or a required part missing.
        SkillLoadError: a model that cannot be loaded strictly.
    """
    return get_skill(name)(**parts)


def skill_specs(names: list[str] | None = None) -> list[SkillSpec]:
    """The specs of ``names`` (all registered skills when ``None``), in registry order.

    Raises:
        ValueError: an unknown name (lists the choices).
    """
    chosen = list(SKILLS) if names is None else [get_skill(n).name for n in names]
    return [SKILLS[n].spec() for n in SKILLS if n in chosen]


__all__ = [
    "ASR_BACKENDS",
    "CASCADES",
    "MAX_IMAGE_PIXELS",
    "OBJECT_DETECTORS",
    "SKILLS",
    "DetectObjectsParams",
    "DetectObjectsSkill",
    "DetectParams",
    "DetectSkill",
    "GenerateAudioSkill",
    "GenerateImageSkill",
    "GenerateParams",
    "GenerateVideoSkill",
    "OcrParams",
    "OcrSkill",
    "SegmentParams",
    "SegmentSkill",
    "Skill",
    "SkillError",
    "SkillLoadError",
    "SkillMask",
    "SkillParams",
    "SkillResult",
    "SkillSpec",
    "SpeakParams",
    "SynthesizeSpeechSkill",
    "Synthesizer",
    "TTS_BACKENDS",
    "Transcript",
    "TranscribeParams",
    "TranscribeSkill",
    "Voice",
    "build_skill",
    "decode_rle",
    "draw_masks",
    "encode_rle",
    "get_skill",
    "images",
    "input_image",
    "mask_iou",
    "skill_specs",
]
