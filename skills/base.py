"""The skill contract: typed parameters in, a :class:`SkillResult` out, failures as results.

A skill is a class with a ``name``, a ``description``, a pydantic parameter model ``Params`` (its JSON schema is
what the model and clients see), what it ``accepts`` from the request (``"text"`` arguments, ``"image"`` /
``"audio"`` / ``"video"`` media) and what it ``returns`` (``"text"``, ``"boxes"``, ``"masks"``, ``"image"`` /
``"audio"`` / ``"video"`` media, ``"data"``), and a ``weight`` telling the graph where it belongs (``light``:
milliseconds on a CPU, may share a server; ``heavy``: a model worth a replica of its own; ``gpu``: wants an
accelerator). Heavy parts (decoders, model folders) are passed to the constructor, so tests need no Ray.

:meth:`Skill.run` never raises for a bad call or a failed model: invalid arguments, an unusable input image and a
failing model all come back as a result with ``error`` set (and ``error_code`` saying which). Programming errors
(``TypeError``, ``AttributeError``, ``KeyError``, ``IndexError``...) do propagate.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, ValidationError

from polymodal.grounding.boxes import GroundedPhrase
from polymodal.modality import Modality
from polymodal.types import MediaPart
from skills.masks import SkillMask

if TYPE_CHECKING:  # decoders import torch; a result only carries their media
    from decoders.media import Medium

SkillIO = Literal["text", "image", "audio", "video", "boxes", "masks", "data"]
SkillWeight = Literal["light", "heavy", "gpu"]

# the largest input image a skill accepts (pixels): bounds memory and time of one call
MAX_IMAGE_PIXELS = 4096 * 4096


class SkillError(Exception):
    """An expected failure of one call (bad input, a model that cannot answer); becomes an error result.

    Attributes:
        code: one of :data:`SkillResult.ERROR_CODES`.
    """

    def __init__(self, message: str, code: str = "failed"):
        super().__init__(message)
        self.code = code


class SkillLoadError(RuntimeError):
    """A skill's model could not be loaded (missing folder, missing or unexpected weights, unknown type).
    Raised by constructors: a skill that cannot load refuses to exist, as decoders do."""


class SkillParams(BaseModel):
    """Base of every skill's parameter model: unknown fields are an error (a typo is not silently dropped)."""

    model_config = ConfigDict(extra="forbid", frozen=True)


@dataclass(frozen=True, eq=False)
class SkillResult:
    """What one skill call returns.

    Attributes:
        skill: the skill's name.
        text: a short summary for the model to read as the skill_result turn (also set on error: the message).
        boxes: boxes in pixels of the input image (``phrase`` = the label or the text read; ``raw`` is ``""``).
        masks: masks of the input image (COCO uncompressed RLE, see :mod:`skills.masks`).
        media: generated media (image uint8 (H, W, 3), audio float32 (S,), video uint8 (F, H, W, 3)).
        data: JSON-able structured output (per-box scores, lines read, settings used...).
        error: ``None`` on success; else a message saying what went wrong and what to change.
        error_code: ``None``, or ``"invalid_arguments"`` (the parameters do not validate), ``"invalid_input"``
            (a missing or unusable image / medium), ``"failed"`` (the model or algorithm failed).
        elapsed_s: wall time of the call.
    """

    ERROR_CODES: ClassVar[tuple[str, ...]] = ("invalid_arguments", "invalid_input", "failed", "unknown_skill")

    skill: str
    text: str
    boxes: tuple[GroundedPhrase, ...] = ()
    masks: tuple[SkillMask, ...] = ()
    media: tuple["Medium", ...] = ()
    data: Mapping[str, Any] = field(default_factory=dict)
    error: str | None = None
    error_code: str | None = None
    elapsed_s: float = 0.0

    @property
    def ok(self) -> bool:
        return self.error is None

    @classmethod
    def failure(cls, skill: str, message: str, code: str = "failed", *, elapsed_s: float = 0.0) -> "SkillResult":
        """An error result (``text`` repeats the message so the model reads it).

        Raises:
            ValueError: an unknown ``code``.
        """
        if code not in cls.ERROR_CODES:
            raise ValueError(f"unknown error code {code!r}; choose from: {', '.join(cls.ERROR_CODES)}")
        return cls(skill=skill, text=f"error: {message}", error=message, error_code=code, elapsed_s=elapsed_s)

    def to_dict(self) -> dict:
        """JSON-able form (media described by modality, shape, seed; their bytes travel as media parts)."""
        return {
            "skill": self.skill,
            "text": self.text,
            "boxes": [{"label": b.phrase, "box_px": [float(v) for v in b.box_px], "image_index": b.image_index}
                      for b in self.boxes],
            "masks": [m.to_dict() for m in self.masks],
            "media": [{"modality": Modality.parse(m.modality).value, "shape": list(m.data.shape), "seed": m.seed}
                      for m in self.media],
            "data": dict(self.data),
            "error": self.error,
            "error_code": self.error_code,
            "elapsed_s": round(self.elapsed_s, 6),
        }


@dataclass(frozen=True)
class SkillSpec:
    """What the model and clients see of a skill (``GET /v1/skills``).

    Attributes:
        parameters: the JSON schema (draft 2020-12, pydantic's) of the arguments.
    """

    name: str
    description: str
    parameters: dict
    accepts: tuple[str, ...]
    returns: tuple[str, ...]
    weight: str

    def to_dict(self) -> dict:
        return {"name": self.name, "description": self.description, "parameters": self.parameters,
                "accepts": list(self.accepts), "returns": list(self.returns), "weight": self.weight}

    def as_openai_tool(self) -> dict:
        """The skill as an OpenAI ``tools`` entry (``{"type": "function", "function": {...}}``)."""
        return {"type": "function",
                "function": {"name": self.name, "description": self.description, "parameters": self.parameters}}


