"""Checkers: read a toy medium back (no learned parts; numpy + scipy only).

- :func:`check_image`: background = the most common border colour; foreground = the largest connected set
  of pixels far from it; colour = the palette entry nearest the foreground's median colour; the shape's
  outline = the pixels nearer that colour than the background's (the 50 % line of a soft edge, so that blur
  neither grows nor shrinks the shape); shape from the outline's fill of its bounding box (square ~1, circle
  ~pi/4) and the share of its area in the bbox's top half (triangle, apex up: ~1/4; circle and square: ~1/2).
  Before 2026-12-05 the outline was the far pixels themselves: a soft edge then grew the bounding box by a
  pixel while the corners stayed out, and 12.5 % of the squares the toy VAE encodes and decodes read as
  circles (3.5 % of the circles blurred by a 0.6 px Gaussian read as squares); now 3.5 % and 0
  (``bench/checker.py``).
- :func:`check_audio`: pitch = the nearest (in octaves) of :data:`PITCHES_HZ` to the spectrum's peak in
  100-4000 Hz; timbre = square when the 3rd harmonic is at least 0.15 of the fundamental (a band-limited
  square wave: 1/3), else sine.
- :func:`check_video`: background = the per-pixel temporal median; the foreground centroid of every frame
  is fitted by a line in time; direction = the axis and sign of the larger slope.
- 3D (``object3d``): :func:`training.toyworld.object3d.check_object3d` (the primitive whose fitted surface lies
  nearest the points, the palette colour nearest their median colour).

Each returns a frozen reading whose fields are ``None`` when nothing could be read (no foreground, silence);
:func:`matches` compares a reading with asked attributes.
"""

from __future__ import annotations

from dataclasses import MISSING, dataclass, fields

import numpy as np

from polymodal.modality import Modality
from training.toyworld.data import COLOURS, PITCHES_HZ
from training.toyworld.object3d import PHRASINGS_3D, SCORED_3D, Object3DReading, check_object3d, read_ply_points

FOREGROUND_DISTANCE = 60.0  # RGB distance from the background that counts as foreground
_PALETTE = np.asarray(list(COLOURS.values()), dtype=np.float64)


@dataclass(frozen=True)
class ImageReading:
    colour: str | None
    shape: str | None
    fill: float = 0.0
    top_share: float = 0.0


@dataclass(frozen=True)
class AudioReading:
    pitch: str | None
    timbre: str | None
    peak_hz: float = 0.0


@dataclass(frozen=True)
class VideoReading:
    direction: str | None
    shape: str | None = None
    colour: str | None = None


def _rgb(image) -> np.ndarray:
    a = np.asarray(image)
    if a.ndim != 3 or a.shape[-1] not in (3, 4):
        raise ValueError(f"image must be (H, W, 3), got shape {a.shape}")
    a = a[..., :3]
    if a.dtype != np.uint8:
        a = np.clip(np.asarray(a, dtype=np.float64) * (255.0 if a.max() <= 1.0 else 1.0), 0, 255)
    return a.astype(np.float64)


