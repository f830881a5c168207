"""Media files <-> arrays: the shared part of every modality's codec, and the one entry to decode an input.

Each modality's :class:`MediaCodec` lives in its own module with its :class:`~polymodal.modality.ModalitySpec`
(:mod:`polymodal.media.image`, :mod:`~polymodal.media.audio`, :mod:`~polymodal.media.video`) and is reached through
the registry (``modality.spec.codec``); this module holds what they share: the limits (:class:`MediaLimits`), the
error (:class:`MediaError`), the decode options, sniffing a file's medium, the MIME type -> modality map, data URLs,
and :func:`decode_media` (any registered modality). No torch import: the HTTP ingress decodes its inputs here.

Outputs (what :class:`polymodal.types.MediaPart` carries) are the codec's, for the built-ins:

- image: ``uint8 (H, W, 3)`` RGB, EXIF orientation applied, transparency composited on white.
- audio: ``float32 (S,)`` mono at ``sample_rate_hz`` (channels averaged, resampled with soxr "HQ").
- video: ``uint8 (F, H, W, 3)`` RGB frames sampled evenly over the duration, and the source frame rate.

Every failure caused by the input raises :class:`MediaError` whose ``code`` is ``"corrupt"``, ``"too_large"`` or
``"unsupported"`` (the HTTP layer maps ``too_large`` to 413 and the others to 400) and whose message begins with the
medium ("image", "audio", "video"). Limits are checked from headers *before* pixels or samples are decoded.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from polymodal.config import MAX_INPUT_VIDEO_FRAMES
from polymodal.modality import Modality
from polymodal.types import MediaPart

MediaErrorCode = Literal["corrupt", "too_large", "unsupported"]

@dataclass(frozen=True)
class MediaLimits:
    """Limits on decoded inputs; exceeding one raises :class:`MediaError` with code ``"too_large"``.

    Attributes:
        max_bytes: size of the encoded file (20 MiB).
        max_pixels: width * height of an image (4096 * 4096). Checked from the header, before decoding, so it
            also guards against decompression bombs.
        max_audio_duration_s: length of an audio input (60 s).
        max_audio_channels: channels of an audio input (8).
        max_video_duration_s: length of a video input (120 s).
        max_video_frame_pixels: width * height of a video frame (3840 * 2160).
        max_video_frames_sampled: most frames a video input may be asked to sample (8).
    """

    max_bytes: int = 20 * 1024 * 1024
    max_pixels: int = 4096 * 4096
    max_audio_duration_s: float = 60.0
    max_audio_channels: int = 8
    max_video_duration_s: float = 120.0
    max_video_frame_pixels: int = 3840 * 2160
    max_video_frames_sampled: int = MAX_INPUT_VIDEO_FRAMES


DEFAULT_LIMITS = MediaLimits()


class MediaError(ValueError):
    """An input medium cannot be used.

    Attributes:
        modality: the medium (``None`` when unknown, e.g. a data URL with a non-media MIME type).
        code: ``"corrupt"`` (unreadable, truncated, malformed), ``"too_large"`` (a :class:`MediaLimits` limit) or
            ``"unsupported"`` (readable but of a kind we do not take).
        http_status: 413 for ``too_large``, else 400.
    """

    def __init__(self, modality: Modality | None, code: MediaErrorCode, message: str):
        self.modality = modality
        self.code = code
        self.detail = message
        medium = modality.value if modality is not None else "media"
        super().__init__(f"{medium}: {message}")

    @property
    def http_status(self) -> int:
        return 413 if self.code == "too_large" else 400


@dataclass(frozen=True)
class DecodeOptions:
    """How an input is decoded (each codec reads what applies to it).

    Attributes:
        sample_rate_hz: audio: the rate samples are resampled to (e.g. 16000; CLAP wants 48000).
        num_frames: video: F, frames sampled evenly over the duration.
        size_px: video: scale frames so their shorter side is this (``None``: the source size).
        sound_track: video: also decode the first audio stream, mono float32 at 16 kHz, into the part's
            ``sound_track`` (:func:`polymodal.media.video.decode_sound_track`; no audio stream: ``None``).
    """

    sample_rate_hz: int = 16000
    num_frames: int = 8
    size_px: int | None = None
    sound_track: bool = False


class MediaCodec:
    """The file side of one modality: input files -> arrays, rendered arrays -> a file.

    One instance per modality, held by its :class:`~polymodal.modality.ModalitySpec` (``spec.codec``). Torch-free.
    The defaults make a codec that reads no input files and writes nothing; a modality overrides what it has.

    Attributes:
        mime_type: MIME type of the files :meth:`encode` writes (``image/png``).
        ext: their extension, without dot (``png``).
    """

    mime_type: str = "application/octet-stream"
    ext: str = "bin"

    def sniff(self, head: bytes) -> bool:
        """Whether the first bytes of a file (up to 64) are this medium's (magic numbers). Codecs are asked in
        registration order; the first that says yes names the medium (:func:`sniff_modality`)."""
        return False

    def decode(self, data: bytes, *, limits: MediaLimits, options: DecodeOptions, name: str | None = None):
        """An input file -> a :class:`polymodal.types.MediaPart` of this modality.

        Raises:
            MediaError: ``corrupt``, ``unsupported`` (also: this modality takes no input files), ``too_large``.
        """
        raise MediaError(self.modality, "unsupported", "this medium is not read from files")

    def validate(self, data: Any, meta: Mapping[str, Any]) -> None:
        """Check a rendered medium's array and metadata (``sample_rate_hz``, ``fps``, ``crf``: what applies).

        Raises:
            ValueError: wrong dtype / shape, or missing metadata.
        """

    def encode(self, data: Any, meta: Mapping[str, Any]) -> tuple[bytes, str, str]:
        """A rendered medium -> ``(file bytes, mime type, extension)``."""
        raise NotImplementedError(f"{type(self).__name__} writes no files")

    def output_types(self) -> dict[str, str]:
        """MIME type -> extension (no dot) of every kind of file :meth:`encode` writes (default: the one,
        ``{mime_type: ext}``); a codec writing several (3D: PLY point clouds, GLB meshes) lists each."""
        return {self.mime_type: self.ext}

    def extension(self, mime_type: str) -> str:
        """The extension of this codec's files of ``mime_type``: an artifact's name follows its type.

        Raises:
            ValueError: a type this codec does not write (lists the ones it does).
        """
        types = self.output_types()
        if mime_type not in types:
            raise ValueError(f"{type(self).__name__} writes no {mime_type!r} files; choose from: {', '.join(types)}")
        return types[mime_type]

    def duration_s(self, data: Any, meta: Mapping[str, Any]) -> float | None:
        """Length of a rendered medium in seconds (``None``: not a timed medium)."""
        return None

    def degenerate(self, data: Any) -> str | None:
        """Why a rendered array is unusable although finite (``"all black"``, ``"silent audio"``), or ``None``."""
        return None

    @property
    def modality(self) -> Modality | None:
        """The registered modality whose spec holds this codec (``None`` before registration)."""
        return next((m for m in Modality if m.spec.codec is self), None)


def check_bytes(modality: Modality, data: bytes, limits: MediaLimits) -> None:
    """An input file's size against ``limits.max_bytes`` (and not empty).

    Raises:
        TypeError: not bytes. MediaError: ``corrupt`` (empty), ``too_large``.
    """
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise TypeError(f"{modality.value}: expected bytes, got {type(data).__name__}")
    if len(data) == 0:
        raise MediaError(modality, "corrupt", "the file is empty")
    if len(data) > limits.max_bytes:
        raise MediaError(
            modality, "too_large", f"the file is {len(data)} bytes; the limit is {limits.max_bytes} bytes"
        )


def wrong_medium(expected: Modality, data: bytes) -> None:
    """Raise ``unsupported`` when the bytes are recognisably another medium.

    Raises:
        MediaError: ``unsupported`` naming both media.
    """
    found = sniff_modality(data)
    if found is not None and found != expected:
        raise MediaError(expected, "unsupported", f"expected {expected.value} data, got {found.value} data")


# --------------------------------------------------------------------------------------------------------- sniffing
def sniff_modality(data: bytes) -> Modality | None:
    """Guess the medium of a file from its first bytes (magic numbers); ``None`` when unknown.

    Each registered codec is asked (:meth:`MediaCodec.sniff`), in registration order. Built-ins: images PNG, JPEG,
    GIF, WebP, BMP, TIFF, HEIF/AVIF; audio WAV, FLAC, Ogg (Vorbis/Opus), MP3, M4A; video MP4/MOV (ISO BMFF other
    than audio/image brands), WebM/Matroska, Ogg Theora.
    """
    head = bytes(data[:64])
    return next((m for m in Modality if m.spec.codec.sniff(head)), None)


# ------------------------------------------------------------------------------------------------------- data URLs
_DATA_URL = re.compile(
    r"^data:(?P<mime>[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]*/[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]*)"
    r"(?P<params>(?:;[A-Za-z0-9!#$&^_.+-]+=[^;,]*)*);base64,(?P<payload>[A-Za-z0-9+/]*={0,2})$"
)
_MIME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]*/[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]*$")


def modality_of_mime(mime: str) -> Modality | None:
    """The medium of a MIME type by the specs' ``input_mime_types`` (``image/*`` matches ``image/png``; case and
    parameters ignored): ``image/png`` -> image, ``audio/x-wav`` -> audio; ``None`` for another type
    (``text/plain``, ``application/octet-stream``). The one mime -> modality map: data URLs here and the HTTP
    ingress both ask it."""
    mime = mime.split(";", 1)[0].strip().lower()
    top = mime.split("/", 1)[0] + "/*"
    return next((m for m in Modality if mime in m.spec.input_mime_types or top in m.spec.input_mime_types), None)


def encode_data_url(data: bytes, mime: str) -> str:
    """``data:<mime>;base64,<payload>`` (RFC 2397).

    Raises:
        ValueError: ``mime`` is not of the form ``type/subtype``.
    """
    if not _MIME.match(mime):
        raise ValueError(f"invalid MIME type {mime!r}; expected 'type/subtype', e.g. 'image/png'")
    return f"data:{mime};base64,{base64.b64encode(bytes(data)).decode('ascii')}"


def parse_data_url(url: str, *, limits: MediaLimits = DEFAULT_LIMITS) -> tuple[str, bytes]:
    """Parse a base64 data URL strictly: ``data:<type>/<subtype>[;k=v]*;base64,<payload>``.

    The payload must be canonical base64 (no whitespace, correct padding). Its decoded size is checked against
    ``limits.max_bytes`` before decoding.

    Returns:
        (lower-cased MIME type without parameters, decoded bytes).

    Raises:
        MediaError: ``unsupported`` (not a data URL, e.g. http(s)://, or not base64), ``corrupt`` (malformed or
            bad base64), ``too_large`` (payload over ``max_bytes``); ``modality`` from the MIME type when known.
    """
    if not isinstance(url, str):
        raise MediaError(None, "corrupt", f"expected a data URL string, got {type(url).__name__}")
    if not url.startswith("data:"):
        scheme = url.split(":", 1)[0][:16] if ":" in url else "none"
        raise MediaError(None, "unsupported", f"only base64 data URLs are accepted (got scheme {scheme!r})")
    head = url[5:].split(",", 1)[0]
    mime = head.split(";", 1)[0].strip().lower()
    modality = modality_of_mime(mime) if _MIME.match(mime) else None
    if "," in url and ";base64" not in head.lower():
        raise MediaError(modality, "unsupported", "the data URL is not base64-encoded (';base64,' missing)")
    m = _DATA_URL.match(url) if "," in url else None
    if m is None:
        raise MediaError(
            modality, "corrupt", "malformed data URL; expected 'data:<type>/<subtype>;base64,<payload>'"
        )
    payload = m.group("payload")
    if len(payload) * 3 // 4 > limits.max_bytes:
        raise MediaError(
            modality, "too_large", f"about {len(payload) * 3 // 4} bytes; the limit is {limits.max_bytes} bytes"
        )
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as e:
        raise MediaError(modality, "corrupt", f"invalid base64 payload in data URL ({e})") from None
    return m.group("mime").lower(), data


# ---------------------------------------------------------------------------------------------------- one entry
def decode_media(
    modality: Modality | str,
    data: bytes,
    *,
    limits: MediaLimits = DEFAULT_LIMITS,
    sample_rate_hz: int = 16000,
    num_frames: int = 8,
    size_px: int | None = None,
    sound_track: bool = False,
    name: str | None = None,
) -> MediaPart:
    """Decode one medium into a :class:`polymodal.types.MediaPart` with its modality's codec.

    Args:
        sample_rate_hz / num_frames / size_px / sound_track: the :class:`DecodeOptions` (audio rate; video frames,
            size and sound track).

    Raises:
        MediaError: see the codec (:func:`polymodal.media.image.decode_image`, ``audio.decode_audio``,
            ``video.decode_video``).
        ValueError: unknown modality (lists the choices).
    """
    modality = Modality.parse(modality)
    options = DecodeOptions(sample_rate_hz=sample_rate_hz, num_frames=num_frames, size_px=size_px,
                            sound_track=sound_track)
    return modality.spec.codec.decode(data, limits=limits, options=options, name=name)
