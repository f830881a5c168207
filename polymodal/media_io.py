"""Decoding of input media (bytes -> arrays) with libraries, under limits, with errors naming the medium.

Images with Pillow, audio with soundfile (libsndfile) and ``soxr``, video with PyAV (bundled ffmpeg). No torch
import: the HTTP ingress uses this module directly.

Outputs (what :class:`polymodal.types.MediaPart` carries):

- image: ``uint8 (H, W, 3)`` RGB, EXIF orientation applied, transparency composited on white.
- audio: ``float32 (S,)`` mono at ``target_sample_rate_hz`` (channels averaged, resampled with soxr "HQ").
- video: ``uint8 (F, H, W, 3)`` RGB frames sampled evenly over the duration (see :func:`decode_video`), and the
  source frame rate.

Every failure caused by the input raises :class:`MediaError` whose ``code`` is ``"corrupt"``, ``"too_large"`` or
``"unsupported"`` (the HTTP layer maps ``too_large`` to 413 and the others to 400) and whose message begins with the
medium ("image", "audio", "video"). Limits are checked from headers *before* pixels or samples are decoded.
"""

from __future__ import annotations

import base64
import binascii
import io
import re
import struct
import warnings
from dataclasses import dataclass
from fractions import Fraction
from typing import Literal

import numpy as np

from polymodal.config import MAX_INPUT_VIDEO_FRAMES
from polymodal.modality import Modality
from polymodal.types import MediaPart

MediaErrorCode = Literal["corrupt", "too_large", "unsupported"]

IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF")
"""Pillow formats :func:`decode_image` accepts (animated GIF/WebP: the first frame)."""

AUDIO_FORMATS = ("WAV", "FLAC", "OGG", "MP3")
"""libsndfile formats :func:`decode_audio` accepts (OGG: Vorbis or Opus)."""

VIDEO_FORMATS = ("mov,mp4,m4a,3gp,3g2,mj2", "matroska,webm")
"""ffmpeg demuxers :func:`decode_video` accepts (MP4/MOV and WebM/Matroska)."""


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
        max_video_frames_sampled: most frames :func:`decode_video` may be asked to sample (8).
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


IMAGE, AUDIO, VIDEO = Modality.IMAGE, Modality.AUDIO, Modality.VIDEO


def _check_bytes(modality: Modality, data: bytes, limits: MediaLimits) -> None:
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise TypeError(f"{modality.value}: expected bytes, got {type(data).__name__}")
    if len(data) == 0:
        raise MediaError(modality, "corrupt", "the file is empty")
    if len(data) > limits.max_bytes:
        raise MediaError(
            modality, "too_large", f"the file is {len(data)} bytes; the limit is {limits.max_bytes} bytes"
        )


def _wrong_medium(expected: Modality, data: bytes) -> None:
    """Raise ``unsupported`` when the bytes are recognisably another medium."""
    found = sniff_modality(data)
    if found is not None and found != expected:
        raise MediaError(expected, "unsupported", f"expected {expected.value} data, got {found.value} data")


# --------------------------------------------------------------------------------------------------------- sniffing
def sniff_modality(data: bytes) -> Modality | None:
    """Guess the medium of a file from its first bytes (magic numbers); ``None`` when unknown.

    Images: PNG, JPEG, GIF, WebP, BMP, TIFF, HEIF/AVIF. Audio: WAV, FLAC, Ogg (Vorbis/Opus), MP3, M4A. Video:
    MP4/MOV (ISO BMFF other than audio/image brands), WebM/Matroska, Ogg Theora.
    """
    head = bytes(data[:64])
    if head.startswith(b"\x89PNG\r\n\x1a\n") or head.startswith(b"\xff\xd8\xff") or head[:4] == b"GIF8":
        return IMAGE
    if head.startswith(b"BM") or head[:4] in (b"II*\x00", b"MM\x00*"):
        return IMAGE
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return IMAGE
    if head[:4] == b"RIFF" and head[8:12] == b"WAVE" or head[:4] in (b"RF64", b"fLaC", b"ID3\x03", b"ID3\x04"):
        return AUDIO
    if head[:4] == b"OggS":
        return VIDEO if b"\x80theora" in head else AUDIO
    if len(head) >= 2 and head[0] == 0xFF and head[1] & 0xE0 == 0xE0 and head[1] & 0x06:
        return AUDIO  # MPEG audio frame sync
    if head[:4] == b"\x1aE\xdf\xa3":
        return VIDEO
    if head[4:8] == b"ftyp":
        brand = head[8:12]
        if brand in (b"M4A ", b"M4B ", b"M4P "):
            return AUDIO
        if brand in (b"heic", b"heix", b"mif1", b"msf1", b"avif", b"avis"):
            return IMAGE
        return VIDEO
    return None


