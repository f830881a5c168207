"""The shared vocabulary: media modalities, each described by one registered :class:`ModalitySpec`.

``Modality`` is an *open, registered* value type, not an ``Enum``: a modality is added by registering its spec
(:func:`register_modality`), without editing a product file, and every per-modality fact (signal-token prefix and
default count, input markers, the API's content-part key and answer field, MIME types and file codec, the decoder
options that apply, the conditioning normalisation) is read from that spec instead of being branched on.

- ``Modality("image")`` / ``Modality.parse("Image")`` return the one registered instance, so ``is`` comparisons and
  dict keys work; an unknown name raises ``ValueError`` listing the choices.
- ``Modality.IMAGE`` / ``.AUDIO`` / ``.VIDEO`` are the built-ins (:mod:`polymodal.media` registers them when the
  ``polymodal`` package is imported); ``for m in Modality``, ``len(Modality)`` and ``m in Modality`` follow the
  registration order.
- A modality is a ``str`` (``Modality.IMAGE == "image"``; ``m.value == str(m)``; ``m.name == "IMAGE"``), pickles
  by name (a Ray worker gets its own interned instance: register a plug-in modality in the worker too), and
  validates from / serialises to a plain string in pydantic models (``dict[Modality, X]`` round-trips through
  YAML and JSON; the JSON schema lists the registered names).

This module is the bottom layer: it imports nothing of the project.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar

# Every field of polymodal.config.DecoderDefaults that a modality may declare in ModalitySpec.option_fields.
DECODER_OPTION_FIELDS = ("num_inference_steps", "guidance_scale", "height_px", "width_px", "num_frames", "fps",
                         "duration_s", "crf", "strength", "image_guidance_scale")


@dataclass(frozen=True)
class ModalitySpec:
    """Every fact about one modality (frozen; registered with :func:`register_modality`).

    Attributes:
        name: the registry key and wire name, lower-case (``"image"``): request ``modalities``, preset YAML keys,
            file names (``output_image.safetensors``), the chat request's per-medium options field.
        label: how an answer's text refers to a medium (``"image"`` -> ``image 1``).
        noun: the word prose uses for one medium (``"photo"``, ``"sound clip"``): MosIT's writer and phrasings.
        signal_prefix: signal-token prefix (``"IMG"`` -> ``<IMG0>..``).
        default_signal_count: N, tokens of one signal group when a preset does not say (NExT-GPT: 4 / 8 / 24).
        input_markers: (begin, end) marker strings around an input medium's embeddings in the prompt.
        content_part: the request content-part type that carries this medium (``"image_url"``), also the key of the
            ordered media parts of an answer.
        answer_field: the message / delta array of generated media of this modality (``"images"``).
        inline_markdown: referenced in an answer's text as ``![image 1](url)`` (True) or ``[audio 1](url)``.
        message_slot: an OpenAI message field the first generated medium of this modality also fills (``"audio"``:
            ``message.audio`` / ``delta.audio``), or ``None``.
        input_mime_types: MIME types read as this modality: ``"image/*"`` (a top-level type) or exact types.
        file_extensions: file extensions (lower-case, with the dot) of this modality's files (catalogs, inputs).
        option_fields: the fields of ``polymodal.config.DecoderDefaults`` that apply to this modality's decoder
            (the request's options of this medium, the one-medium endpoints). ``strength`` among them: its
            decoders can edit a medium (render from a source, issue #27): image and video, not audio.
        normalize_cond: the output projector L2-normalises its conditioning (AudioLDM's CLAP class labels).
        in_default_signals: a preset whose ``signals.counts`` is not given gets this modality's signal tokens
            (NExT-GPT's image, audio and video). ``False`` for a modality added later: a preset gets its tokens only
            by listing it or decoding it, so presets written before it keep their token rows (and their trained
            embedding rows and projectors).
        codec: the :class:`polymodal.media_io.MediaCodec` of this modality (decode input files, validate and encode
            rendered arrays). Torch-free: the HTTP ingress decodes inputs through it.

    Raises:
        ValueError: a malformed name, prefix, count, marker pair or option field (at construction).
    """

    name: str
    label: str
    noun: str
    signal_prefix: str
    default_signal_count: int
    input_markers: tuple[str, str]
    content_part: str
    answer_field: str
    codec: Any = field(compare=False)
    inline_markdown: bool = False
    message_slot: str | None = None
    input_mime_types: tuple[str, ...] = ()
    file_extensions: tuple[str, ...] = ()
    option_fields: tuple[str, ...] = ("num_inference_steps", "guidance_scale")
    normalize_cond: bool = False
    in_default_signals: bool = True

    def __post_init__(self) -> None:
        if not self.name or not self.name.isidentifier() or self.name != self.name.lower() or self.name == "text":
            raise ValueError(f"modality name {self.name!r} must be a lower-case identifier other than 'text'")
        if not self.signal_prefix or not self.signal_prefix.isalnum():
            raise ValueError(f"{self.name}: signal_prefix {self.signal_prefix!r} must be alphanumeric")
        if self.default_signal_count < 1:
            raise ValueError(f"{self.name}: default_signal_count must be >= 1, got {self.default_signal_count}")
        if len(self.input_markers) != 2 or not all(self.input_markers):
            raise ValueError(f"{self.name}: input_markers must be a (begin, end) pair of strings")
        unknown = [f for f in self.option_fields if f not in DECODER_OPTION_FIELDS]
        if unknown:
            raise ValueError(f"{self.name}: unknown option fields {unknown}; choose from: "
                             f"{', '.join(DECODER_OPTION_FIELDS)}")

    @property
    def tag(self) -> str:
        """The capitalised name MosIT / NExT-GPT data formats write in tags (``<Image> ... </Image>``)."""
        return self.name.capitalize()

    def reference(self, number: int, url: str) -> str:
        """How an answer's text refers to its medium ``number`` (1-based) at ``url``: ``![image 1](url)`` or
        ``[audio 1](url)``."""
        return f"{'!' if self.inline_markdown else ''}[{self.label} {number}]({url})"


class _ModalityMeta(type):
    """Iteration, length and membership over the registered modalities (in registration order)."""

    def __iter__(cls) -> Iterator["Modality"]:
        return iter(list(_BY_NAME.values()))

    def __len__(cls) -> int:
        return len(_BY_NAME)

    def __contains__(cls, item: object) -> bool:
        return isinstance(item, str) and str.__str__(item) in _BY_NAME

    def __getattr__(cls, attr: str) -> "Modality":
        # Modality.IMAGE, or a plug-in modality by its upper-case name: the registered modality of that name
        if attr.isupper() and attr.lower() in _BY_NAME:
            return _BY_NAME[attr.lower()]
        raise AttributeError(f"type object 'Modality' has no attribute {attr!r}")


class Modality(str, metaclass=_ModalityMeta):
    """A non-text medium the model reads or produces: a registered name, interned (see the module docstring).

    Per-modality parts of the system live in ``dict[Modality, ...]`` and per-modality facts in :attr:`spec`;
    never three copied blocks, never ``if modality is Modality.X``.
    """

    __slots__ = ()

    IMAGE: ClassVar["Modality"]
    AUDIO: ClassVar["Modality"]
    VIDEO: ClassVar["Modality"]

    def __new__(cls, value: "str | Modality") -> "Modality":
        if isinstance(value, Modality):
            return value
        found = _BY_NAME.get(value) if isinstance(value, str) else None
        if found is None:
            raise ValueError(f"unknown modality {value!r}; choose from: {', '.join(_BY_NAME)}")
        return found

    @classmethod
    def _intern(cls, name: str) -> "Modality":
        return str.__new__(cls, name)

    # ---- compatibility with the former Enum -------------------------------------------------------------
    @property
    def value(self) -> str:
        """The name as a plain ``str`` (``"image"``)."""
        return str.__str__(self)

    @property
    def name(self) -> str:
        """Upper-case (``"IMAGE"``), as the class attribute."""
        return str.__str__(self).upper()

    @property
    def spec(self) -> ModalitySpec:
        """This modality's registered :class:`ModalitySpec`."""
        return _SPECS[str.__str__(self)]

    def __str__(self) -> str:
        return str.__str__(self)

    def __format__(self, format_spec: str) -> str:
        return format(str.__str__(self), format_spec)

    def __repr__(self) -> str:
        return f"Modality.{self.name}"

    def __reduce__(self):
        return Modality, (str.__str__(self),)

    def __copy__(self) -> "Modality":
        return self

    def __deepcopy__(self, memo) -> "Modality":
        return self

    # ---- parsing ---------------------------------------------------------------------------------------------
    @classmethod
    def parse(cls, value: "str | Modality") -> "Modality":
        """Parse a registered name (case-insensitive, surrounding spaces ignored).

        Raises:
            ValueError: naming the valid choices.
        """
        if isinstance(value, Modality):
            return value
        try:
            return cls(str(value).strip().lower())
        except ValueError:
            raise ValueError(f"unknown modality {value!r}; choose from: {', '.join(_BY_NAME)}") from None

    @classmethod
    def parse_list(cls, value: str | list[str] | None) -> list["Modality"]:
        """Parse a comma-separated string or list, keeping order and dropping duplicates."""
        if value is None:
            return []
        items = value.split(",") if isinstance(value, str) else list(value)
        out: list[Modality] = []
        for item in items:
            if isinstance(item, str) and not item.strip():
                continue
            m = cls.parse(item)
            if m not in out:
                out.append(m)
        return out

    # ---- registry --------------------------------------------------------------------------------------------
    @classmethod
    def register(cls, spec: ModalitySpec) -> "Modality":
        """See :func:`register_modality`."""
        return register_modality(spec)

    # ---- pydantic ---------------------------------------------------------------------------------------------
    @classmethod
    def __get_pydantic_core_schema__(cls, source, handler):
        from pydantic_core import core_schema

        def validate(value: Any) -> "Modality":
            if isinstance(value, Modality):
                return value
            if not isinstance(value, str):
                raise ValueError(f"a modality is a string; choose from: {', '.join(_BY_NAME)}")
            return cls(value)

        return core_schema.no_info_plain_validator_function(
            validate,
            serialization=core_schema.plain_serializer_function_ser_schema(str, when_used="always"),
        )

    @classmethod
    def __get_pydantic_json_schema__(cls, schema, handler):
        # evaluated when the schema is built: the modalities registered then
        return {"type": "string", "enum": list(_BY_NAME)}


_BY_NAME: dict[str, Modality] = {}
_SPECS: dict[str, ModalitySpec] = {}


def register_modality(spec: ModalitySpec) -> Modality:
    """Register ``spec`` and return its interned :class:`Modality` (also ``Modality.<NAME>``).

    Registering the identical spec again is a no-op (idempotent imports); the same name with another spec is an
    error.

    Raises:
        ValueError: ``spec.name`` is registered with a different spec, or its signal prefix or content-part type
            or answer field is already another modality's.
        TypeError: ``spec`` is not a :class:`ModalitySpec`.
    """
    if not isinstance(spec, ModalitySpec):
        raise TypeError(f"register_modality takes a ModalitySpec, got {type(spec).__name__}")
    old = _SPECS.get(spec.name)
    if old is not None:
        if old == spec and type(old.codec) is type(spec.codec):
            return _BY_NAME[spec.name]
        raise ValueError(f"modality {spec.name!r} is already registered with another spec")
    for other in _SPECS.values():
        for attr in ("signal_prefix", "content_part", "answer_field"):
            if getattr(other, attr) == getattr(spec, attr):
                raise ValueError(f"modality {spec.name!r}: {attr} {getattr(spec, attr)!r} is already "
                                 f"{other.name}'s")
    m = Modality._intern(spec.name)
    _SPECS[spec.name] = spec
    _BY_NAME[spec.name] = m
    return m


def unregister_modality(modality: Modality | str) -> None:
    """Remove a registered modality (tests that register a plug-in modality call this in their teardown).

    Objects still holding the instance keep it; ``Modality(name)`` raises again.

    Raises:
        ValueError: an unknown modality.
    """
    m = Modality.parse(modality)
    del _BY_NAME[m.value]
    del _SPECS[m.value]


def modality_spec(modality: Modality | str) -> ModalitySpec:
    """The spec of a registered modality (``Modality.parse(modality).spec``).

    Raises:
        ValueError: an unknown modality (lists the choices).
    """
    return Modality.parse(modality).spec


def specs() -> tuple[ModalitySpec, ...]:
    """Every registered spec, in registration order."""
    return tuple(_SPECS.values())


def modality_of_content_part(part_type: str) -> Modality | None:
    """The modality whose :attr:`ModalitySpec.content_part` is ``part_type`` (``"image_url"`` -> image), or
    ``None``."""
    return next((m for m in _BY_NAME.values() if _SPECS[m.value].content_part == part_type), None)