class Skill:
    """Base class: subclasses set the class attributes and implement :meth:`_run`.

    Thread safety: :meth:`run` may be called from several threads; each skill guards whatever it shares.
    """

    name: ClassVar[str]
    description: ClassVar[str]
    Params: ClassVar[type[SkillParams]]
    accepts: ClassVar[tuple[SkillIO, ...]] = ()
    returns: ClassVar[tuple[SkillIO, ...]] = ("text",)
    weight: ClassVar[SkillWeight] = "light"

    @classmethod
    def spec(cls) -> SkillSpec:
        return SkillSpec(cls.name, cls.description, cls.Params.model_json_schema(), tuple(cls.accepts),
                         tuple(cls.returns), cls.weight)

    @classmethod
    def parse(cls, arguments: Mapping[str, Any] | str | SkillParams | None) -> SkillParams:
        """Validate arguments: a mapping, a JSON object string (a tool call's ``arguments``), or ``Params``.

        Raises:
            ValueError: not a JSON object, or the parameters do not validate (pydantic's message, which
                lists the allowed values of a choice).
        """
        if isinstance(arguments, cls.Params):
            return arguments
        if arguments is None or arguments == "":
            arguments = {}
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments)
            except json.JSONDecodeError as e:
                raise ValueError(f"{cls.name}: arguments are not valid JSON ({e})") from None
        if not isinstance(arguments, Mapping):
            raise ValueError(f"{cls.name}: arguments must be a JSON object, got {type(arguments).__name__}")
        try:
            return cls.Params.model_validate(dict(arguments))
        except ValidationError as e:
            raise ValueError(f"{cls.name}: invalid arguments: {_validation_message(e)}") from None

    def run(self, arguments: Mapping[str, Any] | str | SkillParams | None = None,
            media: Sequence[MediaPart] = ()) -> SkillResult:
        """Run once.

        Args:
            arguments: the parameters (see :meth:`parse`).
            media: the request's media in message order; skills pick images by ``image_index`` (0-based among
                the image parts).
        Returns:
            The result; invalid arguments, an unusable input and a failing model give an error result.
        """
        t0 = time.perf_counter()
        try:
            params = self.parse(arguments)
        except ValueError as e:
            return SkillResult.failure(self.name, str(e), "invalid_arguments", elapsed_s=time.perf_counter() - t0)
        try:
            result = self._run(params, tuple(media))
        except SkillError as e:
            return SkillResult.failure(self.name, str(e), e.code, elapsed_s=time.perf_counter() - t0)
        except (ValueError, RuntimeError, MemoryError) as e:  # a library refusing this input or failing on it
            return SkillResult.failure(self.name, f"{type(e).__name__}: {e}", "failed",
                                       elapsed_s=time.perf_counter() - t0)
        except Exception as e:
            if _is_cv2_error(e):
                return SkillResult.failure(self.name, f"OpenCV: {str(e).strip()}", "failed",
                                           elapsed_s=time.perf_counter() - t0)
            raise
        return _with_elapsed(result, time.perf_counter() - t0)

    def _run(self, params: SkillParams, media: tuple[MediaPart, ...]) -> SkillResult:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, weight={self.weight!r})"


def _with_elapsed(result: SkillResult, elapsed_s: float) -> SkillResult:
    from dataclasses import replace

    return replace(result, elapsed_s=elapsed_s)


def _is_cv2_error(e: Exception) -> bool:
    return type(e).__module__.startswith("cv2") and type(e).__name__ == "error"


def _validation_message(e: ValidationError) -> str:
    parts = []
    for err in e.errors(include_url=False):
        where = ".".join(str(p) for p in err.get("loc", ())) or "arguments"
        parts.append(f"{where}: {err.get('msg', '')}")
    return "; ".join(parts)


def images(*arrays: np.ndarray) -> tuple[MediaPart, ...]:
    """Wrap uint8 (H, W, 3) arrays as image :class:`MediaPart` s (for tests, benches, the CLI)."""
    return tuple(MediaPart(Modality.IMAGE, np.asarray(a)) for a in arrays)


def input_image(media: Sequence[MediaPart], image_index: int, *, min_side_px: int = 1) -> np.ndarray:
    """The ``image_index``-th image of ``media`` as a C-contiguous uint8 (H, W, 3) array.

    Raises:
        SkillError: (``invalid_input``) no such image, or one that is not uint8 (H, W, 3), has a side below
            ``min_side_px`` or more than :data:`MAX_IMAGE_PIXELS` pixels.
    """
    imgs = [p for p in media if Modality.parse(p.modality) is Modality.IMAGE]
    if not imgs:
        raise SkillError("this skill needs an image and the request has none", "invalid_input")
    if not 0 <= image_index < len(imgs):
        raise SkillError(f"image_index {image_index} is out of range: the request has {len(imgs)} image(s) "
                         f"(0..{len(imgs) - 1})", "invalid_input")
    a = np.asarray(imgs[image_index].data)
    if a.dtype != np.uint8 or a.ndim != 3 or a.shape[2] != 3:
        raise SkillError(f"image {image_index} must be uint8 (H, W, 3), got {a.dtype} {a.shape}", "invalid_input")
    h, w = a.shape[:2]
    if min(h, w) < min_side_px:
        raise SkillError(f"image {image_index} is {w}x{h} px; this skill needs at least {min_side_px} px a side",
                         "invalid_input")
    if h * w > MAX_IMAGE_PIXELS:
        raise SkillError(f"image {image_index} is {w}x{h} px, over the limit of {MAX_IMAGE_PIXELS} pixels",
                         "invalid_input")
    return np.ascontiguousarray(a)
