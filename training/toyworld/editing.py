"""Toy-world editing (issue #27): the held-out edit requests and their scoring, and the image decoder's own edit
ceiling.

- :func:`edit_requests` / :func:`score_edits`: ``n`` held-out sources (random layout: the shape's position, size and
  background vary) with a recolour and a reshape target each, scored per kind (asked change, other attribute kept,
  place kept: :func:`training.toyworld.checkers.kept_place`) with two controls (another request's instruction; the
  same edit on two sources). ``bench/editing.py --quality`` scores the service with them; :func:`decoder_edit_ceiling`
  scores the decoder alone.
- :func:`continue_image_decoder`: the toy image decoder continued on random-layout images beside canonical ones, so
  that img2img (SDEdit: Meng et al. 2022, sec. 3) at mid strength keeps the source's place: trained on canonical
  layouts only, the denoiser pulls any shape to the centre and its one size band, whatever the noise leaves of the
  source (the sweep of trial E1 in the README's editing paragraph). Captions never name the place; the text encoder
  stays frozen by default, so the conditioning space (what the toy's output projector was trained to hit) is kept.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Callable

import numpy as np

from training.toyworld.checkers import check_image, foreground_box, kept_place

QUALITY_SEED = 20_000
"""Seed of the held-out edit sources (the toy build's data seeds are below 10 000)."""
EDIT_KINDS_SCORED = ("recolour", "reshape")


def edit_requests(n: int, size_px: int) -> list[dict]:
    """``n`` held-out sources at ``size_px``, each with a recolour and a reshape target: dicts ``image`` (H, W, 3)
    uint8, ``attrs`` (the source's attributes and layout), ``kinds`` {kind: (held-out instruction, target
    attributes)}, ``phrasings`` {kind: the instruction's template}. Shapes and colours cycle so every pair appears;
    deterministic in ``(n, size_px)``."""
    from training.toyworld.data import COLOURS, SHAPES, render_image
    from training.toyworld.phrasings import edit_instruction, edit_phrasing

    rng = np.random.default_rng(QUALITY_SEED)
    wording = np.random.default_rng([QUALITY_SEED, 1])  # its own stream: the sources stay those of earlier runs
    out = []
    for i in range(n):
        image, attrs = render_image(rng, size_px=size_px, shape=SHAPES[i % 3], colour=list(COLOURS)[(i // 3) % 4])
        colour = [c for c in COLOURS if c != attrs["colour"]][int(rng.integers(3))]
        shape = [x for x in SHAPES if x != attrs["shape"]][int(rng.integers(2))]
        src = {"colour": attrs["colour"], "shape": attrs["shape"]}
        kinds, templates = {}, {}
        for kind, target in (("recolour", {**src, "colour": colour}), ("reshape", {**src, "shape": shape})):
            choice = int(wording.integers(1 << 16))
            kinds[kind] = (edit_instruction(kind, src, target, heldout=True, choice=choice), target)
            templates[kind] = edit_phrasing(kind, heldout=True, choice=choice)
        out.append({"image": image, "attrs": attrs, "kinds": kinds, "phrasings": templates})
    return out


EditFn = Callable[[np.ndarray, str, dict, int, "float | dict | None"], np.ndarray]
"""``edit(source (H, W, 3) uint8, instruction, target attributes, seed, setting) -> edited (H, W, 3) uint8``; the
setting is :func:`score_edits`' (an img2img strength, ``None``, or a dict of edit options)."""


def score_edits(edit: EditFn, reqs: list[dict], size_px: int, setting) -> dict:
    """Both edit kinds of ``reqs`` (:func:`edit_requests`) through ``edit`` at one ``setting`` (passed to
    ``edit`` as it is: an img2img strength, ``None``, or the service bench's edit options): per kind the shares
    ``asked`` (the asked attribute reads as the target's), ``other`` (the other attribute kept), ``place``
    (:func:`~training.toyworld.checkers.kept_place`), ``all``; ``control_other`` (the asked attribute scored against
    another request's target, a derangement: chance is 1/3 recolour, 1/2 reshape) and ``follow`` (request i's
    instruction on source i and on source j: both outputs' boxes nearer their own source's than the other's; 0.5 if
    outputs ignored their sources), with ``chance``, ``chance_plus_3sd``, ``n`` and ``by_phrasing`` (per instruction
    template of the requests' ``phrasings``: ``{"n", "all"}``). Two ``edit`` calls per request and kind."""
    n = len(reqs)
    perm = [(i + 1) % n for i in range(n)]  # a derangement
    rows: dict[str, dict[str, list]] = {}
    for kind in EDIT_KINDS_SCORED:
        r = rows.setdefault(kind, {"asked": [], "other": [], "place": [], "all": [], "control_other": [],
                                   "follow": []})
        outs = []
        attr, other = ("colour", "shape") if kind == "recolour" else ("shape", "colour")
        for i, q in enumerate(reqs):
            prompt, target = q["kinds"][kind]
            out = edit(q["image"], prompt, target, i, setting)
            outs.append(out)
            got = check_image(out)
            ok_asked, ok_other = getattr(got, attr) == target[attr], getattr(got, other) == target[other]
            ok_place = kept_place(foreground_box(q["image"]), foreground_box(out), size_px)
            r["asked"].append(ok_asked)
            r["other"].append(ok_other)
            r["place"].append(ok_place)
            r["all"].append(ok_asked and ok_other and ok_place)
            r["control_other"].append(getattr(got, attr) == reqs[perm[i]]["kinds"][kind][1][attr])
        for i, q in enumerate(reqs):  # control 2: request i's instruction on source j
            j = perm[i]
            prompt, target = q["kinds"][kind]
            other_out = edit(reqs[j]["image"], prompt, target, i, setting)
            bi, bj, oi, oj = (foreground_box(reqs[i]["image"]), foreground_box(reqs[j]["image"]),
                              foreground_box(outs[i]), foreground_box(other_out))
            r["follow"].append(_nearer(bi, bj, oi) and _nearer(bj, bi, oj))
    summary = {}
    for kind, r in rows.items():
        chance = 1 / 3 if kind == "recolour" else 1 / 2
        sd = (chance * (1 - chance) / n) ** 0.5
        summary[kind] = {k: float(np.mean(v)) for k, v in r.items()}
        by_phrasing: dict[str, list[bool]] = {}
        for q, ok in zip(reqs, r["all"]):
            if "phrasings" in q:
                by_phrasing.setdefault(q["phrasings"][kind], []).append(ok)
        summary[kind].update(chance=chance, chance_plus_3sd=chance + 3 * sd, n=n, by_phrasing={
            t: {"n": len(v), "all": float(np.mean(v))} for t, v in sorted(by_phrasing.items())})
    return summary


def _nearer(own, alien, out) -> bool:
    if None in (own, alien, out):
        return False
    return bool(np.hypot(own[0] - out[0], own[1] - out[1]) < np.hypot(alien[0] - out[0], alien[1] - out[1]))


def _start(decoder_dir, recipe, items: int):
    """(the toy decoder at ``decoder_dir`` as a ``StableDiffusionPipeline``, its image size px, the data's rng).

    Raises:
        ValueError: ``recipe.steps`` < 1 or ``items`` < 1. OSError: no loadable pipeline."""
    from diffusers import StableDiffusionPipeline

    if recipe.steps < 1 or items < 1:
        raise ValueError(f"steps and items must be >= 1, got {recipe}")
    pipe = StableDiffusionPipeline.from_pretrained(str(decoder_dir))
    return pipe, int(pipe.unet.config.sample_size * pipe.vae_scale_factor), np.random.default_rng(recipe.seed)


def _denoiser_settings(recipe) -> SimpleNamespace:
    """The fields :func:`training.toyworld.train._train_denoiser` reads of a decoder recipe, from an edit recipe."""
    return SimpleNamespace(unet_steps=recipe.steps, unet_lr=recipe.lr, batch_size=recipe.batch_size,
                           caption_dropout=recipe.caption_dropout, ema_decay=recipe.ema_decay)


def _pixels(images: list[np.ndarray]):
    """uint8 (H, W, 3) ``images`` -> float32 (N, 3, H, W) in [-1, 1], as a VAE takes them."""
    import torch

    return torch.from_numpy((np.stack(images).transpose(0, 3, 1, 2) / 127.5 - 1.0).astype(np.float32))


def _vae_latents(vae, images: list[np.ndarray]):
    """(N, 4, h, w) latent means (the mode of the VAE's diagonal Gaussian) of uint8 (H, W, 3) ``images`` (unscaled;
    in chunks of 256)."""
    import torch

    x = _pixels(images)
    with torch.no_grad():
        return torch.cat([vae.encode(x[i : i + 256]).latent_dist.mean for i in range(0, len(x), 256)])


# ---------------------------------------------------------------------------------------- the decoder alone


def decoder_edit_ceiling(decoder_dir: str | Path, *, n: int = 24, strengths=(0.4, 0.6, 0.8),
                         guidance_scale: float | None = None, num_inference_steps: int | None = None) -> dict:
    """The image decoder's own edit ceiling: :func:`score_edits` with img2img of the toy decoder at
    ``decoder_dir`` (a ``StableDiffusionPipeline`` folder; ``StableDiffusionImg2ImgPipeline.from_pipe``, the same
    weights) prompted with the *target's caption* through its own text encoder ("a green triangle"; no LLM, no
    instruction), per strength. What an LLM that hits the caption's conditioning exactly could reach.

    Returns:
        ``{"decoder", "n", "size_px", "guidance_scale", "num_inference_steps", "runs": [{"strength", "kinds"}]}``.
    Raises:
        OSError: no loadable pipeline at ``decoder_dir``.
    """
    import torch
    from diffusers import StableDiffusionImg2ImgPipeline, StableDiffusionPipeline
    from PIL import Image

    pipe = StableDiffusionPipeline.from_pretrained(str(decoder_dir))
    img2img = StableDiffusionImg2ImgPipeline.from_pipe(pipe)
    img2img.set_progress_bar_config(disable=True)
    size_px = int(pipe.unet.config.sample_size * pipe.vae_scale_factor)
    manifest = Path(decoder_dir).parent / "toyworld-decoders.json"
    recipe = (json.loads(manifest.read_text())["decoders"].get("image", {}).get("recipe", {})
              if manifest.is_file() else {})
    g = guidance_scale if guidance_scale is not None else recipe.get("guidance_scale", 6.0)
    steps = num_inference_steps or recipe.get("num_inference_steps", 20)

    def edit(image, _instruction, target, seed, strength):
        out = img2img(prompt=f"a {target['colour']} {target['shape']}", image=Image.fromarray(image),
                      strength=strength, guidance_scale=g, num_inference_steps=steps,
                      generator=torch.Generator().manual_seed(seed), output_type="np").images[0]
        return (np.clip(out, 0, 1) * 255).round().astype(np.uint8)

    reqs = edit_requests(n, size_px)
    with torch.inference_mode():
        runs = [{"strength": s, "kinds": score_edits(edit, reqs, size_px, s)} for s in strengths]
    return {"decoder": str(decoder_dir), "n": n, "size_px": size_px, "guidance_scale": g,
            "num_inference_steps": steps, "runs": runs}


@dataclass(frozen=True)
class EditDecoderRecipe:
    """How :func:`continue_image_decoder` continues a toy image decoder (hashed into its output's record)."""

    steps: int = 1500
    lr: float = 3e-4
    random_count: int = 1200  # random-layout images (captions name colour and shape only)
    canonical_count: int = 1200  # canonical ones beside them, so plain generation keeps what it had
    batch_size: int = 32
    caption_dropout: float = 0.1
    ema_decay: float = 0.995
    train_text_encoder: bool = False  # frozen: the conditioning space the output projector hits is kept
    seed: int = 7_000  # the data's seed: below QUALITY_SEED and apart from the toy build's (0)


def continue_image_decoder(decoder_dir: str | Path, out_dir: str | Path, recipe: EditDecoderRecipe | None = None, *,
                           progress: bool = True) -> dict:
    """Continue the toy image decoder at ``decoder_dir`` on ``recipe.random_count`` random-layout and
    ``recipe.canonical_count`` canonical-layout images (its size, fresh draws of ``recipe.seed``; horizontal flips)
    for ``recipe.steps`` denoising steps (VAE frozen; text encoder frozen unless ``train_text_encoder``), EMA weights
    saved to ``out_dir`` (a diffusers folder) with ``edit-decoder.json`` (recipe, source, loss, seconds).

    Raises:
        OSError: no loadable pipeline at ``decoder_dir``.
        ValueError: ``recipe.steps`` < 1 or no images asked for; a UNet that is not 4-channel (InstructPix2Pix).
    """
    import torch

    from polymodal.modality import Modality
    from training.toyworld.data import caption_for, render_image
    from training.toyworld.train import _token_ids, _train_denoiser

    recipe = recipe or EditDecoderRecipe()
    t0 = time.time()
    pipe, size_px, rng = _start(decoder_dir, recipe, recipe.random_count + recipe.canonical_count)
    if pipe.unet.config.in_channels != 4:
        raise ValueError(f"{decoder_dir}: a UNet with {pipe.unet.config.in_channels} input channels; --kind sdedit "
                         "continues a Stable Diffusion (4-channel) toy decoder, e.g. a toyworld build's own "
                         "(toyworld train-decoders), not an InstructPix2Pix one")
    images, captions = [], []
    for layout, count in (("random", recipe.random_count), ("canonical", recipe.canonical_count)):
        for _ in range(count):
            img, attrs = render_image(rng, size_px=size_px, layout=layout)
            images.append(img)
            captions.append(caption_for(Modality.IMAGE, attrs, rng))
    scaling = float(pipe.vae.config.scaling_factor)
    latents = _vae_latents(pipe.vae, images) * scaling
    flipped = _vae_latents(pipe.vae, [a[:, ::-1] for a in images]) * scaling
    ids, empty = _token_ids(pipe.tokenizer, captions)
    gen = torch.Generator().manual_seed(recipe.seed)
    loss, pipe.unet, pipe.text_encoder = _train_denoiser(
        pipe.unet, pipe.text_encoder, lambda te, i: {"encoder_hidden_states": te(i)[0]}, latents, ids, empty,
        _denoiser_settings(recipe), scheduler_config=pipe.scheduler.config, gen=gen, latents_flipped=flipped,
        progress=progress, desc="image UNet (edit layouts)", train_text_encoder=recipe.train_text_encoder)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    pipe.register_modules(unet=pipe.unet, text_encoder=pipe.text_encoder)
    pipe.save_pretrained(str(out), safe_serialization=True)
    record = {"continued_from": str(decoder_dir), "recipe": dataclasses.asdict(recipe), "unet_loss": round(loss, 5),
              "train_s": round(time.time() - t0, 1), "num_items": len(images)}
    (out / "edit-decoder.json").write_text(json.dumps(record, indent=2))
    return record



@dataclass(frozen=True)
class InstructEditRecipe:
    """How :func:`train_instruct_edit_decoder` turns a toy image decoder into an InstructPix2Pix one."""

    steps: int = 3000
    lr: float = 3e-4
    edit_pairs: int = 2400  # (random-layout source, the same layout with its colour or its shape changed) pairs
    generations: int = 1200  # plain images (half random, half canonical) with a zero source: generation is kept
    batch_size: int = 32
    caption_dropout: float = 0.05
    image_dropout: float = 0.05
    snr_gamma: float | None = None  # Min-SNR-gamma weights (None: plain MSE)
    x0_weight_cap: float | None = None  # noise error weighted 1 + min(1/SNR, cap): the layout's x0 error counts
    ema_decay: float = 0.995
    train_text_encoder: bool = False
    seed: int = 7_000
    # share of edit pairs whose caption names only what changed ("a picture of a circle" for a reshape): the source
    # alone then says the rest, as InstructPix2Pix's instructions name only the change (sec. 3.1)
    partial_captions: float = 0.0


def partial_templates(changed: str) -> tuple[str, ...]:
    """The toy image caption templates naming only ``changed`` (``"colour"``: "a picture of a {colour} shape";
    ``"shape"``: "a picture of a {shape}")."""
    from training.toyworld.data import IMAGE_TEMPLATES

    if changed == "colour":
        return tuple(t.replace("{shape}", "shape") for t in IMAGE_TEMPLATES)
    return tuple(t.replace("{colour} ", "") for t in IMAGE_TEMPLATES)


def _edit_pairs(rng: np.random.Generator, count: int, size_px: int, partial: float = 0.0):
    """``count`` (source, target, target caption) of random-layout images: the target keeps the source's place,
    size and background and changes its colour or its shape (alternating); a ``partial`` share of the captions name
    only the changed attribute (:func:`partial_templates`)."""
    from polymodal.modality import Modality
    from training.toyworld.data import COLOURS, SHAPES, _colour, caption_for, draw_shape, render_image

    for i in range(count):
        src, a = render_image(rng, size_px=size_px, layout="random")
        tgt_attrs = dict(a)
        if i % 2 == 0:
            tgt_attrs["colour"] = [c for c in COLOURS if c != a["colour"]][int(rng.integers(len(COLOURS) - 1))]
        else:
            tgt_attrs["shape"] = [s for s in SHAPES if s != a["shape"]][int(rng.integers(len(SHAPES) - 1))]
        canvas = np.full((size_px, size_px, 3), a["background"], dtype=np.uint8)
        tgt = draw_shape(canvas, tgt_attrs["shape"], _colour(rng, tgt_attrs["colour"]), a["x_px"], a["y_px"],
                         a["size_px"])
        partial_caption = partial > 0 and rng.random() < partial  # (no draw at 0: the earlier recipes' pairs)
        templates = partial_templates("colour" if i % 2 == 0 else "shape") if partial_caption else None
        yield src, tgt, caption_for(Modality.IMAGE, tgt_attrs, rng, templates)


def train_instruct_edit_decoder(decoder_dir: str | Path, out_dir: str | Path,
                                recipe: InstructEditRecipe | None = None, *, progress: bool = True) -> dict:
    """An InstructPix2Pix decoder (Brooks et al. 2023) grown from the toy image decoder at ``decoder_dir``: its UNet's
    ``conv_in`` widened from 4 to 8 input channels (the new ones zero-initialised, sec. 3.2: it starts as the
    decoder it was), trained on ``recipe.edit_pairs`` toy edit pairs (conditioned on the source's latents and the
    *target's caption*: what the LLM's signal states stand for) beside ``recipe.generations`` plain images with a
    zero source. A ``decoder_dir`` that is already an InstructPix2Pix decoder (8 input channels) is trained on as it
    is (continued on fresh pairs). Saved to ``out_dir`` as a ``StableDiffusionInstructPix2PixPipeline`` folder with
    ``edit-decoder.json``.

    Raises:
        OSError: no loadable pipeline at ``decoder_dir``.
        ValueError: ``recipe.steps`` < 1, no items, or a UNet with neither 4 nor 8 input channels.
    """
    import torch
    from diffusers import StableDiffusionInstructPix2PixPipeline

    from polymodal.modality import Modality
    from training.toyworld.data import caption_for, render_image
    from training.toyworld.train import _token_ids, _train_denoiser

    recipe = recipe or InstructEditRecipe()
    t0 = time.time()
    pipe, size_px, rng = _start(decoder_dir, recipe, recipe.edit_pairs + recipe.generations)
    sources, targets, captions = [], [], []
    for src, tgt, cap in _edit_pairs(rng, recipe.edit_pairs, size_px, recipe.partial_captions):
        sources.append(src)
        targets.append(tgt)
        captions.append(cap)
    blank = None
    for k in range(recipe.generations):
        img, attrs = render_image(rng, size_px=size_px, layout="random" if k % 2 else "canonical")
        blank = np.zeros_like(img) if blank is None else blank
        sources.append(blank)  # marked below: its conditioning is zeros
        targets.append(img)
        captions.append(caption_for(Modality.IMAGE, attrs, rng))
    scaling = float(pipe.vae.config.scaling_factor)
    latents = _vae_latents(pipe.vae, targets) * scaling
    flipped = _vae_latents(pipe.vae, [a[:, ::-1] for a in targets]) * scaling
    img_lat = _vae_latents(pipe.vae, sources)  # unscaled: as the InstructPix2Pix pipeline encodes
    img_flipped = _vae_latents(pipe.vae, [a[:, ::-1] for a in sources])
    img_lat[recipe.edit_pairs:] = 0
    img_flipped[recipe.edit_pairs:] = 0
    unet = pipe.unet
    if unet.config.in_channels == 4:
        old = unet.conv_in
        conv = torch.nn.Conv2d(8, old.out_channels, old.kernel_size, old.stride, old.padding)
        with torch.no_grad():
            conv.weight.zero_()
            conv.weight[:, :4] = old.weight
            conv.bias.copy_(old.bias)
        unet.conv_in = conv
        unet.register_to_config(in_channels=8)
    elif unet.config.in_channels != 8:
        raise ValueError(f"{decoder_dir}: a UNet with {unet.config.in_channels} input channels is neither a toy "
                         "image decoder (4) nor an InstructPix2Pix one (8)")
    ids, empty = _token_ids(pipe.tokenizer, captions)
    gen = torch.Generator().manual_seed(recipe.seed)
    loss, unet, text_encoder = _train_denoiser(
        unet, pipe.text_encoder, lambda te, i: {"encoder_hidden_states": te(i)[0]}, latents, ids, empty,
        _denoiser_settings(recipe),
        scheduler_config=pipe.scheduler.config, gen=gen, latents_flipped=flipped, progress=progress,
        desc="image UNet (InstructPix2Pix)", train_text_encoder=recipe.train_text_encoder,
        image_latents=img_lat, image_latents_flipped=img_flipped, image_dropout=recipe.image_dropout,
        snr_gamma=recipe.snr_gamma, x0_weight_cap=recipe.x0_weight_cap)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    StableDiffusionInstructPix2PixPipeline(
        vae=pipe.vae, text_encoder=text_encoder, tokenizer=pipe.tokenizer, unet=unet, scheduler=pipe.scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    ).save_pretrained(str(out), safe_serialization=True)
    record = {"continued_from": str(decoder_dir), "kind": "instruct-pix2pix", "recipe": dataclasses.asdict(recipe),
              "unet_loss": round(loss, 5), "train_s": round(time.time() - t0, 1), "num_items": len(targets)}
    (out / "edit-decoder.json").write_text(json.dumps(record, indent=2))
    return record


def instruct_edit_ceiling(decoder_dir: str | Path, *, n: int = 24, guidance_scale: float = 6.0,
                          image_guidance_scale: float = 1.5, num_inference_steps: int = 20) -> dict:
    """:func:`score_edits` of an InstructPix2Pix toy decoder (:func:`train_instruct_edit_decoder`) prompted with the
    target's caption; ``{"decoder", "n", "size_px", ..., "runs": [{"strength": None, "kinds"}]}``."""
    import torch
    from diffusers import StableDiffusionInstructPix2PixPipeline
    from PIL import Image

    pipe = StableDiffusionInstructPix2PixPipeline.from_pretrained(str(decoder_dir))
    pipe.set_progress_bar_config(disable=True)
    size_px = int(pipe.unet.config.sample_size * pipe.vae_scale_factor)

    def edit(image, _instruction, target, seed, _strength):
        out = pipe(prompt=f"a {target['colour']} {target['shape']}", image=Image.fromarray(image),
                   guidance_scale=guidance_scale, image_guidance_scale=image_guidance_scale,
                   num_inference_steps=num_inference_steps, generator=torch.Generator().manual_seed(seed),
                   output_type="np").images[0]
        return (np.clip(out, 0, 1) * 255).round().astype(np.uint8)

    reqs = edit_requests(n, size_px)
    with torch.inference_mode():
        kinds = score_edits(edit, reqs, size_px, None)
    return {"decoder": str(decoder_dir), "n": n, "size_px": size_px, "guidance_scale": guidance_scale,
            "image_guidance_scale": image_guidance_scale, "num_inference_steps": num_inference_steps,
            "runs": [{"strength": None, "kinds": kinds}]}


@dataclass(frozen=True)
class VaeDecoderRecipe:
    """How :func:`tune_vae_decoder` continues a toy VAE's decoder (its encoder frozen, so the latent space the
    UNets learned is kept)."""

    steps: int = 3000
    lr: float = 1e-3
    images: int = 6000  # 3 in 4 random layouts (what edits start from), 1 in 4 canonical; flipped copies beside them
    batch_size: int = 64
    seed: int = 7_011


def vae_roundtrip(vae, *, n: int = 200, size_px: int = 32) -> dict[str, float]:
    """How much of the ``n`` held-out edit sources (:func:`edit_requests`) survives the VAE alone (encode, decode):
    the shares whose colour and shape still read as the source's (toy checker) and whose place is kept
    (:func:`~training.toyworld.checkers.kept_place`). An edit decoder cannot keep more than this."""
    import torch

    reqs = edit_requests(n, size_px)
    z = _vae_latents(vae, [q["image"] for q in reqs])
    with torch.no_grad():
        y = torch.cat([vae.decode(z[i : i + 256]).sample for i in range(0, n, 256)])
    out = ((y.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    got = [check_image(o) for o in out]
    return {"colour": float(np.mean([g.colour == q["attrs"]["colour"] for g, q in zip(got, reqs)])),
            "shape": float(np.mean([g.shape == q["attrs"]["shape"] for g, q in zip(got, reqs)])),
            "place": float(np.mean([kept_place(foreground_box(q["image"]), foreground_box(o), size_px)
                                    for q, o in zip(reqs, out)])), "n": n}


def tune_vae_decoder(vae, recipe: VaeDecoderRecipe | None = None, *, progress: bool = True) -> dict:
    """Continue the decoder half of a toy ``AutoencoderKL`` in place on ``recipe.images`` fresh toy images (and
    their mirror images), reconstructing each from its encoder's latent mode with the encoder frozen: the latents
    every UNet was trained on stay what they were, only the pixels drawn from them improve. The shipped toy VAE was
    trained 400 steps on canonical layouts; through it, held-out random-layout sources keep their colour / shape /
    place on ~0.80 / 0.79 / 0.90 (:func:`vae_roundtrip`), which bounds every edit.

    Returns:
        ``{"recipe", "loss", "train_s", "roundtrip_before", "roundtrip_after"}``.
    Raises:
        ValueError: ``recipe.steps`` or ``recipe.images`` < 1.
    """
    import torch
    from tqdm import tqdm

    from training.toyworld.data import render_image

    recipe = recipe or VaeDecoderRecipe()
    if recipe.steps < 1 or recipe.images < 1:
        raise ValueError(f"steps and images must be >= 1, got {recipe}")
    t0 = time.time()
    size_px = int(vae.config.sample_size)
    before = vae_roundtrip(vae, size_px=size_px)
    rng = np.random.default_rng(recipe.seed)
    images = [render_image(rng, size_px=size_px, layout="canonical" if k % 4 == 0 else "random")[0]
              for k in range(recipe.images)]
    images += [a[:, ::-1] for a in images]
    vae.requires_grad_(False)
    x, z = _pixels(images), _vae_latents(vae, images)
    params = [*vae.decoder.parameters(), *vae.post_quant_conv.parameters()]
    for q in params:
        q.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=recipe.lr)
    gen = torch.Generator().manual_seed(recipe.seed)
    vae.train()
    smoothed = None
    bar = tqdm(range(recipe.steps), desc="VAE decoder (encoder frozen)", disable=not progress)
    for _ in bar:
        idx = torch.randint(len(x), (recipe.batch_size,), generator=gen)
        loss = torch.nn.functional.mse_loss(vae.decode(z[idx]).sample, x[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        smoothed = loss.item() if smoothed is None else 0.98 * smoothed + 0.02 * loss.item()
        bar.set_postfix(loss=f"{smoothed:.4f}")
    vae.eval().requires_grad_(False)
    return {"recipe": dataclasses.asdict(recipe), "loss": round(float(smoothed), 5),
            "train_s": round(time.time() - t0, 1), "roundtrip_before": before,
            "roundtrip_after": vae_roundtrip(vae, size_px=size_px)}


def tune_vae_folder(decoder_dir: str | Path, start_vae: str | Path, recipe: VaeDecoderRecipe | None = None, *,
                    progress: bool = True) -> dict:
    """:func:`tune_vae_decoder` of the VAE at ``start_vae`` (a diffusers ``AutoencoderKL`` folder), saved as
    ``decoder_dir/vae`` (written beside it first, then swapped in: a crash leaves the old one) -> its record with
    ``"from"``.

    Raises:
        OSError: no loadable VAE at ``start_vae``. ValueError: see :func:`tune_vae_decoder`.
    """
    import shutil

    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(str(start_vae))
    record = {"from": str(start_vae), **tune_vae_decoder(vae, recipe, progress=progress)}
    target = Path(decoder_dir) / "vae"
    fresh, stale = target.with_name("vae.tmp"), target.with_name("vae.old")
    for d in (fresh, stale):
        shutil.rmtree(d, ignore_errors=True)
    vae.save_pretrained(str(fresh), safe_serialization=True)
    if target.exists():
        target.rename(stale)
    fresh.rename(target)
    shutil.rmtree(stale, ignore_errors=True)
    return record


def source_use_gap(decoder_dir: str | Path, *, n: int = 64, timesteps=(200, 500, 800, 950), seed: int = 123) -> dict:
    """How much an InstructPix2Pix toy decoder reads its source: per training timestep, the denoising loss on ``n``
    fresh edit pairs with the source's latents and with zeros in their place (``{t: {"with_source",
    "zero_source"}}``). A decoder that uses its source has a clearly lower loss with it; a cheap check before
    :func:`instruct_edit_ceiling`."""
    import torch
    from diffusers import DDPMScheduler, StableDiffusionInstructPix2PixPipeline

    from training.toyworld.train import _token_ids

    pipe = StableDiffusionInstructPix2PixPipeline.from_pretrained(str(decoder_dir))
    size_px = int(pipe.unet.config.sample_size * pipe.vae_scale_factor)
    pairs = list(_edit_pairs(np.random.default_rng(seed), n, size_px))
    sched = DDPMScheduler.from_config(pipe.scheduler.config)
    out = {}
    with torch.inference_mode():
        z0 = _vae_latents(pipe.vae, [t for _, t, _ in pairs]) * pipe.vae.config.scaling_factor
        zs = _vae_latents(pipe.vae, [s for s, _, _ in pairs])
        hidden = pipe.text_encoder(_token_ids(pipe.tokenizer, [c for _, _, c in pairs])[0])[0]
        for step in timesteps:
            noise = torch.randn(z0.shape, generator=torch.Generator().manual_seed(seed))
            t = torch.full((n,), int(step))
            x = sched.add_noise(z0, noise, t)
            target = noise if sched.config.prediction_type == "epsilon" else sched.get_velocity(z0, noise, t)
            err = [torch.nn.functional.mse_loss(pipe.unet(torch.cat([x, src], 1), t, encoder_hidden_states=hidden)
                                                .sample, target).item() for src in (zs, torch.zeros_like(zs))]
            out[int(step)] = {"with_source": err[0], "zero_source": err[1]}
    return out


def edit_decoder_chain(decoder_dir: str | Path) -> list[dict]:
    """The ``edit-decoder.json`` records from ``decoder_dir`` back along ``continued_from`` (newest first) while
    the folders are there; the last one's ``continued_from`` names the toy decoder the chain grew from.

    Raises:
        FileNotFoundError: ``decoder_dir`` has no ``edit-decoder.json`` (not made by ``toyworld edit-decoder``).
    """
    folder = Path(decoder_dir)
    if not (folder / "edit-decoder.json").is_file():
        raise FileNotFoundError(f"{folder / 'edit-decoder.json'} not found: --edit-decoder takes a folder made by "
                                "polymodal toyworld edit-decoder --kind instruct-pix2pix")
    chain, seen = [], set()
    while (folder / "edit-decoder.json").is_file() and folder.resolve() not in seen:
        seen.add(folder.resolve())
        chain.append(json.loads((folder / "edit-decoder.json").read_text()))
        folder = Path(chain[-1].get("continued_from") or "")
    return chain


def install_edit_decoder(decoder_dir: str | Path, decoders_dir: str | Path) -> dict:
    """Make the InstructPix2Pix decoder ``decoder_dir`` the image decoder of a toy build's ``decoders_dir``: its
    folder replaces ``decoders_dir/image`` (copied beside, then swapped), and the manifest's image entry records
    the chain of ``edit-decoder.json`` records (``edit_decoder``) and gets a config hash of its own (so that the
    stages keyed on the decoders are redone). Up to date (nothing copied) when the entry already records this chain.

    Returns:
        The decoders manifest (as ``training.toyworld.train.train_decoders`` returns it).

    Raises:
        FileNotFoundError: no ``edit-decoder.json`` or no manifest; ValueError: ``decoder_dir`` is not an
        InstructPix2Pix pipeline folder.
    """
    import hashlib
    import os
    import shutil

    from polymodal.presets.toy import MANIFEST

    src, dst = Path(decoder_dir), Path(decoders_dir)
    chain = edit_decoder_chain(src)
    index = json.loads((src / "model_index.json").read_text())
    if index.get("_class_name") != "StableDiffusionInstructPix2PixPipeline":
        raise ValueError(f"{src}: a {index.get('_class_name')} folder; --edit-decoder takes an InstructPix2Pix one "
                         "(polymodal toyworld edit-decoder --kind instruct-pix2pix)")
    manifest_path = dst / MANIFEST
    if not manifest_path.is_file():
        raise FileNotFoundError(f"{manifest_path} not found: the build's decoders must exist first")
    manifest = json.loads(manifest_path.read_text())
    entry = manifest["decoders"]["image"]
    record = {"from": str(src), "chain": chain}
    if entry.get("edit_decoder", {}).get("chain") == chain:
        return manifest
    base_hash = entry.get("edit_decoder", {}).get("base_config_hash", entry["config_hash"])
    record["base_config_hash"] = base_hash
    tmp = dst / ".image-installing"
    if tmp.exists():
        shutil.rmtree(tmp)
    shutil.copytree(src, tmp, ignore=shutil.ignore_patterns("ceiling.json"))
    old = dst / ".image-old"
    if old.exists():
        shutil.rmtree(old)
    os.replace(dst / entry["path"], old)
    os.replace(tmp, dst / entry["path"])
    shutil.rmtree(old)
    digest = hashlib.sha256((base_hash + json.dumps(chain, sort_keys=True)).encode()).hexdigest()[:16]
    manifest["decoders"]["image"] = {**entry, "config_hash": digest, "edit_decoder": record}
    part = manifest_path.with_suffix(".json.part")
    part.write_text(json.dumps(manifest, indent=2, sort_keys=True))
    os.replace(part, manifest_path)
    return manifest