# ---------------------------------------------------------------------------------------------------------- images
def decode_image(data: bytes, limits: MediaLimits = DEFAULT_LIMITS) -> np.ndarray:
    """Decode an image file to RGB pixels.

    Any Pillow mode is accepted: ``1``/``L``/``P``/``RGB``/``CMYK``/``YCbCr`` convert to RGB; modes with alpha (and
    palettes with a transparent colour) are composited on white; 16-bit ``I;16*``/``I`` keep their top 8 bits. The
    EXIF orientation is applied (``PIL.ImageOps.exif_transpose``); a broken EXIF block is ignored. Animated
    images give their first frame.

    Args:
        data: the encoded file (PNG, JPEG, WebP, GIF, BMP, TIFF).
        limits: ``max_bytes`` and ``max_pixels`` (checked from the header, before decoding).

    Returns:
        uint8 array (H, W, 3).

    Raises:
        MediaError: ``corrupt`` (unreadable or truncated), ``unsupported`` (another medium, an unknown mode),
            ``too_large`` (bytes or pixels).
    """
    from PIL import Image, ImageOps, UnidentifiedImageError

    _check_bytes(IMAGE, data, limits)
    with warnings.catch_warnings():
        # Our own max_pixels check runs before decoding; Pillow's bomb error (2x its own limit) maps to too_large.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            img = Image.open(io.BytesIO(bytes(data)), formats=IMAGE_FORMATS)
        except Image.DecompressionBombError as e:
            raise MediaError(IMAGE, "too_large", f"too many pixels ({e})") from None
        except UnidentifiedImageError:
            _wrong_medium(IMAGE, data)
            raise MediaError(
                IMAGE, "corrupt",
                f"not a readable image (corrupt, truncated, or not one of {', '.join(IMAGE_FORMATS)})",
            ) from None
        except (OSError, ValueError, SyntaxError, struct.error, EOFError) as e:
            raise MediaError(IMAGE, "corrupt", f"unreadable header ({e})") from None
        width_px, height_px = img.size
        if width_px <= 0 or height_px <= 0:
            raise MediaError(IMAGE, "corrupt", f"invalid size {width_px}x{height_px}")
        if width_px * height_px > limits.max_pixels:
            raise MediaError(
                IMAGE, "too_large",
                f"{width_px}x{height_px} = {width_px * height_px} pixels; the limit is {limits.max_pixels}",
            )
        try:
            img.load()
        except Image.DecompressionBombError as e:
            raise MediaError(IMAGE, "too_large", f"too many pixels ({e})") from None
        except (OSError, ValueError, SyntaxError, struct.error, EOFError, IndexError) as e:
            raise MediaError(IMAGE, "corrupt", f"corrupt or truncated image data ({e})") from None
    try:
        img = ImageOps.exif_transpose(img)
    except Exception:  # noqa: BLE001 - a broken EXIF block only loses the orientation, the pixels are fine
        pass
    if img.width * img.height > limits.max_pixels:  # exif_transpose keeps the pixel count; belt and braces
        raise MediaError(IMAGE, "too_large", f"{img.width}x{img.height} pixels; the limit is {limits.max_pixels}")
    return _to_rgb(img)


