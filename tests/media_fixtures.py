"""Real test inputs, made offline: photos from scikit-image, speech from espeak-ng, MP4/WebM from real photos.

Plain functions (cached), usable from any test module::

    from tests.media_fixtures import photo_png, speech_wav, photo_mp4

``speech_wav`` needs the ``espeak-ng`` program (Debian: ``apt-get install -y espeak-ng``): through
:func:`require_program`, a test that needs a program skips (with the reason) when it is absent, except under
``CI=true``, where it fails: CI installs the programs (``.ci/run``), so a missing one is a broken CI, not a skip.
"""

from __future__ import annotations

import functools
import io
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import pytest

PHOTO_NAMES = ("astronaut", "chelsea", "coffee", "rocket")
ESPEAK = shutil.which("espeak-ng")
SPEECH_TEXT = "Hello. Please describe this picture of a cat sitting on a chair."


@functools.lru_cache(maxsize=None)
def _photo_full(name: str) -> np.ndarray:
    import skimage.data

    if name not in PHOTO_NAMES:
        raise ValueError(f"unknown photo {name!r}; choose from: {', '.join(PHOTO_NAMES)}")
    arr = getattr(skimage.data, name)()
    return np.ascontiguousarray(arr[:, :, :3]) if arr.ndim == 3 else np.repeat(arr[:, :, None], 3, 2)


def photo(name: str = "astronaut", width_px: int | None = 96) -> np.ndarray:
    """A real photo from scikit-image as uint8 (H, W, 3), scaled to ``width_px`` wide (None: full size)."""
    from PIL import Image

    arr = _photo_full(name)
    if width_px is None:
        return arr.copy()
    h, w = arr.shape[:2]
    img = Image.fromarray(arr).resize((width_px, max(1, round(h * width_px / w))), Image.BILINEAR)
    return np.array(img)


def image_bytes(arr: np.ndarray, fmt: str = "PNG", *, mode: str | None = None, **save_kwargs) -> bytes:
    """Encode pixels (optionally converted to a Pillow ``mode`` first) with Pillow."""
    from PIL import Image

    img = Image.fromarray(arr)
    if mode is not None:
        img = img.convert(mode)
    buf = io.BytesIO()
    img.save(buf, format=fmt, **save_kwargs)
    return buf.getvalue()


@functools.lru_cache(maxsize=None)
def photo_png(name: str = "astronaut", width_px: int | None = 96) -> bytes:
    return image_bytes(photo(name, width_px), "PNG")


@functools.lru_cache(maxsize=None)
def photo_jpeg(name: str = "chelsea", width_px: int | None = 96, quality: int = 90) -> bytes:
    return image_bytes(photo(name, width_px), "JPEG", quality=quality)


def audio_bytes(samples: np.ndarray, sample_rate_hz: int, fmt: str = "WAV", subtype: str | None = None) -> bytes:
    """Encode float samples (S,) or (S, C) with soundfile."""
    import soundfile as sf

    buf = io.BytesIO()
    sf.write(buf, samples, sample_rate_hz, format=fmt, subtype=subtype)
    return buf.getvalue()


def espeak_available() -> bool:
    return ESPEAK is not None


def in_ci() -> bool:
    """``CI=true`` (GitHub Actions, GitLab and most CI systems set it; ``.ci/run`` runs under it)."""
    return os.environ.get("CI", "").strip().lower() in ("true", "1", "yes")


def require_program(name: str, package: str | None = None) -> str:
    """The path of program ``name``; when it is not installed the calling test skips with the reason, or fails
    under ``CI=true`` (where ``.ci/run`` installs it)."""
    path = shutil.which(name)
    if path is None:
        msg = f"{name} is not installed (Debian: apt-get install -y {package or name})"
        if in_ci():
            pytest.fail(f"{msg}; CI installs it (.ci/run), so its absence is an error here")
        pytest.skip(msg)
    return path


@functools.lru_cache(maxsize=None)
def _speech(text: str) -> bytes:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "speech.wav"
        subprocess.run([ESPEAK, "-v", "en", "-s", "170", "-w", str(out), text], check=True, capture_output=True,
                       timeout=60)
        return out.read_bytes()


