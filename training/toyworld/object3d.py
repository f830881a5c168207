"""The toy world's 3D part (issue #29): procedural coloured point clouds, their checker, and the toy 3D decoder's
recipe and training (cached, resumable).

- Generator (:func:`make_cloud`, :func:`make_item`): P points sampled uniformly by area on the surface of one of
  :data:`SHAPES_3D` (sphere, cube, pyramid, cylinder, torus; axis-aligned, z up, centred at the origin), of one of
  the toy :data:`~training.toyworld.data.COLOURS` (jittered by +-15 levels per item, 1% per point), at one of
  :data:`SIZES` (the half-extent of the shape), with Gaussian jitter of 1% of the size: float32 (P, 6) xyz + rgb in
  [0, 1], the codec's format (:mod:`polymodal.media.object3d`). Captions from :data:`TEMPLATES_3D`.
- Checker (:func:`check_object3d`, no learned parts): colour = the palette entry nearest the points' median colour;
  shape = the primitive whose surface, fitted to the points' bounding box (centre and half-extents), lies nearest
  the points (median distance over the size); ``None`` when even the best fit is off by more than
  :data:`MAX_FIT_RESIDUAL` (noise, a blob). Chance for shape and colour together is 1/20.
- Decoder (:class:`Object3DDecoderRecipe`, :func:`train_object3d_decoder`): a
  :class:`decoders.object3d.PointSetDiffusionPipeline` (our :class:`~decoders.object3d.PointSetDenoiser`: diffusers
  ``BasicTransformerBlock`` s over the points, cross-attending to a CLIP text encoder's (Q, D_cond) states; DDIM's
  schedule; epsilon loss; captions dropped to ``""`` for guidance; EMA of the weights saved) trained from scratch on
  CPU, written as a diffusers folder ``OUT/object3d`` plus its entry in ``OUT/toyworld-decoders.json`` (the same
  manifest as the other toy decoders; :func:`polymodal.presets.toy.decoder_config` reads it). Cached by the recipe's
  hash; a run stopped midway resumes from ``OUT/object3d.partial/checkpoint.pt`` (written every
  ``checkpoint_every`` steps).

The ``toy-3d`` preset (:func:`polymodal.presets.toy.toy_3d_preset`) adds this decoder and ``<3D0>..<3D3>`` to
``toy``; ``toy`` itself (its data, vocabulary, decoders and export) is untouched by this module.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from polymodal.media.object3d import OBJECT3D
from training.toyworld.data import COLOURS

SHAPES_3D: tuple[str, ...] = ("sphere", "cube", "pyramid", "cylinder", "torus")
SIZES: dict[str, float] = {"small": 0.5, "large": 0.9}  # half-extent of the shape, in object units
TEMPLATES_3D = (
    "a {size} {colour} {shape}",
    "a {colour} {shape}",
    "a 3d model of a {colour} {shape}",
    "a {size} {colour} {shape} in 3d",
    "a point cloud of a {size} {colour} {shape}",
    "one {colour} {shape} object",
)
# ---- requests: the toy-3d instruct stage's phrasings and its benchmark's (registered with
# training.toyworld.checkers.RECIPE_PHRASINGS into training.toyworld.phrasings: requests("object3d", n, heldout=...))
TRAIN_REQUESTS_3D = ("{caption}", "Make {caption}.", "Build {caption}.", "Generate {caption}.", "Sculpt {caption}.",
                     "Can you model {caption}?", "Please render {caption}.", "Create {caption}.")
HELDOUT_REQUESTS_3D = ("Could you model {caption} for me?", "I would like {caption}.", "Make me {caption}, please.",
                       "Give me {caption}.")
LEAD_INS_3D = ("Here is {caption}.", "Sure, here is {caption} in 3d.", "This is {caption}.")
SCORED_3D = ("shape", "colour")  # what a 3D medium is scored on (chance 1/20); the size is reported, not scored
# words of the toy 3D decoder's tokenizer besides the templates' and attribute values (request words)
_EXTRA_WORDS_3D = "an the of me please make draw show create generate render give build sculpt shape model".split()
ATTRIBUTE_COMBOS_3D = [{"size": z, "colour": c, "shape": s}
                       for z, c, s in itertools.product(SIZES, COLOURS, SHAPES_3D)]  # 40: 5 shapes x 4 colours x 2
PHRASINGS_3D = {"captions": TEMPLATES_3D, "train": TRAIN_REQUESTS_3D, "heldout": HELDOUT_REQUESTS_3D,
                "lead_ins": LEAD_INS_3D, "combos": ATTRIBUTE_COMBOS_3D}
POINT_JITTER = 0.01  # of the size
COLOUR_JITTER = 15  # uint8 levels, per item
MAX_FIT_RESIDUAL = 0.12  # median point-to-surface distance over the size above which no shape is read
_SALT = 4  # seed salt of the 3D items (image 1, audio 2, video 3 in training.toyworld.data)
_PALETTE = np.asarray(list(COLOURS.values()), dtype=np.float64) / 255.0
# proportions (x, y, z half-extents over the size) and parameters of each primitive
CYLINDER_RADIUS = 0.6
TORUS_TUBE = 0.3  # tube radius over the size; the ring's radius is 1 - TORUS_TUBE
PYRAMID_HEIGHT = 1.0  # half-height over the size (base at z = -size, apex at z = +size)


# ------------------------------------------------------------------------------------------------ generator


def _sample_surface(shape: str, n: int, rng: np.random.Generator) -> np.ndarray:
    """(n, 3) points uniform by area on the unit-size primitive (half-extent 1 in its largest axis)."""
    if shape == "sphere":
        v = rng.normal(size=(n, 3))
        return v / np.linalg.norm(v, axis=1, keepdims=True)
    if shape == "cube":
        face = rng.integers(0, 6, n)
        uv = rng.uniform(-1, 1, (n, 2))
        p = np.empty((n, 3))
        axis, sign = face // 2, np.where(face % 2, 1.0, -1.0)
        for a in range(3):
            others = [b for b in range(3) if b != a]
            sel = axis == a
            p[sel, a] = sign[sel]
            p[np.ix_(sel, others)] = uv[sel]
        return p
    if shape == "cylinder":
        r, h = CYLINDER_RADIUS, 1.0
        side, cap = 2 * np.pi * r * 2 * h, np.pi * r * r  # areas: side, one cap
        kind = rng.choice(3, size=n, p=np.array([side, cap, cap]) / (side + 2 * cap))
        theta = rng.uniform(0, 2 * np.pi, n)
        rho = np.where(kind == 0, r, r * np.sqrt(rng.uniform(0, 1, n)))
        z = np.where(kind == 0, rng.uniform(-h, h, n), np.where(kind == 1, h, -h))
        return np.stack([rho * np.cos(theta), rho * np.sin(theta), z], axis=1)
    if shape == "pyramid":
        a, h = 1.0, PYRAMID_HEIGHT
        slant = np.sqrt(a * a + (2 * h) ** 2)
        side, base = 4 * a * slant, 4 * a * a  # four triangles of base 2a and height slant; the square base
        on_base = rng.uniform(0, side + base, n) < base
        p = np.empty((n, 3))
        p[on_base, :2] = rng.uniform(-a, a, (on_base.sum(), 2))
        p[on_base, 2] = -h
        k = (~on_base).sum()
        s = np.sqrt(rng.uniform(0, 1, k))  # 0 at the apex, 1 at the base edge (uniform on a triangle)
        t = rng.uniform(-1, 1, k) * s
        face = rng.integers(0, 4, k)
        x, y = np.where(face < 2, t * a, np.where(face == 2, 1.0, -1.0) * s * a), \
            np.where(face < 2, np.where(face == 0, 1.0, -1.0) * s * a, t * a)
        p[~on_base] = np.stack([x, y, h - 2 * h * s], axis=1)
        return p
    if shape == "torus":
        r = TORUS_TUBE
        big = 1.0 - r
        out = np.empty((0, 3))
        while len(out) < n:  # rejection sampling: area density grows with the distance from the axis
            theta = rng.uniform(0, 2 * np.pi, 2 * n)
            phi = rng.uniform(0, 2 * np.pi, 2 * n)
            keep = rng.uniform(0, big + r, 2 * n) < big + r * np.cos(phi)
            theta, phi = theta[keep], phi[keep]
            ring = big + r * np.cos(phi)
            out = np.concatenate([out, np.stack([ring * np.cos(theta), ring * np.sin(theta), r * np.sin(phi)], 1)])
        return out[:n]
    raise ValueError(f"unknown 3D shape {shape!r}; choose from: {', '.join(SHAPES_3D)}")


def make_cloud(shape: str, colour: str, size: str, rng: np.random.Generator, num_points: int = 256) -> np.ndarray:
    """One coloured point cloud: float32 (num_points, 6), xyz + rgb in [0, 1].

    Raises:
        ValueError: an unknown shape, colour or size (lists the choices).
    """
    if colour not in COLOURS:
        raise ValueError(f"unknown colour {colour!r}; choose from: {', '.join(COLOURS)}")
    if size not in SIZES:
        raise ValueError(f"unknown size {size!r}; choose from: {', '.join(SIZES)}")
    scale = SIZES[size]
    xyz = _sample_surface(shape, num_points, rng) * scale
    xyz = xyz + rng.normal(0.0, POINT_JITTER * scale, xyz.shape)
    base = np.clip(np.asarray(COLOURS[colour], dtype=np.float64) + rng.integers(-COLOUR_JITTER, COLOUR_JITTER + 1, 3),
                   0, 255) / 255.0
    rgb = np.clip(base + rng.normal(0.0, 0.01, (num_points, 3)), 0.0, 1.0)
    return np.concatenate([xyz, rgb], axis=1).astype(np.float32)


@dataclass(frozen=True)
class Object3DItem:
    """One toy 3D medium: ``points`` float32 (P, 6); ``attributes`` shape, colour, size; one ``caption``."""

    id: str
    points: np.ndarray
    caption: str
    attributes: dict


def make_item(index: int, seed: int = 0, *, num_points: int = 256) -> Object3DItem:
    """Item ``index`` of the toy 3D data of ``seed`` (deterministic; attributes drawn uniformly)."""
    rng = np.random.default_rng([seed, _SALT, index])
    shape = SHAPES_3D[rng.integers(len(SHAPES_3D))]
    colour = list(COLOURS)[rng.integers(len(COLOURS))]
    size = list(SIZES)[rng.integers(len(SIZES))]
    points = make_cloud(shape, colour, size, rng, num_points)
    attrs = {"shape": shape, "colour": colour, "size": size}
    caption = TEMPLATES_3D[rng.integers(len(TEMPLATES_3D))].format(**attrs)
    return Object3DItem(f"{OBJECT3D.value}-{index:05d}", points, caption, attrs)


def object3d_vocabulary() -> list[str]:
    """Sorted words of the 3D templates, attribute values and request words (the toy 3D decoder's tokenizer)."""
    import re

    words = set(_EXTRA_WORDS_3D) | set(SHAPES_3D) | set(COLOURS) | set(SIZES)
    for t in TEMPLATES_3D:
        words |= set(re.findall(r"[a-z0-9]+", re.sub(r"\{[a-z]+\}", " ", t.lower())))
    return sorted(words)


def object3d_tokenizer(model_max_length: int = 16):
    """WordLevel over :func:`object3d_vocabulary` (``<|endoftext|> words <|endoftext|>``, padded), offline."""
    from polymodal.offline_tokenizer import word_level_tokenizer

    return word_level_tokenizer(object3d_vocabulary(), model_max_length, begin=True)


# -------------------------------------------------------------------------------------------------- checker


@dataclass(frozen=True)
class Object3DReading:
    """What :func:`check_object3d` read: ``shape`` and ``colour`` (``None``: unreadable), ``size`` (nearest of
    :data:`SIZES` to the half-extent), and the best fit's median residual over the size."""

    shape: str | None
    colour: str | None
    size: str | None = None
    residual: float = float("inf")


def _residuals(p: np.ndarray, half: np.ndarray) -> dict[str, np.ndarray]:
    """Per-point distance (approximate where exact is costly) to each primitive fitted to half-extents ``half``
    (x, y, z), for centred points ``p`` (n, 3)."""
    x, y, z = np.abs(p[:, 0]), np.abs(p[:, 1]), p[:, 2]
    hxy, hz = float(half[:2].mean()), float(half[2])
    rho = np.hypot(p[:, 0], p[:, 1])
    out = {}
    out["sphere"] = np.abs(np.linalg.norm(p / half, axis=1) - 1.0) * half.mean()
    out["cube"] = np.abs(np.max(np.abs(p) / half, axis=1) - 1.0) * half.mean()
    dr, dz = rho - hxy, np.abs(z) - hz  # capped cylinder's signed distance
    out["cylinder"] = np.abs(np.minimum(np.maximum(dr, dz), 0.0) + np.hypot(np.maximum(dr, 0), np.maximum(dz, 0)))
    cheb = np.maximum(x, y)
    width = hxy * (hz - z) / (2 * hz)  # the square section's half-width at height z (apex at +hz)
    side = np.abs(cheb - width) * (2 * hz) / np.hypot(2 * hz, hxy)
    base = np.abs(z + hz) + np.maximum(cheb - hxy, 0.0)
    out["pyramid"] = np.minimum(side, base)
    tube = TORUS_TUBE * hxy  # the torus's own proportions (its height alone would fit a sphere with a zero ring)
    ring = hxy - tube
    out["torus"] = np.abs(np.hypot(rho - ring, z) - tube)
    return out


def check_object3d(points) -> Object3DReading:
    """Read the shape, colour and size of a point cloud float32 (P, 6) (xyz + rgb in [0, 1]).

    Raises:
        ValueError: not a (P, 6) array with P >= 8.
    """
    a = np.asarray(points, dtype=np.float64)
    if a.ndim != 2 or a.shape[1] != 6 or len(a) < 8:
        raise ValueError(f"points must be (P, 6) with P >= 8, got shape {a.shape}")
    a = a[np.all(np.isfinite(a), axis=1)]
    if len(a) < 8:
        return Object3DReading(None, None)
    rgb = np.median(a[:, 3:], axis=0)
    colour = list(COLOURS)[int(np.argmin(np.linalg.norm(_PALETTE - rgb, axis=1)))]
    xyz = a[:, :3]
    lo, hi = np.percentile(xyz, 1, axis=0), np.percentile(xyz, 99, axis=0)  # robust to a few stray points
    centre, half = (lo + hi) / 2, np.maximum((hi - lo) / 2, 1e-6)
    scale = float(half.max())
    size = min(SIZES, key=lambda k: abs(SIZES[k] - scale))
    fits = {k: float(np.median(v)) / scale for k, v in _residuals(xyz - centre, half).items()}
    best = min(fits, key=fits.get)
    shape = best if fits[best] <= MAX_FIT_RESIDUAL else None
    return Object3DReading(shape, colour, size, round(fits[best], 4))


def read_ply_points(data: bytes):
    """A PLY file's bytes (as the codec writes them) -> (float32 (P, 6), {}) for the checker."""
    from polymodal.media.object3d import decode_ply

    return decode_ply(data), {}


# --------------------------------------------------------------------------------------------------- decoder


@dataclass(frozen=True)
class Object3DDecoderRecipe:
    """Everything that decides what the toy 3D decoder becomes (hashed for caching; generation fields are not)."""

    num_items: int = 2000
    num_points: int = 256
    cond_tokens: int = 16
    cond_dim: int = 64
    text_layers: int = 2
    width: int = 128  # 6 blocks of width 128 (trial C2, 2026-12-04: 77/80 held-out captions right at guidance 5;
    num_layers: int = 6  # width 96 x 4 blocks: 50/80 linear, 65/80 cosine; bench/results/object3d_decoder_trials.json)
    num_heads: int = 4
    beta_schedule: str = "squaredcos_cap_v2"  # the DDIM scheduler's (decoders.object3d.point_set_scheduler)
    # the folder is 3.9 MB (the denoiser saved in float16; polymodal/assets/toy-3d, outside the toy build's 10 MB).
    # Training: 6000 steps took 42 min on two torch threads of the quiet 2-core box; hours when the box is shared
    steps: int = 6000
    lr: float = 1e-3
    batch_size: int = 16
    caption_dropout: float = 0.1
    ema_decay: float = 0.995
    seed: int = 0
    checkpoint_every: int = 500
    num_inference_steps: int = 50
    guidance_scale: float = 5.0

    def decoder_fields(self) -> dict:
        """``cond_tokens``, ``cond_dim`` and generation ``defaults`` of the DecoderConfig that loads the result."""
        return {"cond_tokens": self.cond_tokens, "cond_dim": self.cond_dim,
                "defaults": {"num_inference_steps": self.num_inference_steps, "guidance_scale": self.guidance_scale}}

    def scaled(self, factor: float) -> "Object3DDecoderRecipe":
        """The same recipe with ``factor`` times the training steps (at least 1): tests and quick runs."""
        return dataclasses.replace(self, steps=max(1, int(self.steps * factor)))

    def config_hash(self) -> str:
        """Hash of every field that changes the trained weights (not ``checkpoint_every`` or generation fields)."""
        skip = {"num_inference_steps", "guidance_scale", "checkpoint_every"}
        fields = {k: v for k, v in dataclasses.asdict(self).items() if k not in skip}
        return hashlib.sha256(json.dumps({"object3d": 1, **fields}, sort_keys=True).encode()).hexdigest()[:16]


def build_point_pipeline(recipe: Object3DDecoderRecipe):
    """A :class:`decoders.object3d.PointSetDiffusionPipeline` with random toy components (seeded)."""
    import torch
    from transformers import CLIPTextConfig, CLIPTextModel

    from decoders import tiny
    from decoders.object3d import PointSetDenoiser, PointSetDiffusionPipeline, point_set_scheduler

    tokenizer = object3d_tokenizer(recipe.cond_tokens)
    d = recipe.cond_dim
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(recipe.seed)
        text_encoder = CLIPTextModel(CLIPTextConfig(
            vocab_size=len(tokenizer), hidden_size=d, intermediate_size=2 * d, num_hidden_layers=recipe.text_layers,
            num_attention_heads=tiny.num_heads(d), max_position_embeddings=recipe.cond_tokens,
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id))
        denoiser = PointSetDenoiser(num_points=recipe.num_points, width=recipe.width, num_layers=recipe.num_layers,
                                    num_heads=recipe.num_heads, cross_attention_dim=d)
    return PointSetDiffusionPipeline(denoiser=denoiser, text_encoder=text_encoder, tokenizer=tokenizer,
                                     scheduler=point_set_scheduler(recipe.beta_schedule))


def _dataset(recipe: Object3DDecoderRecipe) -> tuple[np.ndarray, list[str]]:
    items = [make_item(i, recipe.seed, num_points=recipe.num_points) for i in range(recipe.num_items)]
    return np.stack([it.points for it in items]), [it.caption for it in items]


def train_object3d_decoder(out_dir: str | Path, recipe: Object3DDecoderRecipe | None = None, *,
                           force: bool = False, progress: bool = True, stop_after: int | None = None) -> dict:
    """Train (or reuse) the toy 3D decoder into ``out_dir/object3d`` and its entry in ``out_dir/MANIFEST``.

    Cached: an entry whose ``config_hash`` matches and whose folder exists is returned as is (unless ``force``).
    Resumable: every ``recipe.checkpoint_every`` steps the model, EMA, optimiser, RNG and step go to
    ``out_dir/object3d.partial/checkpoint.pt``; a later call with the same recipe continues from there.

    Args:
        out_dir: a toy decoders folder (``ROOT/decoders``; other modalities' entries are kept).
        stop_after: stop after this many steps of this call, leaving a checkpoint (tests of resuming).

    Returns:
        The manifest entry (``path``, ``config_hash``, ``recipe``, ``figures``, ``cond_tokens``, ``cond_dim``,
        ``defaults``); ``{"partial": step}`` when ``stop_after`` stopped it first.
    """
    import torch
    from tqdm import tqdm

    from decoders.object3d import points_to_model
    from polymodal.presets.toy import MANIFEST
    from training.toyworld.train import _ema_update, _smooth, _token_ids, _write_manifest

    recipe = recipe or Object3DDecoderRecipe()
    out_dir = Path(out_dir)
    folder, partial = out_dir / OBJECT3D.value, out_dir / f"{OBJECT3D.value}.partial"
    manifest_path = out_dir / MANIFEST
    manifest = json.loads(manifest_path.read_text()) if manifest_path.is_file() else {"decoders": {}}
    key = recipe.config_hash()
    entry = manifest["decoders"].get(OBJECT3D.value)
    if not force and entry and entry.get("config_hash") == key and (folder / "model_index.json").is_file():
        if progress:
            print(f"object3d: up to date ({folder}, config hash {key})")
        return entry
    t_start = time.time()
    pipe = build_point_pipeline(recipe)
    den, text_encoder = pipe.denoiser, pipe.text_encoder
    ema = type(den)(**den.config)
    ema.load_state_dict(den.state_dict())
    ema.requires_grad_(False)
    params = list(den.parameters()) + list(text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=recipe.lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(recipe.seed)
    step, smoothed = 0, float("nan")
    ckpt = partial / "checkpoint.pt"
    if not force and ckpt.is_file():
        state = torch.load(ckpt, weights_only=False)
        if state.get("config_hash") == key:
            den.load_state_dict(state["denoiser"])
            text_encoder.load_state_dict(state["text_encoder"])
            ema.load_state_dict(state["ema"])
            opt.load_state_dict(state["optimizer"])
            gen.set_state(state["generator"])
            step, smoothed = int(state["step"]), float(state["loss"])
            if progress:
                print(f"object3d: resuming at step {step} of {recipe.steps} ({ckpt})")
    points, captions = _dataset(recipe)
    data = points_to_model(torch.from_numpy(points))  # (N, P, 6)
    ids, empty_ids = _token_ids(pipe.tokenizer, captions)  # (N, Q), (1, Q)
    empty = empty_ids[0]
    scheduler = pipe.scheduler
    num_train = scheduler.config.num_train_timesteps
    n, bs = len(data), min(recipe.batch_size, len(data))
    den.train()
    text_encoder.train()
    first = step
    bar = tqdm(range(step, recipe.steps), desc="object3d denoiser", disable=not progress, initial=step,
               total=recipe.steps)
    stopped = False
    for i in bar:
        idx = torch.randint(0, n, (bs,), generator=gen)
        x0 = data[idx]
        tok = ids[idx].clone()
        drop = torch.rand(bs, generator=gen) < recipe.caption_dropout
        tok[drop] = empty
        noise = torch.randn(x0.shape, generator=gen)
        t = torch.randint(0, num_train, (bs,), generator=gen)
        xt = scheduler.add_noise(x0, noise, t)
        cond = text_encoder(tok)[0]
        loss = torch.nn.functional.mse_loss(den(xt, t, cond), noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        _ema_update(ema, den, recipe.ema_decay)
        smoothed = _smooth(smoothed, loss.item(), 0.98)
        bar.set_postfix(loss=f"{smoothed:.4f}")
        step = i + 1
        last = step == recipe.steps
        halt = stop_after is not None and step - first >= stop_after and not last
        if step % recipe.checkpoint_every == 0 or halt:
            partial.mkdir(parents=True, exist_ok=True)
            torch.save({"config_hash": key, "step": step, "loss": smoothed, "denoiser": den.state_dict(),
                        "text_encoder": text_encoder.state_dict(), "ema": ema.state_dict(),
                        "optimizer": opt.state_dict(), "generator": gen.get_state()}, ckpt.with_suffix(".tmp"))
            ckpt.with_suffix(".tmp").replace(ckpt)
        if halt:
            stopped = True
            break
    bar.close()
    if stopped:
        return {"partial": step}
    text_encoder.eval()
    # the denoiser's weights stored in float16 (half the package size: ~3.8 MB at width 128 x 6 blocks); the
    # decoder loads them at its own dtype (float32 on a CPU), so serving computes in float32 as it trained
    pipe.register_modules(denoiser=ema.eval().to(torch.float16), text_encoder=text_encoder)
    folder.mkdir(parents=True, exist_ok=True)
    pipe.save_pretrained(str(folder), safe_serialization=True)
    entry = {"path": OBJECT3D.value, "config_hash": key, "recipe": dataclasses.asdict(recipe),
             "figures": {"loss": round(smoothed, 5), "train_s": round(time.time() - t_start, 1), "steps": step,
                         "num_items": n}, **recipe.decoder_fields()}
    manifest["decoders"][OBJECT3D.value] = entry
    _write_manifest(manifest_path, manifest, OBJECT3D)
    if ckpt.is_file():
        ckpt.unlink()
    return entry


def score_object3d_decoder(out_dir: str | Path, *, count: int = 40, seed: int = 1, steps: int | None = None,
                           guidance_scale: float | None = None) -> dict:
    """Render ``count`` held-out captions with the trained decoder's own text encoder (no LLM) and check them: the
    decoder's own ceiling for the service figure. ``steps`` / ``guidance_scale``: instead of the decoder's defaults.

    Returns:
        ``{"n", "correct", "accuracy", "shape_accuracy", "colour_accuracy", "shape_errors"}``: both attributes right,
        each alone, and the shape mistakes as ``"asked->read": count`` (most frequent first).
    """
    from collections import Counter

    from decoders import build_decoder
    from polymodal.presets.toy import decoder_config

    config = decoder_config(out_dir, OBJECT3D)
    dec = build_decoder(OBJECT3D, config)
    items = [make_item(100000 + i, seed) for i in range(count)]
    update = {k: v for k, v in (("num_inference_steps", steps), ("guidance_scale", guidance_scale)) if v is not None}
    options = config.defaults.model_copy(update=update)
    embeds = dec.encode_text([it.caption for it in items])
    media = dec.render(embeds, list(range(count)), options)
    right: Counter = Counter()
    errors: Counter = Counter()
    for it, m in zip(items, media):
        r = check_object3d(m.data) if not isinstance(m, Exception) else Object3DReading(None, None)
        shape_ok, colour_ok = r.shape == it.attributes["shape"], r.colour == it.attributes["colour"]
        right.update(shape=shape_ok, colour=colour_ok, both=shape_ok and colour_ok)
        if not shape_ok:
            errors[f"{it.attributes['shape']}->{r.shape}"] += 1
    return {"n": count, "correct": right["both"], "accuracy": right["both"] / count,
            "shape_accuracy": right["shape"] / count, "colour_accuracy": right["colour"] / count,
            "shape_errors": dict(errors.most_common())}

