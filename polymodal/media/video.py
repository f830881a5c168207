"""The video modality: its :class:`~polymodal.modality.ModalitySpec` and codec (PyAV with its bundled ffmpeg; no
torch).

- input: MP4/MOV, WebM/Matroska -> ``uint8 (F, H, W, 3)`` frames sampled evenly over the duration, and the source
  frame rate (:func:`decode_video`); where asked (``DecodeOptions.sound_track``), the first audio stream as
  ``float32 (S,)`` mono at 16 kHz in the part's ``sound_track`` (:func:`decode_sound_track`; none: ``None``).
- output: ``uint8 (F, H, W, 3)`` at ``fps`` -> MP4, h264 yuv420p at ``crf`` (:func:`encode_mp4`).
"""

from __future__ import annotations

import io
from collections.abc import Mapping
from fractions import Fraction
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
from polymodal.media.audio import AUDIO  # a video's sound track is an audio part
from polymodal.modality import ModalitySpec, register_modality
from polymodal.types import MediaPart

VIDEO_FORMATS = ("mov,mp4,m4a,3gp,3g2,mj2", "matroska,webm")
"""ffmpeg demuxers :func:`decode_video` accepts (MP4/MOV and WebM/Matroska)."""

# A rendered video whose every value is at or below this uint8 level is "all black".
BLACK_LEVEL_U8 = 0
SOUND_TRACK_RATE_HZ = 16000
"""The rate a video's sound track is decoded at (:func:`decode_sound_track`): what speech recognisers hear."""


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
    check_bytes(VIDEO, data, limits)
    data = bytes(data)
    try:
        container = av.open(io.BytesIO(data), mode="r")
    except av.FFmpegError as e:
        wrong_medium(VIDEO, data)
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


def decode_sound_track(
    data: bytes, *, sample_rate_hz: int = SOUND_TRACK_RATE_HZ, limits: MediaLimits = DEFAULT_LIMITS
) -> np.ndarray | None:
    """Decode a video file's sound track: its first audio stream, whole, resampled (libswresample) to
    ``sample_rate_hz`` and its channels averaged to mono.

    Args:
        data: the encoded file (MP4/MOV, WebM/Matroska; :func:`decode_video` reads its frames).
        sample_rate_hz: the output rate (16 kHz: speech recognition's).
        limits: ``max_bytes``, ``max_audio_channels``; the sound may not run past ``max_video_duration_s`` (plus one
            second of codec padding).

    Returns:
        float32 (S,) with S ~ duration * ``sample_rate_hz``; ``None`` when the file has no audio stream or it
        holds no samples (a silent video is no error).

    Raises:
        MediaError: ``corrupt`` (unreadable file or sound track, non-finite samples), ``too_large`` (bytes,
            channels, duration).
        ValueError: ``sample_rate_hz`` is not positive.
    """
    import av

    if sample_rate_hz <= 0:
        raise ValueError(f"sample_rate_hz must be positive, got {sample_rate_hz}")
    check_bytes(VIDEO, data, limits)
    try:
        container = av.open(io.BytesIO(bytes(data)), mode="r")
    except av.FFmpegError as e:
        raise MediaError(VIDEO, "corrupt", f"not a readable video file: {_av_reason(e)}") from None
    try:
        with container:
            if not container.streams.audio:
                return None
            return _mono_samples(container, container.streams.audio[0], sample_rate_hz, limits)
    except MediaError:
        raise
    except (av.FFmpegError, OSError, ValueError, EOFError) as e:
        raise MediaError(VIDEO, "corrupt", f"corrupt or truncated sound track ({_av_reason(e)})") from None


def _mono_samples(container, stream, sample_rate_hz: int, limits: MediaLimits) -> np.ndarray | None:
    import av

    channels = int(stream.codec_context.channels or 0)
    if channels > limits.max_audio_channels:
        raise MediaError(VIDEO, "too_large", f"a sound track of {channels} channels; the limit is "
                         f"{limits.max_audio_channels}")
    # the source's channels kept (planar), averaged here: libswresample's own downmix scales stereo by 1/sqrt(2)
    # each, which can clip; the average is what audio inputs get (:func:`polymodal.media.audio.decode_audio`)
    resampler = av.AudioResampler(format="fltp", layout=None, rate=sample_rate_hz)
    max_samples = int((limits.max_video_duration_s + 1) * sample_rate_hz)
    chunks: list[np.ndarray] = []
    total = 0

    def add(frames) -> None:
        nonlocal total
        for out in frames:
            chunk = out.to_ndarray().mean(axis=0, dtype=np.float32)  # planar: (channels, n)
            total += chunk.size
            if total > max_samples:
                raise MediaError(VIDEO, "too_large", f"the sound track runs past {limits.max_video_duration_s:g} s "
                                 "(the limit on a video's duration)")
            chunks.append(chunk)

    for frame in container.decode(stream):
        add(resampler.resample(frame))
    add(resampler.resample(None))  # flush
    if not total:
        return None
    samples = np.concatenate(chunks).astype(np.float32, copy=False)
    if not np.isfinite(samples).all():
        raise MediaError(VIDEO, "corrupt", "non-finite samples in the sound track")
    return np.ascontiguousarray(samples)