def speech_wav(text: str = SPEECH_TEXT) -> bytes:
    """Real synthetic speech (espeak-ng, mono 22.05 kHz WAV). Without espeak-ng the test skips (fails under CI)."""
    require_program("espeak-ng")
    return _speech(text)


def speech_samples(text: str = SPEECH_TEXT) -> tuple[np.ndarray, int]:
    """The speech of :func:`speech_wav` as float32 (S,) and its sample rate."""
    import soundfile as sf

    samples, sample_rate_hz = sf.read(io.BytesIO(speech_wav(text)), dtype="float32")
    return samples, int(sample_rate_hz)


def encode_video(frames: list[np.ndarray] | np.ndarray, fps: int, *, codec: str = "libx264", fmt: str = "mp4",
                 gop: int | None = None, sound: tuple[np.ndarray, int] | None = None) -> bytes:
    """Encode uint8 (F, H, W, 3) frames with PyAV (even H and W for yuv420p); ``sound``: (float32 samples, mono (S,)
    or stereo (2, S), their rate) muxed in as the sound track (AAC; Opus in WebM, at 48 kHz)."""
    import av

    frames = list(frames)
    h, w = frames[0].shape[:2]
    buf = io.BytesIO()
    with av.open(buf, "w", format=fmt) as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        if gop is not None:
            stream.codec_context.gop_size = gop
        track = None
        if sound is not None:  # every stream is added before the first packet is muxed
            samples, rate = sound
            samples = np.asarray(samples, np.float32).reshape(-1, np.shape(samples)[-1])  # (C, S)
            layout = "mono" if len(samples) == 1 else "stereo"
            track = container.add_stream("libopus" if fmt == "webm" else "aac", rate=rate)
            track.layout = layout
        for arr in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(arr), format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
        if track is not None:
            frame = av.AudioFrame.from_ndarray(samples, format="fltp", layout=layout)
            frame.sample_rate, frame.pts = rate, 0
            for packet in (*track.encode(frame), *track.encode(None)):
                container.mux(packet)
    return buf.getvalue()


def photo_frames(names=PHOTO_NAMES, frames_per_photo: int = 4, width_px: int = 64, height_px: int = 48) -> np.ndarray:
    """A slideshow of real photos, each centre-cropped to (height_px, width_px) with a slow pan: (F, H, W, 3)."""
    from PIL import Image

    out = []
    for name in names:
        img = Image.fromarray(photo(name, width_px + frames_per_photo * 2))
        img = img.resize((width_px + frames_per_photo * 2, height_px + 8), Image.BILINEAR)
        for k in range(frames_per_photo):
            out.append(np.asarray(img.crop((2 * k, 4, 2 * k + width_px, 4 + height_px))))
    return np.stack(out)


@functools.lru_cache(maxsize=None)
def photo_mp4(fps: int = 8, frames_per_photo: int = 4, codec: str = "libx264", fmt: str = "mp4") -> bytes:
    """A short MP4 (default 16 frames, 2 s, 64x48, H.264) made from the four real photos."""
    return encode_video(photo_frames(frames_per_photo=frames_per_photo), fps, codec=codec, fmt=fmt)


INDEX_STEP = 6


def index_frames(num_frames: int, width_px: int = 32, height_px: int = 32) -> np.ndarray:
    """Frames whose content encodes their index: frame i is flat grey ``INDEX_STEP * i`` (i < 43)."""
    if num_frames * INDEX_STEP > 255:
        raise ValueError(f"at most {255 // INDEX_STEP} index frames")
    levels = (np.arange(num_frames) * INDEX_STEP).astype(np.uint8)
    return np.broadcast_to(levels[:, None, None, None], (num_frames, height_px, width_px, 3)).copy()


def frame_index(frame: np.ndarray) -> int:
    """Inverse of :func:`index_frames` for a decoded (lossy) frame."""
    return int(round(float(frame.mean()) / INDEX_STEP))