def _to_rgb(img) -> np.ndarray:
    from PIL import Image

    mode = img.mode
    if mode.startswith("I;16") or mode == "I":
        arr = np.asarray(img).astype(np.int64)
        gray = (np.clip(arr, 0, 65535) >> 8).astype(np.uint8)
        return np.ascontiguousarray(np.repeat(gray[:, :, None], 3, axis=2))
    has_alpha = mode in ("RGBA", "LA", "PA", "La", "RGBa") or (mode in ("P", "L", "RGB") and "transparency" in img.info)
    try:
        if has_alpha:
            rgba = img.convert("RGBA")
            white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            rgb = Image.alpha_composite(white, rgba).convert("RGB")
        else:
            rgb = img.convert("RGB")
    except (ValueError, OSError) as e:
        raise MediaError(IMAGE, "unsupported", f"cannot convert mode {mode!r} to RGB ({e})") from None
    arr = np.asarray(rgb, dtype=np.uint8)
    if arr.ndim != 3 or arr.shape[2] != 3:
        raise MediaError(IMAGE, "unsupported", f"mode {mode!r} gave pixels of shape {arr.shape}")
    return np.ascontiguousarray(arr)


# ----------------------------------------------------------------------------------------------------------- audio
def decode_audio(
    data: bytes, *, target_sample_rate_hz: int = 16000, limits: MediaLimits = DEFAULT_LIMITS
) -> np.ndarray:
    """Decode an audio file to mono float samples at ``target_sample_rate_hz``.

    Read with soundfile (libsndfile: WAV, FLAC, OGG Vorbis/Opus, MP3); channels are averaged; resampled with
    ``soxr`` (quality "HQ"), so S = round(frames * target_sample_rate_hz / source_rate). Duration and channels are
    checked from the header before samples are read. A WAV whose RIFF size or an Ogg stream whose last page is
    missing is reported as truncated (libsndfile would silently return the shorter audio).

    Args:
        data: the encoded file.
        target_sample_rate_hz: output sample rate (e.g. 16000; CLAP wants 48000).
        limits: ``max_bytes``, ``max_audio_duration_s``, ``max_audio_channels``.

    Returns:
        float32 array (S,).

    Raises:
        MediaError: ``corrupt`` (unreadable, truncated, no samples, non-finite samples), ``unsupported`` (another
            medium or an unknown format), ``too_large`` (bytes, duration, channels).
        ValueError: ``target_sample_rate_hz`` is not positive.
    """
    import soundfile as sf
    import soxr

    if target_sample_rate_hz <= 0:
        raise ValueError(f"target_sample_rate_hz must be positive, got {target_sample_rate_hz}")
    _check_bytes(AUDIO, data, limits)
    data = bytes(data)
    _check_container_complete(data)
    try:
        with sf.SoundFile(io.BytesIO(data)) as f:
            sample_rate_hz, channels, frames = int(f.samplerate), int(f.channels), int(f.frames)
            if sample_rate_hz <= 0 or sample_rate_hz > 768_000:
                raise MediaError(AUDIO, "corrupt", f"invalid sample rate {sample_rate_hz} Hz")
            if channels > limits.max_audio_channels:
                raise MediaError(
                    AUDIO, "too_large", f"{channels} channels; the limit is {limits.max_audio_channels}"
                )
            duration_s = frames / sample_rate_hz
            if duration_s > limits.max_audio_duration_s:
                raise MediaError(
                    AUDIO, "too_large",
                    f"duration {duration_s:.2f} s; the limit is {limits.max_audio_duration_s:g} s",
                )
            samples = f.read(dtype="float32", always_2d=True)
    except MediaError:
        raise
    except (sf.SoundFileError, RuntimeError, TypeError, ValueError, OSError, EOFError) as e:
        _wrong_medium(AUDIO, data)
        msg = str(e).split(": ", 1)[-1]  # drop "Error opening <_io.BytesIO object at 0x...>"
        raise MediaError(
            AUDIO, "corrupt",
            f"not a readable audio file (corrupt, truncated, or not one of {', '.join(AUDIO_FORMATS)}): {msg}",
        ) from None
    if samples.shape[0] == 0:
        raise MediaError(AUDIO, "corrupt", "the file contains no samples")
    if frames > 0 and samples.shape[0] < frames:
        raise MediaError(AUDIO, "corrupt", f"truncated: header says {frames} frames, read {samples.shape[0]}")
    if not np.isfinite(samples).all():
        raise MediaError(AUDIO, "corrupt", "non-finite sample values")
    mono = samples.mean(axis=1, dtype=np.float32)
    if sample_rate_hz != target_sample_rate_hz:
        mono = soxr.resample(mono, sample_rate_hz, target_sample_rate_hz, quality="HQ")
    return np.ascontiguousarray(mono, dtype=np.float32)