def _border_colour(img: np.ndarray) -> np.ndarray:
    border = np.concatenate([img[0], img[-1], img[:, 0], img[:, -1]])
    q = (border // 16).astype(np.int64)
    keys = q[:, 0] * 256 + q[:, 1] * 16 + q[:, 2]
    mode = np.bincount(keys).argmax()
    return np.median(border[keys == mode], axis=0)


def _largest_component(mask: np.ndarray) -> np.ndarray:
    from scipy import ndimage

    labels, n = ndimage.label(mask)
    if n <= 1:
        return mask
    sizes = np.bincount(labels.ravel())[1:]
    return labels == (int(sizes.argmax()) + 1)


def _shape_mask(img: np.ndarray, background: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """(the shape's mask (H, W) bool, its median colour RGB) in ``img`` (H, W, 3) float, or ``None`` when fewer than 4
    pixels are farther than :data:`FOREGROUND_DISTANCE` from ``background``. The colour is the median of the largest
    set of far pixels; the mask is the largest set of pixels nearer that colour than the background (projected on
    the line between them), the 50 % line of an edge however soft."""
    far = np.linalg.norm(img - background, axis=-1) > FOREGROUND_DISTANCE
    if far.sum() < 4:
        return None
    far = _largest_component(far)
    colour_rgb = np.median(img[far], axis=0)
    axis = colour_rgb - background
    nearer = ((img - background) @ axis) > 0.5 * float(axis @ axis)
    mask = _largest_component(nearer) if nearer.sum() >= 4 else far
    return mask, colour_rgb


def _read_shape(img: np.ndarray, background: np.ndarray) -> ImageReading:
    found = _shape_mask(img, background)
    if found is None:
        return ImageReading(None, None)
    mask, colour_rgb = found
    colour = list(COLOURS)[int(np.linalg.norm(_PALETTE - colour_rgb, axis=-1).argmin())]
    ys, xs = np.nonzero(mask)
    y0, y1, x0, x1 = ys.min(), ys.max(), xs.min(), xs.max()
    area = float(mask.sum())
    fill = area / float((y1 - y0 + 1) * (x1 - x0 + 1))
    mid = (y0 + y1) / 2.0
    top_share = float((ys < mid).sum() + 0.5 * (ys == mid).sum()) / area
    if top_share < 0.38:
        shape = "triangle"
    elif fill > 0.89:
        shape = "square"
    else:
        shape = "circle"
    return ImageReading(colour, shape, round(fill, 3), round(top_share, 3))


def check_image(image) -> ImageReading:
    """Colour and shape of the one shape in ``image`` (H, W, 3) uint8 or float in [0, 1].

    Raises:
        ValueError: not an (H, W, 3) array.
    """
    img = _rgb(image)
    return _read_shape(img, _border_colour(img))


# What an edit must keep of its source (issue #27): the shape's place
EDIT_POSITION_TOL = 0.10  # bounding-box centre within 10 % of the image size of the source's
EDIT_SIZE_TOL = 0.20  # bounding-box side within 20 % of the source's


def foreground_box(image) -> tuple[float, float, float] | None:
    """(cx, cy, side) px of the shape in ``image`` (H, W, 3) (its outline as :func:`check_image` reads it; side = the
    larger bounding-box extent), or ``None`` when fewer than 4 pixels are foreground."""
    img = _rgb(image)
    found = _shape_mask(img, _border_colour(img))
    if found is None:
        return None
    ys, xs = np.nonzero(found[0])
    return (xs.min() + xs.max()) / 2, (ys.min() + ys.max()) / 2, max(xs.max() - xs.min(), ys.max() - ys.min()) + 1


def kept_place(src_box, out_box, size_px: int) -> bool:
    """Whether an edit kept its source's place: :func:`foreground_box` centres within :data:`EDIT_POSITION_TOL` of
    ``size_px`` (per axis) and sides within :data:`EDIT_SIZE_TOL` (relative); ``False`` when either box is ``None``."""
    if src_box is None or out_box is None:
        return False
    dc = max(abs(src_box[0] - out_box[0]), abs(src_box[1] - out_box[1]))
    return dc <= EDIT_POSITION_TOL * size_px and abs(out_box[2] - src_box[2]) <= EDIT_SIZE_TOL * src_box[2]


def check_audio(audio, sample_rate_hz: int) -> AudioReading:
    """Pitch (low / middle / high) and timbre (sine / square) of a mono tone (S,) or (C, S) / (S, C).

    Raises:
        ValueError: empty audio or a non-positive sample rate.
    """
    x = np.asarray(audio, dtype=np.float64)
    if x.ndim == 2:
        x = x.mean(axis=0 if x.shape[0] < x.shape[1] else 1)
    if x.size == 0 or sample_rate_hz <= 0:
        raise ValueError("audio must be non-empty with a positive sample rate")
    if not np.isfinite(x).all() or np.abs(x).max() < 1e-4:
        return AudioReading(None, None)
    spectrum = np.abs(np.fft.rfft(x * np.hanning(x.size)))
    freqs = np.fft.rfftfreq(x.size, 1.0 / sample_rate_hz)
    band = (freqs >= 100) & (freqs <= 4000)
    if not band.any():
        return AudioReading(None, None)
    k = int(np.flatnonzero(band)[spectrum[band].argmax()])
    peak_hz = float(freqs[k])
    names = list(PITCHES_HZ)
    pitch = names[int(np.abs(np.log2(np.asarray(list(PITCHES_HZ.values())) / peak_hz)).argmin())]

    def level(f: float) -> float:
        sel = (freqs >= f * 0.97) & (freqs <= f * 1.03)
        return float(spectrum[sel].max()) if sel.any() else 0.0

    ratio = level(3 * peak_hz) / max(level(peak_hz), 1e-12)
    return AudioReading(pitch, "square" if ratio >= 0.15 else "sine", round(peak_hz, 1))


def check_video(frames) -> VideoReading:
    """Direction of motion (left / right / up / down) of the shape in ``frames`` (F, H, W, 3), and the
    shape and colour read from the middle frame.

    Raises:
        ValueError: not (F, H, W, 3) with F >= 2.
    """
    v = np.asarray(frames)
    if v.ndim != 4 or v.shape[0] < 2:
        raise ValueError(f"video must be (F, H, W, 3) with F >= 2, got shape {v.shape}")
    v = np.stack([_rgb(f) for f in v])
    background = np.median(v, axis=0)
    ts, cx, cy = [], [], []
    for t, frame in enumerate(v):
        mask = np.linalg.norm(frame - background, axis=-1) > FOREGROUND_DISTANCE
        if mask.sum() < 2:
            continue
        ys, xs = np.nonzero(_largest_component(mask))
        ts.append(t)
        cx.append(xs.mean())
        cy.append(ys.mean())
    if len(ts) < 2:
        return VideoReading(None)
    sx = np.polyfit(ts, cx, 1)[0]
    sy = np.polyfit(ts, cy, 1)[0]
    if abs(sx) >= abs(sy):
        direction = "right" if sx > 0 else "left"
    else:
        direction = "down" if sy > 0 else "up"
    mid = v[len(v) // 2]
    reading = _read_shape(mid, np.median(background.reshape(-1, 3), axis=0))
    return VideoReading(direction, reading.shape, reading.colour)


def _check_audio(data, meta: dict) -> AudioReading:
    if meta.get("sample_rate_hz") is None:
        raise ValueError("audio needs sample_rate_hz")
    return check_audio(data, meta["sample_rate_hz"])


# The toy checker of each modality: (data, metadata) -> its reading.
CHECKERS = {
    Modality.IMAGE: lambda data, meta: check_image(data),
    Modality.AUDIO: _check_audio,
    Modality.VIDEO: lambda data, meta: check_video(data),
    Modality.OBJECT3D: lambda data, meta: check_object3d(data),
}


# The reading type of each modality (an unreadable medium: every attribute None, see empty_reading).
READINGS = {Modality.IMAGE: ImageReading, Modality.AUDIO: AudioReading, Modality.VIDEO: VideoReading,
            Modality.OBJECT3D: Object3DReading}

# The attributes each modality's media are scored on (training.toyworld.evaluate; video: direction, its shape and
# colour are reported; 3D: shape and colour, its size reported).
SCORED: dict[Modality, tuple[str, ...]] = {
    Modality.IMAGE: ("colour", "shape"),
    Modality.AUDIO: ("pitch", "timbre"),
    Modality.VIDEO: ("direction",),
    Modality.OBJECT3D: SCORED_3D,
}

# The request phrasings of the toy recipes beyond training.toyworld.data's three (caption templates, training and
# held-out request wrappers, lead-ins, attribute combinations), added to training.toyworld.phrasings' tables.
RECIPE_PHRASINGS: dict[Modality, dict] = {Modality.OBJECT3D: PHRASINGS_3D}


def empty_reading(modality: Modality | str):
    """The reading of a medium that could not be made: every attribute ``None`` (a miss)."""
    cls = READINGS[_checked(modality)]
    return cls(**{f.name: None for f in fields(cls) if f.default is MISSING})


def _checked(modality: Modality | str) -> Modality:
    modality = Modality.parse(modality)
    if modality not in CHECKERS:
        raise ValueError(f"the toy world has no {modality.value} checker; choose from: "
                         f"{', '.join(m.value for m in CHECKERS)}")
    return modality


def check(modality: Modality | str, data, *, sample_rate_hz: int | None = None):
    """The reading of one medium of ``modality`` (audio needs ``sample_rate_hz``).

    Raises:
        ValueError: unknown modality (or one without a toy checker), or audio without ``sample_rate_hz``.
    """
    return CHECKERS[_checked(modality)](data, {"sample_rate_hz": sample_rate_hz})


def matches(reading, asked: dict) -> bool:
    """True when every asked attribute that the reading has (e.g. colour, shape) equals the reading's."""
    names = {f.name for f in fields(reading)}
    keys = [k for k in asked if k in names]
    if not keys:
        raise ValueError(f"none of {sorted(asked)} is read by {type(reading).__name__} ({sorted(names)})")
    return all(getattr(reading, k) == asked[k] for k in keys)


def _read_png(data: bytes):
    import io

    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im.convert("RGB")), {}


def _read_wav(data: bytes):
    import io

    import soundfile as sf

    audio, sr = sf.read(io.BytesIO(data), dtype="float32", always_2d=False)
    return audio, {"sample_rate_hz": int(sr)}


def _read_mp4(data: bytes):
    return decode_mp4(data), {}


# How each modality's file (as decoders.Medium.encode writes it) is read back for its checker: every frame of a
# video, the file's own sample rate.
READERS = {Modality.IMAGE: _read_png, Modality.AUDIO: _read_wav, Modality.VIDEO: _read_mp4,
           Modality.OBJECT3D: read_ply_points}


def check_bytes(modality: Modality | str, data: bytes) -> object:
    """Read a medium's file bytes (PNG / WAV / MP4, as ``decoders.Medium.encode`` writes them) and check it.

    Raises:
        ValueError: unknown modality (or one without a toy checker); whatever Pillow / soundfile / PyAV raise for
            bytes they cannot read.
    """
    modality = _checked(modality)
    array, meta = READERS[modality](data)
    return CHECKERS[modality](array, meta)


def check_file(modality: Modality | str, path) -> object:
    """Read the medium at ``path`` (PNG / WAV / MP4) and check it (:func:`check_bytes`)."""
    from pathlib import Path

    return check_bytes(modality, Path(path).read_bytes())


def decode_mp4(data: bytes) -> np.ndarray:
    """Every frame of a video file's bytes: uint8 (F, H, W, 3) (PyAV)."""
    import io

    import av

    with av.open(io.BytesIO(data)) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])