def _av_reason(e: Exception) -> str:
    return getattr(e, "strerror", None) or str(e)


def _sample_frames(container, data: bytes, num_frames: int, size_px: int | None, limits: MediaLimits):
    fmt = container.format.name
    if fmt not in VIDEO_FORMATS:
        wrong_medium(VIDEO, data)
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



def encode_mp4(frames: np.ndarray, fps: float, *, crf: int | None = None) -> bytes:
    """uint8 (F, H, W, 3) -> MP4 bytes (h264, yuv420p).

    ``crf``: libx264's constant rate factor (0-51, lower is closer to ``frames``; ``None``: libx264's default,
    23). Small frames need a low one: at 16 x 16 px the default blurs a 4 px shape enough to move it (see
    :class:`polymodal.config.DecoderDefaults`). Ignored when PyAV has only another h264 encoder.
    """
    import av

    num_frames, height_px, width_px, _ = frames.shape
    pad_h, pad_w = height_px % 2, width_px % 2
    if pad_h or pad_w:
        frames = np.pad(frames, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)), mode="edge")
    rate = Fraction(fps).limit_denominator(1001)
    buf = io.BytesIO()
    with av.open(buf, mode="w", format="mp4") as container:
        x264 = "libx264" in av.codecs_available
        stream = container.add_stream("libx264" if x264 else "h264", rate=rate)
        if x264 and crf is not None:
            stream.options = {"crf": str(int(crf))}
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = "yuv420p"
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buf.getvalue()


class VideoCodec(MediaCodec):
    """Video files: PyAV in (:func:`decode_video`), MP4 h264 out (:func:`encode_mp4`).

    Sniffing takes any ISO BMFF file (``ftyp``) whose brand no codec registered before it claimed (image: HEIF/AVIF,
    audio: M4A), so it must be registered after them (:mod:`polymodal.media` does).
    """

    mime_type = "video/mp4"
    ext = "mp4"

    def sniff(self, head: bytes) -> bool:
        return (head[:4] == b"OggS" and b"\x80theora" in head or head[:4] == b"\x1aE\xdf\xa3"
                or head[4:8] == b"ftyp")

    def decode(self, data: bytes, *, limits: MediaLimits, options: DecodeOptions, name: str | None = None) -> MediaPart:
        frames, fps = decode_video(data, num_frames=options.num_frames, size_px=options.size_px, limits=limits)
        sound = decode_sound_track(data, limits=limits) if options.sound_track else None
        track = None if sound is None else MediaPart(AUDIO, sound, sample_rate_hz=SOUND_TRACK_RATE_HZ)
        return MediaPart(VIDEO, frames, fps=fps, name=name, sound_track=track)

    def validate(self, data: Any, meta: Mapping[str, Any]) -> None:
        if not (data.dtype == np.uint8 and data.ndim == 4 and data.shape[-1] == 3):
            raise ValueError(f"video data must be uint8 (F, H, W, 3), got {data.dtype} {data.shape}")
        if not meta.get("fps"):
            raise ValueError("video needs fps")

    def encode(self, data: Any, meta: Mapping[str, Any]) -> tuple[bytes, str, str]:
        return encode_mp4(data, meta["fps"], crf=meta.get("crf")), self.mime_type, self.ext

    def duration_s(self, data: Any, meta: Mapping[str, Any]) -> float | None:
        return len(data) / float(meta["fps"])

    def degenerate(self, data: Any) -> str | None:
        return "all black" if int(data.max(initial=0)) <= BLACK_LEVEL_U8 else None


VIDEO_SPEC = ModalitySpec(
    name="video",
    label="video",
    noun="video clip",
    signal_prefix="VID",
    default_signal_count=24,
    input_markers=("<Video>", "</Video>"),
    content_part="video_url",
    answer_field="videos",
    input_mime_types=("video/*",),
    file_extensions=(".mp4", ".webm", ".mov", ".mkv", ".avi"),
    option_fields=("num_inference_steps", "guidance_scale", "height_px", "width_px", "num_frames", "fps", "crf",
                   "strength"),
    codec=VideoCodec(),
)
VIDEO = register_modality(VIDEO_SPEC)
