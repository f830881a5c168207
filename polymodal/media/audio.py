"""The audio modality: its :class:`~polymodal.modality.ModalitySpec` and codec (soundfile, soxr; no torch).

- input: WAV, FLAC, OGG (Vorbis/Opus), MP3 -> ``float32 (S,)`` mono at the requested rate (:func:`decode_audio`).
- output: ``float32 (S,)`` mono at ``sample_rate_hz`` -> WAV with 32-bit float samples (:func:`encode_wav`).
"""

from __future__ import annotations

import io
import struct
from collections.abc import Mapping
from typing import Any

import numpy as np

from polymodal.media_io import (
    DEFAULT_LIMITS,
    DecodeOptions,
    MediaCodec,
    MediaError,
    MediaLimits,
    check_bytes,
    wrong_medium,
)
from polymodal.modality import ModalitySpec, register_modality
from polymodal.types import MediaPart

AUDIO_FORMATS = ("WAV", "FLAC", "OGG", "MP3")
"""libsndfile formats :func:`decode_audio` accepts (OGG: Vorbis or Opus)."""

# A rendered waveform whose every absolute amplitude is at or below this is silent.
SILENCE_AMPLITUDE = 1e-6
_M4A_BRANDS = (b"M4A ", b"M4B ", b"M4P ")


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
    check_bytes(AUDIO, data, limits)
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
        wrong_medium(AUDIO, data)
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


def encode_wav(audio: np.ndarray, sample_rate_hz: int) -> bytes:
    """float32 (S,) -> WAV bytes with 32-bit float samples."""
    import soundfile as sf

    buf = io.BytesIO()
    sf.write(buf, np.asarray(audio, dtype=np.float32), int(sample_rate_hz), format="WAV", subtype="FLOAT")
    return buf.getvalue()


class AudioCodec(MediaCodec):
    """Audio files: libsndfile + soxr in (:func:`decode_audio`), WAV float32 out (:func:`encode_wav`)."""

    mime_type = "audio/wav"
    ext = "wav"

    def sniff(self, head: bytes) -> bool:
        if head[:4] == b"RIFF" and head[8:12] == b"WAVE" or head[:4] in (b"RF64", b"fLaC", b"ID3\x03", b"ID3\x04"):
            return True
        if head[:4] == b"OggS":
            return b"\x80theora" not in head
        if len(head) >= 2 and head[0] == 0xFF and head[1] & 0xE0 == 0xE0 and head[1] & 0x06:
            return True  # MPEG audio frame sync
        return head[4:8] == b"ftyp" and head[8:12] in _M4A_BRANDS

    def decode(self, data: bytes, *, limits: MediaLimits, options: DecodeOptions, name: str | None = None) -> MediaPart:
        samples = decode_audio(data, target_sample_rate_hz=options.sample_rate_hz, limits=limits)
        return MediaPart(AUDIO, samples, sample_rate_hz=options.sample_rate_hz, name=name)

    def validate(self, data: Any, meta: Mapping[str, Any]) -> None:
        if not (data.dtype == np.float32 and data.ndim == 1):
            raise ValueError(f"audio data must be float32 (S,) mono, got {data.dtype} {data.shape}")
        if not meta.get("sample_rate_hz"):
            raise ValueError("audio needs sample_rate_hz")

    def encode(self, data: Any, meta: Mapping[str, Any]) -> tuple[bytes, str, str]:
        return encode_wav(data, meta["sample_rate_hz"]), self.mime_type, self.ext

    def duration_s(self, data: Any, meta: Mapping[str, Any]) -> float | None:
        return len(data) / float(meta["sample_rate_hz"])

    def degenerate(self, data: Any) -> str | None:
        return "silent audio" if float(np.max(np.abs(data), initial=0.0)) <= SILENCE_AMPLITUDE else None


AUDIO_SPEC = ModalitySpec(
    name="audio",
    label="audio",
    noun="sound clip",
    signal_prefix="AUD",
    default_signal_count=8,
    input_markers=("<Audio>", "</Audio>"),
    content_part="audio_url",
    answer_field="audios",
    message_slot="audio",
    input_mime_types=("audio/*",),
    file_extensions=(".wav", ".flac", ".ogg", ".mp3"),
    option_fields=("num_inference_steps", "guidance_scale", "duration_s"),
    normalize_cond=True,
    codec=AudioCodec(),
)
AUDIO = register_modality(AUDIO_SPEC)
