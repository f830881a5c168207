"""Procedural toy media with captions: shapes (images), tones (audio), moving shapes (video).

Every item is drawn from its own ``numpy.random.Generator`` seeded with ``(seed, modality, index)``, so a
dataset is reproducible item by item and ``count`` only decides how many items are written.

- Image: uint8 (H, W, 3); one axis-aligned {circle, square, triangle (apex up)} in {red, green, blue,
  yellow} (small per-channel jitter) of random size and position on a plain grey background.
- Audio: float32 (S,) at 16 kHz, about 1 s; a tone at {low 200 Hz, middle 400 Hz, high 800 Hz} (+-2 %)
  with timbre {sine, square (band-limited odd harmonics 1/k)}, 20 ms fades.
- Video: uint8 (F, H, W, 3), 8-16 frames; one shape moving {left, right, up, down} at constant speed
  across about 45 % of the frame.

On disk (:func:`write_dataset`): ``DIR/{image,audio,video}/<id>.{png,wav,mp4}`` and ``DIR/catalog.jsonl``
with one ``{"id", "modality", "path", "caption", "attributes"}`` object per line (``path`` relative to the
catalog): the MosIT catalog (``id, modality, path, caption``) and the training JSONL reader (``path,
caption, modality``) both read it.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from polymodal.modality import Modality

SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 70, 220),
    "yellow": (230, 210, 40),
}
BACKGROUND_GREYS: tuple[int, ...] = (40, 128, 215)
# multiples of 200 Hz: the toy audio decoder's sinusoidal vocoder synthesises 200 Hz-spaced bins
PITCHES_HZ: dict[str, float] = {"low": 200.0, "middle": 400.0, "high": 800.0}
TIMBRES: tuple[str, ...] = ("sine", "square")
DIRECTIONS: tuple[str, ...] = ("left", "right", "up", "down")
SAMPLE_RATE_HZ = 16000
IMAGE_SIZES_PX: tuple[int, ...] = (32, 64)
COLOUR_JITTER = 15
# "random": any grey, size and position (inputs, grounding); "canonical": mid-grey background, one size band,
# centred path with 1-2 px jitter (what the toy decoders learn to draw: the attributes, not the layout)
LAYOUTS: tuple[str, ...] = ("random", "canonical")
CANONICAL_GREY = 128

# Each toy modality's seed salt (item_rng); the recipes (MAKERS, TEMPLATES) are further down.
_MODALITY_SALT = {Modality.IMAGE: 1, Modality.AUDIO: 2, Modality.VIDEO: 3}

IMAGE_TEMPLATES = (
    "a {colour} {shape}",
    "a picture of a {colour} {shape}",
    "an image of a {colour} {shape}",
    "a {colour} {shape} on a plain background",
    "a drawing of a {colour} {shape}",
    "one {colour} {shape}",
)
AUDIO_TEMPLATES = (
    "a {pitch} tone",
    "a {pitch} {timbre} tone",
    "the sound of a {pitch} {timbre} wave",
    "a {pitch} pitched {timbre} tone",
    "a {timbre} tone at a {pitch} pitch",
    "a short {pitch} note",
)
VIDEO_TEMPLATES = (
    "a {colour} {shape} moving {direction}",
    "a {shape} moving {direction}",
    "a video of a {colour} {shape} moving {direction}",
    "a {colour} {shape} that moves {direction}",
    "a clip of a {shape} moving to the {direction}",
    "a {colour} {shape} sliding {direction}",
)


# The toy decoders' tokenizer (:func:`toy_tokenizer`): request words beyond the templates and attribute values.
_EXTRA_WORDS = """
a an the of and in on at to with that this it is are me please can you i want make draw paint show create
generate render give play produce sketch picture image photo drawing painting video clip movie animation
sound audio tone note beep wave noise music pitch pitched high low middle medium some one shape shapes
colour color coloured colored moving moves move sliding going goes left right up down upward downward
here there sure small big large plain background frame short long sine square circle triangle red green
blue yellow black white grey gray orange purple round box
""".split()


def toy_vocabulary() -> list[str]:
    """Sorted words of every caption template, every attribute value and a few request words."""
    words = set(_EXTRA_WORDS) | set(SHAPES) | set(COLOURS) | set(PITCHES_HZ) | set(TIMBRES) | set(DIRECTIONS)
    for t in IMAGE_TEMPLATES + AUDIO_TEMPLATES + VIDEO_TEMPLATES:
        words |= set(re.findall(r"[a-z]+", re.sub(r"\{[a-z]+\}", " ", t.lower())))
    return sorted(words)


def toy_tokenizer(model_max_length: int = 16, *, begin: bool = True):
    """The toy decoders' offline tokenizer: a ``PreTrainedTokenizerFast`` (WordLevel over :func:`toy_vocabulary`,
    :func:`polymodal.offline_tokenizer.word_level_tokenizer`) padding to ``model_max_length``.

    Every text becomes ``<|endoftext|> words <|endoftext|>`` (CLIP-style begin and end token, so ``""`` has an
    embedding); ``begin=False``: ``words <|endoftext|>`` (the toy CLIP's pooling convention). Deterministic: the
    vocabulary is the sorted word set, so ids never depend on training data. Saved with the pipeline
    (``tokenizer/tokenizer.json``), so a trained toy decoder needs nothing from the hub.
    """
    from polymodal.offline_tokenizer import word_level_tokenizer

    return word_level_tokenizer(toy_vocabulary(), model_max_length, begin=begin)


@dataclass(frozen=True)
class ToyItem:
    """One procedural medium.

    Attributes:
        id: ``"<modality>-<index:05d>"``.
        data: image uint8 (H, W, 3); audio float32 (S,); video uint8 (F, H, W, 3).
        caption: one phrasing drawn from the modality's templates.
        attributes: the drawn attributes (image: shape, colour; audio: pitch, timbre; video: shape, colour,
            direction) plus layout details (size_px, background, ...).
    """

    id: str
    modality: Modality
    data: np.ndarray
    caption: str
    attributes: dict = field(default_factory=dict)
    sample_rate_hz: int | None = None
    fps: float | None = None


def item_rng(seed: int, modality: Modality, index: int) -> np.random.Generator:
    """The generator of item ``index`` of ``modality`` in a dataset of seed ``seed``."""
    return np.random.default_rng([int(seed), _MODALITY_SALT[Modality.parse(modality)], int(index)])


def _colour(rng: np.random.Generator, name: str) -> tuple[int, int, int]:
    base = np.asarray(COLOURS[name], dtype=np.int64)
    return tuple(int(v) for v in np.clip(base + rng.integers(-COLOUR_JITTER, COLOUR_JITTER + 1, 3), 0, 255))


def shape_polygon(shape: str, x0: float, y0: float, side_px: float):
    """Pillow drawing arguments of ``shape`` in the box (x0, y0, x0 + side, y0 + side)."""
    x1, y1 = x0 + side_px - 1, y0 + side_px - 1
    if shape == "triangle":
        return [((x0 + x1) / 2, y0), (x1, y1), (x0, y1)]
    return [x0, y0, x1, y1]


def draw_shape(canvas: np.ndarray, shape: str, rgb: tuple[int, int, int], x0: float, y0: float, side_px: float) -> np.ndarray:
    """Draw ``shape`` (axis-aligned; triangle apex up) onto a copy of ``canvas`` uint8 (H, W, 3).

    Raises:
        ValueError: unknown shape (lists the choices).
    """
    from PIL import Image, ImageDraw

    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}; choose from: {', '.join(SHAPES)}")
    img = Image.fromarray(canvas, mode="RGB")
    draw = ImageDraw.Draw(img)
    box = shape_polygon(shape, x0, y0, side_px)
    if shape == "circle":
        draw.ellipse(box, fill=rgb)
    elif shape == "square":
        draw.rectangle(box, fill=rgb)
    else:
        draw.polygon(box, fill=rgb)
    return np.asarray(img, dtype=np.uint8).copy()


def _check_layout(layout: str) -> None:
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; choose from: {', '.join(LAYOUTS)}")


def _background(rng: np.random.Generator, size_px: int, layout: str = "random") -> tuple[np.ndarray, int]:
    grey = CANONICAL_GREY if layout == "canonical" else int(BACKGROUND_GREYS[rng.integers(len(BACKGROUND_GREYS))])
    return np.full((size_px, size_px, 3), grey, dtype=np.uint8), grey


def _jitter(rng: np.random.Generator, size_px: int) -> int:
    j = max(1, size_px // 32)
    return int(rng.integers(-j, j + 1))


def render_image(rng: np.random.Generator, size_px: int = 64, shape: str | None = None,
                 colour: str | None = None, layout: str = "random") -> tuple[np.ndarray, dict]:
    """One image uint8 (size_px, size_px, 3) and its attributes; unspecified attributes are drawn.

    Raises:
        ValueError: unknown ``layout`` (see :data:`LAYOUTS`).
    """
    _check_layout(layout)
    shape = shape or SHAPES[rng.integers(len(SHAPES))]
    colour = colour or list(COLOURS)[rng.integers(len(COLOURS))]
    canvas, grey = _background(rng, size_px, layout)
    if layout == "canonical":
        side = int(rng.integers(int(0.55 * size_px), int(0.65 * size_px) + 1))
        x0 = (size_px - side) // 2 + _jitter(rng, size_px)
        y0 = (size_px - side) // 2 + _jitter(rng, size_px)
    else:
        side = int(rng.integers(int(0.35 * size_px), int(0.65 * size_px) + 1))
        x0 = int(rng.integers(0, size_px - side + 1))
        y0 = int(rng.integers(0, size_px - side + 1))
    image = draw_shape(canvas, shape, _colour(rng, colour), x0, y0, side)
    return image, {"shape": shape, "colour": colour, "size_px": side, "x_px": x0, "y_px": y0, "background": grey}


def render_audio(rng: np.random.Generator, duration_s: float = 1.0, sample_rate_hz: int = SAMPLE_RATE_HZ,
                 pitch: str | None = None, timbre: str | None = None) -> tuple[np.ndarray, dict]:
    """One tone float32 (S,) with S = duration_s * sample_rate_hz, and its attributes."""
    pitch = pitch or list(PITCHES_HZ)[rng.integers(len(PITCHES_HZ))]
    timbre = timbre or TIMBRES[rng.integers(len(TIMBRES))]
    f0 = PITCHES_HZ[pitch] * float(rng.uniform(0.98, 1.02))
    amplitude = float(rng.uniform(0.3, 0.6))
    t = np.arange(int(round(duration_s * sample_rate_hz))) / sample_rate_hz
    phase = float(rng.uniform(0, 2 * np.pi))
    if timbre == "sine":
        wave = np.sin(2 * np.pi * f0 * t + phase)
    else:  # band-limited square: odd harmonics with amplitude 1/k below Nyquist
        ks = np.arange(1, int(sample_rate_hz / 2 / f0) + 1, 2)
        wave = sum(np.sin(k * (2 * np.pi * f0 * t + phase)) / k for k in ks) * (4 / np.pi)
    wave = wave / max(np.abs(wave).max(), 1e-9) * amplitude
    fade = min(int(0.02 * sample_rate_hz), len(t) // 4)
    if fade:
        ramp = np.linspace(0.0, 1.0, fade)
        wave[:fade] *= ramp
        wave[-fade:] *= ramp[::-1]
    return wave.astype(np.float32), {"pitch": pitch, "timbre": timbre, "frequency_hz": round(f0, 2),
                                     "amplitude": round(amplitude, 3)}


_STEP = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}


def render_video(rng: np.random.Generator, size_px: int = 64, num_frames: int = 8, direction: str | None = None,
                 shape: str | None = None, colour: str | None = None,
                 layout: str = "random") -> tuple[np.ndarray, dict]:
    """One clip uint8 (num_frames, size_px, size_px, 3) of a shape moving in ``direction``, and its attributes.

    Raises:
        ValueError: unknown ``layout`` (see :data:`LAYOUTS`).
    """
    _check_layout(layout)
    direction = direction or DIRECTIONS[rng.integers(len(DIRECTIONS))]
    shape = shape or SHAPES[rng.integers(len(SHAPES))]
    colour = colour or list(COLOURS)[rng.integers(len(COLOURS))]
    canvas, grey = _background(rng, size_px, layout)
    rgb = _colour(rng, colour)
    travel = 0.45 * size_px
    dx, dy = _STEP[direction]
    if layout == "canonical":  # one size; the path is centred on the frame
        side = int(0.3 * size_px)
        x0 = (size_px - side) / 2 - dx * travel / 2 + _jitter(rng, size_px)
        y0 = (size_px - side) / 2 - dy * travel / 2 + _jitter(rng, size_px)
    else:
        side = int(rng.integers(int(0.25 * size_px), int(0.35 * size_px) + 1))
        # start so that the whole path stays inside the frame
        lo_x, hi_x = (travel if dx < 0 else 0), size_px - side - (travel if dx > 0 else 0)
        lo_y, hi_y = (travel if dy < 0 else 0), size_px - side - (travel if dy > 0 else 0)
        x0, y0 = float(rng.uniform(lo_x, hi_x)), float(rng.uniform(lo_y, hi_y))
    frames = []
    for f in range(num_frames):
        u = f / max(num_frames - 1, 1)
        frames.append(draw_shape(canvas, shape, rgb, round(x0 + dx * travel * u), round(y0 + dy * travel * u), side))
    return np.stack(frames), {"direction": direction, "shape": shape, "colour": colour, "size_px": side,
                              "background": grey, "num_frames": num_frames}


def caption_for(modality: Modality, attributes: dict, rng: np.random.Generator,
                templates: Sequence[str] | None = None) -> str:
    """One phrasing of ``attributes`` drawn from ``templates`` (default: the modality's)."""
    templates = templates or TEMPLATES[modality]
    return templates[rng.integers(len(templates))].format(**attributes)


def _make_image(rng: np.random.Generator, size_px: int, num_frames: int, duration_s: float, layout: str):
    data, attrs = render_image(rng, size_px, layout=layout)
    return data, attrs, {}


def _make_audio(rng: np.random.Generator, size_px: int, num_frames: int, duration_s: float, layout: str):
    data, attrs = render_audio(rng, duration_s)
    return data, attrs, {"sample_rate_hz": SAMPLE_RATE_HZ}


def _make_video(rng: np.random.Generator, size_px: int, num_frames: int, duration_s: float, layout: str):
    data, attrs = render_video(rng, size_px, num_frames, layout=layout)
    return data, attrs, {"fps": 8.0}


# The toy world's recipe per modality: how an item is drawn (rng, size_px, num_frames, duration_s, layout ->
# data, attributes, ToyItem metadata) and the phrasings of its captions.
MAKERS = {Modality.IMAGE: _make_image, Modality.AUDIO: _make_audio, Modality.VIDEO: _make_video}
TEMPLATES = {Modality.IMAGE: IMAGE_TEMPLATES, Modality.AUDIO: AUDIO_TEMPLATES, Modality.VIDEO: VIDEO_TEMPLATES}


def toy_modality(modality: Modality | str) -> Modality:
    """``modality`` parsed and checked to have a toy recipe.

    Raises:
        ValueError: unknown modality, or one the toy world has no recipe for (lists the choices).
    """
    modality = Modality.parse(modality)
    if modality not in MAKERS:
        raise ValueError(f"the toy world has no {modality.value} recipe; choose from: "
                         f"{', '.join(m.value for m in MAKERS)}")
    return modality


def make_item(modality: Modality | str, index: int, seed: int = 0, *, size_px: int = 64, num_frames: int = 8,
              duration_s: float = 1.0, layout: str = "random") -> ToyItem:
    """Item ``index`` of ``modality`` (reproducible from ``seed`` and ``index`` alone).

    Raises:
        ValueError: unknown modality (or one without a toy recipe) or layout, ``size_px`` not in
            :data:`IMAGE_SIZES_PX`, ``num_frames`` outside 8..16.
    """
    modality = toy_modality(modality)
    _check_layout(layout)
    if size_px not in IMAGE_SIZES_PX:
        raise ValueError(f"size_px must be one of {IMAGE_SIZES_PX}, got {size_px}")
    if not 8 <= num_frames <= 16:
        raise ValueError(f"num_frames must be in 8..16, got {num_frames}")
    rng = item_rng(seed, modality, index)
    item_id = f"{modality.value}-{index:05d}"
    data, attrs, meta = MAKERS[modality](rng, size_px, num_frames, duration_s, layout)
    return ToyItem(item_id, modality, data, caption_for(modality, attrs, rng), attrs, **meta)


def iter_items(modality: Modality | str, count: int, seed: int = 0, **kwargs) -> Iterator[ToyItem]:
    """Items 0..count-1 of ``modality`` (see :func:`make_item`)."""
    for i in range(count):
        yield make_item(modality, i, seed, **kwargs)


def encode_item(item: ToyItem) -> bytes:
    """PNG / WAV (float) / MP4 (h264) bytes of ``item``: its modality's codec (as ``decoders.Medium.encode``; the
    decoded frames of an MP4 are reproducible, x264's bytes vary slightly from run to run)."""
    meta = {k: v for k, v in (("sample_rate_hz", item.sample_rate_hz), ("fps", item.fps)) if v is not None}
    return item.modality.spec.codec.encode(item.data, meta)[0]


def write_dataset(out_dir: str | Path, *, count: int, seed: int = 0,
                  modalities: Sequence[Modality | str] = tuple(MAKERS), size_px: int = 64, num_frames: int = 8,
                  duration_s: float = 1.0, layout: str = "random", progress: bool = False) -> Path:
    """Write ``count`` items per modality under ``out_dir`` and ``out_dir/catalog.jsonl``; returns the catalog.

    Raises:
        ValueError: ``count`` < 1, or see :func:`make_item`.
    """
    if count < 1:
        raise ValueError(f"count must be >= 1, got {count}")
    out = Path(out_dir)
    mods = [Modality.parse(m) for m in modalities]
    rows = []
    total = count * len(mods)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=total, desc="toy data", unit="item")
    for m in mods:
        (out / m.value).mkdir(parents=True, exist_ok=True)
        for item in iter_items(m, count, seed, size_px=size_px, num_frames=num_frames, duration_s=duration_s,
                               layout=layout):
            rel = f"{m.value}/{item.id}.{m.spec.codec.ext}"
            (out / rel).write_bytes(encode_item(item))
            rows.append({"id": item.id, "modality": m.value, "path": rel, "caption": item.caption,
                         "attributes": item.attributes, "source": "toyworld"})
            if bar is not None:
                bar.update(1)
    if bar is not None:
        bar.close()
    catalog = out / "catalog.jsonl"
    tmp = catalog.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in rows), encoding="utf-8")
    tmp.replace(catalog)
    return catalog


def read_catalog(path: str | Path) -> list[dict]:
    """The rows of a ``catalog.jsonl`` written by :func:`write_dataset` (``path`` made absolute)."""
    path = Path(path)
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            row = json.loads(line)
            row["path"] = str((path.parent / row["path"]).resolve())
            rows.append(row)
    return rows