def _check_container_complete(data: bytes) -> None:
    """Detect truncation libsndfile tolerates silently: short RIFF/WAV payload, Ogg stream without its last page."""
    if data[:4] == b"RIFF" and data[8:12] == b"WAVE" and len(data) >= 12:
        (riff_size,) = struct.unpack("<I", data[4:8])
        # 0 and 0xFFFFFFFF: streaming writers that did not know the length
        if riff_size not in (0, 0xFFFFFFFF) and riff_size + 8 > len(data):
            raise MediaError(
                AUDIO, "corrupt", f"truncated WAV: header says {riff_size + 8} bytes, got {len(data)}"
            )
    elif data[:4] == b"OggS":
        last = data.rfind(b"OggS")
        page = data[last:]
        complete = False
        if len(page) >= 27:
            n_segments = page[26]
            if len(page) >= 27 + n_segments:
                body = sum(page[27 : 27 + n_segments])
                complete = len(page) >= 27 + n_segments + body and bool(page[5] & 0x04)
        if not complete:
            raise MediaError(AUDIO, "corrupt", "truncated Ogg stream (its last page is missing or incomplete)")


# ----------------------------------------------------------------------------------------------------------- video
def decode_video(
    data: bytes,
    *,
    num_frames: int = 8,
    size_px: int | None = None,
    limits: MediaLimits = DEFAULT_LIMITS,
) -> tuple[np.ndarray, float]:
    """Decode ``num_frames`` RGB frames sampled evenly over a video's duration.

    Sampling (segment centres, as TSN / ImageBind-style clip sampling): the duration D is cut into F equal
    segments and frame i is the frame shown at time ``start + (i + 0.5) * D / F`` (the last frame whose
    timestamp is <= that time). For a clip of N frames at a constant rate that is frame ``floor((i + 0.5) * N / F)``
    (stride N / F). Each frame is reached by **seeking** to the nearest keyframe before it and decoding forward,
    so the work is bounded by F GOPs, never by the file's length. When the container does not state a duration,
    the packets are scanned (demuxed, not decoded) to find it. Short clips repeat frames (F > N is allowed).
    A display-matrix rotation (phone videos) is applied.

    Args:
        data: the encoded file (MP4/MOV, WebM/Matroska).
        num_frames: F, 1..``limits.max_video_frames_sampled``.
        size_px: if given, frames are scaled (libswscale, bilinear) so their shorter side is ``size_px``,
            keeping the aspect ratio; else the source size.
        limits: ``max_bytes``, ``max_video_duration_s``, ``max_video_frame_pixels``.

    Returns:
        (frames uint8 (F, H, W, 3), source frames per second).

    Raises:
        MediaError: ``corrupt`` (unreadable, truncated, no decodable frame), ``unsupported`` (no video stream,
            another medium), ``too_large`` (bytes, duration, frame size).
        ValueError: ``num_frames`` or ``size_px`` out of range (a caller's mistake, not the input's).
    """
    import av

    if not 1 <= num_frames <= limits.max_video_frames_sampled:
        raise ValueError(f"num_frames must be in 1..{limits.max_video_frames_sampled}, got {num_frames}")
    if size_px is not None and not 1 <= size_px <= 4096:
        raise ValueError(f"size_px must be in 1..4096 or None, got {size_px}")
    _check_bytes(VIDEO, data, limits)
    data = bytes(data)
    try:
        container = av.open(io.BytesIO(data), mode="r")
    except av.FFmpegError as e:
        _wrong_medium(VIDEO, data)
        raise MediaError(
            VIDEO, "corrupt", f"not a readable video file (corrupt, truncated or unknown format): {_av_reason(e)}"
        ) from None
    try:
        with container:
            return _sample_frames(container, data, num_frames, size_px, limits)
    except MediaError:
        raise
    except (av.FFmpegError, OSError, ValueError, EOFError) as e:
        raise MediaError(VIDEO, "corrupt", f"corrupt or truncated video data ({_av_reason(e)})") from None


