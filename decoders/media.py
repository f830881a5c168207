"""Rendered media; normalisation of whatever arrays a diffusion pipeline returns.

- :class:`Medium`: one generated item, image uint8 (H, W, 3), audio float32 (S,) mono, video uint8 (F, H, W, 3).
  ``encode()`` gives PNG (Pillow), WAV float32 (soundfile) or MP4 h264 yuv420p (PyAV): the modality's codec
  (:mod:`polymodal.media`) validates, measures and encodes it.
- :func:`image_to_uint8`, :func:`audio_to_mono`, :func:`video_to_uint8`, :func:`split_batch`: turn pipeline
  outputs of any usual layout and range into those arrays, and :func:`degenerate_reason` tells NaN or
  all-black / silent output apart from a usable one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from polymodal.modality import Modality


@dataclass(frozen=True, eq=False)
class Medium:
    """One generated medium; its modality's codec (``modality.spec.codec``) validates, measures and encodes it.

    Attributes:
        modality: a registered modality (image, audio, video, or a plug-in one).
        data: the codec's array: image uint8 (H, W, 3); audio float32 (S,) mono in [-1, 1]; video uint8 (F, H, W, 3).
        seed: the seed of this item's generator (item k of a batch equals the same item generated alone).
        sample_rate_hz: audio only.
        fps: video only.
        crf: video only: the libx264 constant rate factor of :meth:`encode` (``None``: libx264's default, 23).

    Raises:
        ValueError: an unknown modality, or data / metadata the codec refuses (dtype, shape, missing rate or fps).
    """

    modality: Modality
    data: np.ndarray
    seed: int
    sample_rate_hz: int | None = None
    fps: float | None = None
    crf: int | None = None

    def __post_init__(self) -> None:
        m = Modality.parse(self.modality)
        object.__setattr__(self, "modality", m)
        m.spec.codec.validate(self.data, self.meta)

    @property
    def meta(self) -> dict[str, Any]:
        """The metadata the codec reads: ``sample_rate_hz``, ``fps``, ``crf`` (those set)."""
        return {k: v for k, v in (("sample_rate_hz", self.sample_rate_hz), ("fps", self.fps), ("crf", self.crf))
                if v is not None}

    @property
    def duration_s(self) -> float | None:
        """Length of a timed medium (audio, video) in seconds (``None`` for an image)."""
        return self.modality.spec.codec.duration_s(self.data, self.meta)

    def encode(self) -> tuple[bytes, str, str]:
        """Encode to a file with the modality's codec: ``(bytes, mime type, extension)``.

        Image: PNG (Pillow). Audio: WAV, 32-bit float samples (soundfile) at ``sample_rate_hz``.
        Video: MP4, h264 in yuv420p (PyAV) at :attr:`crf`; odd sizes are padded by one edge pixel (yuv420p needs
        even sizes).
        """
        return self.modality.spec.codec.encode(self.data, self.meta)


# ---------------------------------------------------------------- normalisation of pipeline outputs


def _to_numpy(x) -> np.ndarray:
    if hasattr(x, "detach"):  # torch.Tensor
        x = x.detach().float().cpu().numpy()
    elif hasattr(x, "convert") and hasattr(x, "size"):  # PIL.Image
        x = np.asarray(x.convert("RGB"))
    return np.asarray(x)


def split_batch(output, batch_size: int) -> list:
    """Split a pipeline output into ``batch_size`` items.

    Accepts a batched array/tensor (leading axis B), a list of B items, or, for B == 1, one unbatched item
    (e.g. a plain list of video frames, as older pipelines return).

    Raises:
        ValueError: the output does not hold ``batch_size`` items.
    """
    if isinstance(output, (list, tuple)):
        if len(output) == batch_size and batch_size != 1:
            return list(output)
        if batch_size == 1:
            # [item] or a bare list of frames
            if len(output) == 1:
                return [output[0]]
            return [list(output)]
        raise ValueError(f"pipeline returned {len(output)} items for a batch of {batch_size}")
    arr = output
    if getattr(arr, "shape", None) is None:
        raise ValueError(f"cannot split a pipeline output of type {type(output).__name__}")
    if arr.shape[0] != batch_size:
        if batch_size == 1:
            return [arr]
        raise ValueError(f"pipeline returned {arr.shape[0]} items for a batch of {batch_size}")
    return [arr[k] for k in range(batch_size)]


def _float_to_uint8(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float32)
    lo, hi = float(np.min(x)), float(np.max(x))
    if hi > 1.5:  # 0..255 as floats
        x = x / 255.0
    elif lo < -1e-3:  # [-1, 1]
        x = (x + 1.0) / 2.0
    return (np.clip(x, 0.0, 1.0) * 255.0).round().astype(np.uint8)


def _channels_last_rgb(x: np.ndarray) -> np.ndarray:
    """(..., H, W, C) or (..., C, H, W) with C in {1, 3, 4} -> (..., H, W, 3)."""
    if x.ndim >= 3 and x.shape[-1] not in (1, 3, 4) and x.shape[-3] in (1, 3, 4):
        x = np.moveaxis(x, -3, -1)
    if x.shape[-1] == 1:
        x = np.repeat(x, 3, axis=-1)
    elif x.shape[-1] == 4:
        x = x[..., :3]
    elif x.shape[-1] != 3:
        raise ValueError(f"cannot find the colour channels of an array of shape {x.shape}")
    return x


def _pixels_to_uint8(x: np.ndarray) -> np.ndarray:
    x = _channels_last_rgb(x)
    return np.ascontiguousarray(x if x.dtype == np.uint8 else _float_to_uint8(x))


def image_to_uint8(image) -> np.ndarray:
    """One image (H, W, C) / (C, H, W), float in [0, 1] or [-1, 1], uint8, tensor or PIL -> uint8 (H, W, 3)."""
    x = _to_numpy(image)
    if x.ndim == 2:
        x = x[..., None]
    if x.ndim == 4 and x.shape[0] == 1:
        x = x[0]
    if x.ndim != 3:
        raise ValueError(f"an image must have 2 or 3 axes, got shape {x.shape}")
    return _pixels_to_uint8(x)


def video_to_uint8(video) -> np.ndarray:
    """One video -> uint8 (F, H, W, 3).

    Accepts a list of frames (arrays, tensors or PIL images), (F, H, W, C), (F, C, H, W), (1, F, H, W, C),
    (C, F, H, W) tensors as the VAE emits them, float in [0, 1] or [-1, 1], or uint8. When F is itself 1, 3
    or 4 a 4-axis array with colour-sized axes 0 and 1 reads as (F, C, H, W).
    """
    if isinstance(video, (list, tuple)):
        frames = [_to_numpy(f) for f in video]
        frames = [f[0] if f.ndim == 4 and f.shape[0] == 1 else f for f in frames]
        x = np.stack(frames)
    else:
        x = _to_numpy(video)
    if x.ndim == 5 and x.shape[0] == 1:
        x = x[0]
    if x.ndim == 3:  # grey frames (F, H, W)
        x = x[..., None]
    if x.ndim != 4:
        raise ValueError(f"a video must have 4 axes (F, H, W, C), got shape {x.shape}")
    if x.shape[-1] not in (1, 3, 4) and x.shape[-3] not in (1, 3, 4) and x.shape[0] in (1, 3, 4):
        x = np.moveaxis(x, 0, 1)  # (C, F, H, W) -> (F, C, H, W)
    return _pixels_to_uint8(x)


def audio_to_mono(audio) -> np.ndarray:
    """One waveform (S,), (1, S), (C, S) or (S, C) -> float32 (S,) mono (channels averaged)."""
    x = _to_numpy(audio).astype(np.float32)
    if x.ndim == 2:
        x = x.mean(axis=0 if x.shape[0] <= x.shape[1] else 1)
    if x.ndim != 1:
        raise ValueError(f"a waveform must have 1 or 2 axes, got shape {x.shape}")
    return np.ascontiguousarray(x, dtype=np.float32)


def degenerate_reason(modality: Modality, raw, converted: np.ndarray | None = None) -> str | None:
    """Why an output is unusable, or ``None``.

    ``raw``: the pipeline's array for one item (before conversion); ``converted``: the array that would
    go into the :class:`Medium`. NaN / inf anywhere, or what the modality's codec calls degenerate (an all-black
    image or video, silent audio).
    """
    x = _to_numpy(raw) if not isinstance(raw, (list, tuple)) else np.stack([_to_numpy(f) for f in raw])
    if np.issubdtype(x.dtype, np.floating) and not np.all(np.isfinite(x)):
        return "degenerate output: NaN or inf values"
    if converted is None:
        return None
    reason = Modality.parse(modality).spec.codec.degenerate(converted)
    return f"degenerate output: {reason}" if reason else None