def _av_reason(e: Exception) -> str:
    return getattr(e, "strerror", None) or str(e)


def _sample_frames(container, data: bytes, num_frames: int, size_px: int | None, limits: MediaLimits):
    fmt = container.format.name
    if fmt not in VIDEO_FORMATS:
        _wrong_medium(VIDEO, data)
        raise MediaError(VIDEO, "unsupported", f"container {fmt!r} is not accepted (MP4/MOV or WebM/Matroska)")
    if not container.streams.video:
        kind = " (it has audio only)" if container.streams.audio else ""
        raise MediaError(VIDEO, "unsupported", f"the file has no video stream{kind}")
    stream = container.streams.video[0]
    time_base = stream.time_base
    if time_base is None or time_base <= 0:
        raise MediaError(VIDEO, "corrupt", "the video stream has no time base")
    width_px, height_px = stream.codec_context.width, stream.codec_context.height
    if width_px <= 0 or height_px <= 0:
        raise MediaError(VIDEO, "corrupt", f"invalid frame size {width_px}x{height_px}")
    if width_px * height_px > limits.max_video_frame_pixels:
        raise MediaError(
            VIDEO, "too_large",
            f"frames of {width_px}x{height_px} pixels; the limit is {limits.max_video_frame_pixels} pixels",
        )
    rate = stream.average_rate or stream.guessed_rate or stream.base_rate
    fps = float(rate) if rate else 0.0

    start_pts = stream.start_time if stream.start_time is not None else 0
    if stream.duration:
        duration_pts = Fraction(stream.duration)
    elif container.duration:
        duration_pts = Fraction(container.duration, 1_000_000) / time_base  # av.time_base is 1/1_000_000
    else:
        duration_pts = _scan_duration_pts(container, stream, start_pts)
    duration_s = float(duration_pts * time_base)
    if duration_pts <= 0:
        raise MediaError(VIDEO, "corrupt", "the video has no duration (no frames)")
    if duration_s > limits.max_video_duration_s:
        raise MediaError(
            VIDEO, "too_large", f"duration {duration_s:.2f} s; the limit is {limits.max_video_duration_s:g} s"
        )
    if size_px is None:
        out_w, out_h = width_px, height_px
    elif width_px <= height_px:
        out_w, out_h = size_px, max(1, round(height_px * size_px / width_px))
    else:
        out_w, out_h = max(1, round(width_px * size_px / height_px)), size_px

    # one frame's duration in time-base units (unknown rate: a 30 fps guess, only used to detect truncation)
    frame_pts = 1 / (Fraction(rate) * time_base) if rate else 1 / (Fraction(30) * time_base)
    frames: list[np.ndarray] = []
    for i in range(num_frames):
        target_pts = start_pts + Fraction((2 * i + 1) * duration_pts, 2 * num_frames)
        frame = _frame_at(container, stream, target_pts, frame_pts)
        if frame is None:
            raise MediaError(VIDEO, "corrupt", f"no decodable frame near {float(target_pts * time_base):.2f} s")
        arr = frame.to_ndarray(format="rgb24", width=out_w, height=out_h)
        rotation = int(getattr(frame, "rotation", 0) or 0)
        if rotation % 360:
            arr = np.rot90(arr, k=round(rotation / 90) % 4)  # rotation is counter-clockwise degrees
        frames.append(np.ascontiguousarray(arr))
    shapes = {f.shape for f in frames}
    if len(shapes) != 1:
        raise MediaError(VIDEO, "unsupported", f"frame size changes within the video: {sorted(shapes)}")
    if not fps and stream.frames:
        fps = stream.frames / duration_s
    return np.stack(frames), fps


def _scan_duration_pts(container, stream, start_pts: int) -> Fraction:
    """Duration from the packets' timestamps (demux only, no decoding), then rewind."""
    end = None
    for packet in container.demux(stream):
        if packet.pts is None:
            continue
        packet_end = packet.pts + (packet.duration or 0)
        end = packet_end if end is None else max(end, packet_end)
    container.seek(0)
    return Fraction(end - start_pts) if end is not None else Fraction(0)


def _frame_at(container, stream, target_pts: Fraction, frame_pts: Fraction):
    """The frame shown at ``target_pts``: seek to the keyframe at or before it and decode forward.

    ``frame_pts``: one frame's duration in stream time-base units. Reaching the end of the data while still more
    than one frame before the target means the file is shorter than its header says (truncated).
    """
    container.seek(int(target_pts), stream=stream, backward=True, any_frame=False)
    chosen, chosen_pts = None, None
    for frame in container.decode(stream):
        pts = frame.pts if frame.pts is not None else frame.dts
        if pts is None:
            continue
        if pts <= target_pts or chosen is None:
            chosen, chosen_pts = frame, pts
        if pts >= target_pts:
            return chosen
    if chosen is not None and target_pts - chosen_pts > frame_pts * Fraction(3, 2):
        raise MediaError(
            VIDEO, "corrupt",
            f"truncated: the data ends at {float(chosen_pts * stream.time_base):.2f} s, "
            f"before {float(target_pts * stream.time_base):.2f} s",
        )
    return chosen


# ------------------------------------------------------------------------------------------------------- data URLs
_DATA_URL = re.compile(
    r"^data:(?P<mime>[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]*/[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]*)"
    r"(?P<params>(?:;[A-Za-z0-9!#$&^_.+-]+=[^;,]*)*);base64,(?P<payload>[A-Za-z0-9+/]*={0,2})$"
)
_MIME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]*/[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]*$")


def modality_of_mime(mime: str) -> Modality | None:
    """The medium of a MIME type from its top-level type (``image/png`` -> image, ``audio/x-wav`` -> audio, case
    ignored); ``None`` for another type (``text/plain``, ``application/octet-stream``). The one mime -> modality
    map: data URLs here and the HTTP ingress both ask it."""
    top = mime.split("/", 1)[0].lower()
    return next((m for m in Modality if m.value == top), None)


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
    name: str | None = None,
) -> MediaPart:
    """Decode one medium into a :class:`polymodal.types.MediaPart` (dispatch on ``modality``).

    Raises:
        MediaError: see :func:`decode_image`, :func:`decode_audio`, :func:`decode_video`.
        ValueError: unknown modality (lists the choices).
    """
    modality = Modality.parse(modality)
    if modality is IMAGE:
        return MediaPart(IMAGE, decode_image(data, limits), name=name)
    if modality is AUDIO:
        samples = decode_audio(data, target_sample_rate_hz=sample_rate_hz, limits=limits)
        return MediaPart(AUDIO, samples, sample_rate_hz=sample_rate_hz, name=name)
    frames, fps = decode_video(data, num_frames=num_frames, size_px=size_px, limits=limits)
    return MediaPart(VIDEO, frames, fps=fps, name=name)
