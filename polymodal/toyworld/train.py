"""Toy decoders trained from scratch on toy data, saved as stock diffusers pipelines.

Image (the one trained so far): the real image decoder's class, ``diffusers.StableDiffusionPipeline``, with
small components, all trained here (Rombach et al. 2022 recipe at toy scale):

1. ``AutoencoderKL`` (2 levels, 4 latent channels: 32 px -> 16x16 latents) trained on reconstruction
   (MSE + a tiny KL weight); its ``scaling_factor`` is set to 1 / std of the data's latents.
2. ``CLIPTextModel`` (2 layers, D_cond 64, Q 16 positions) over the toy WordLevel tokenizer
   (:mod:`polymodal.toyworld.tokenizer`) and ``UNet2DConditionModel`` (16 and 32 channels, cross-attention at
   the 8x8 level and in the middle block) trained together on the epsilon-prediction loss with the DDIM
   scheduler's own (SD) noise schedule; captions dropped to ``""`` with probability ``caption_dropout`` so
   classifier-free guidance works; an EMA of the weights is what gets saved.

The result is a diffusers folder (``model_index.json`` + component folders) that the product loads with
``decoders.build_decoder(modality, DecoderConfig(source="pretrained", path=...))``; :func:`decoder_config`
returns that config (with the conditioning shape and generation defaults) from the manifest.

Caching: ``OUT/toyworld-decoders.json`` records each modality's config hash (recipe + catalog contents);
a modality whose hash matches and whose folder exists is skipped.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from polymodal.modality import Modality

MANIFEST = "toyworld-decoders.json"
RECIPE_VERSION = 1


@dataclass(frozen=True)
class ImageDecoderRecipe:
    """Everything that decides what the toy image decoder becomes (hashed for caching)."""

    size_px: int = 32
    cond_tokens: int = 16
    cond_dim: int = 64
    text_layers: int = 2
    unet_blocks: tuple[int, ...] = (16, 32)
    vae_blocks: tuple[int, ...] = (8, 16)
    vae_steps: int = 600
    vae_lr: float = 2e-3
    unet_steps: int = 2500
    unet_lr: float = 1e-3
    batch_size: int = 32
    caption_dropout: float = 0.1
    ema_decay: float = 0.995
    seed: int = 0
    num_inference_steps: int = 20
    guidance_scale: float = 3.0

    def scaled(self, factor: float) -> "ImageDecoderRecipe":
        """The same recipe with ``factor`` times the training steps (at least 1 each): tests and quick runs."""
        return dataclasses.replace(self, vae_steps=max(1, int(self.vae_steps * factor)),
                                   unet_steps=max(1, int(self.unet_steps * factor)))


def _hash(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _catalog_rows(data_dir: Path, modality: Modality) -> list[dict]:
    from polymodal.toyworld.data import read_catalog

    catalog = data_dir / "catalog.jsonl"
    if not catalog.is_file():
        raise FileNotFoundError(f"{catalog} not found; write toy data first (polymodal toyworld data --out {data_dir})")
    rows = [r for r in read_catalog(catalog) if r["modality"] == modality.value]
    if not rows:
        raise ValueError(f"{catalog} has no {modality.value} items")
    return rows


def _rows_digest(rows: list[dict]) -> str:
    h = hashlib.sha256()
    for r in rows:
        h.update(r["caption"].encode())
        h.update(Path(r["path"]).read_bytes())
    return h.hexdigest()[:16]


# ---------------------------------------------------------------------------------------- image


def build_image_pipeline(recipe: ImageDecoderRecipe):
    """A ``StableDiffusionPipeline`` with randomly initialised toy components (seeded with ``recipe.seed``)."""
    import torch
    from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from decoders import tiny
    from polymodal.toyworld.tokenizer import toy_tokenizer

    tokenizer = toy_tokenizer(recipe.cond_tokens)
    d = recipe.cond_dim
    levels = len(recipe.vae_blocks)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(recipe.seed)
        text_encoder = CLIPTextModel(CLIPTextConfig(
            vocab_size=len(tokenizer), hidden_size=d, intermediate_size=2 * d, num_hidden_layers=recipe.text_layers,
            num_attention_heads=tiny.num_heads(d), max_position_embeddings=recipe.cond_tokens,
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        ))
        n = len(recipe.unet_blocks)
        unet = UNet2DConditionModel(
            sample_size=recipe.size_px // 2 ** (levels - 1), in_channels=4, out_channels=4,
            down_block_types=("DownBlock2D",) * (n - 1) + ("CrossAttnDownBlock2D",),
            up_block_types=("CrossAttnUpBlock2D",) + ("UpBlock2D",) * (n - 1),
            block_out_channels=recipe.unet_blocks, layers_per_block=1, cross_attention_dim=d,
            attention_head_dim=8, norm_num_groups=8,
        )
        vae = AutoencoderKL(
            in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * levels,
            up_block_types=("UpDecoderBlock2D",) * levels, block_out_channels=recipe.vae_blocks, layers_per_block=1,
            latent_channels=4, norm_num_groups=8, sample_size=recipe.size_px, mid_block_add_attention=False,
        )
    return StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=tiny.scheduler(),
        safety_checker=None, feature_extractor=None, image_encoder=None, requires_safety_checker=False,
    )


def _load_images(rows: list[dict], size_px: int) -> np.ndarray:
    """(N, 3, size_px, size_px) float32 in [-1, 1]."""
    from PIL import Image

    out = []
    for r in rows:
        with Image.open(r["path"]) as im:
            im = im.convert("RGB")
            if im.size != (size_px, size_px):
                im = im.resize((size_px, size_px), Image.BOX)
            out.append(np.asarray(im, dtype=np.float32))
    return (np.stack(out).transpose(0, 3, 1, 2) / 127.5 - 1.0).astype(np.float32)


def _ema_update(ema, model, decay: float) -> None:
    import torch

    with torch.no_grad():
        for pe, p in zip(ema.parameters(), model.parameters()):
            pe.mul_(decay).add_(p.detach(), alpha=1.0 - decay)


def train_image_decoder(rows: list[dict], recipe: ImageDecoderRecipe, out: Path, *, progress: bool = True) -> dict:
    """Train the toy image decoder on catalog ``rows`` and save it to ``out`` (a diffusers folder).

    Returns:
        Training figures (final losses, seconds, latent scaling factor).
    """
    import torch
    from diffusers import DDPMScheduler
    from tqdm import tqdm

    torch.set_num_threads(1)
    t_start = time.time()
    pipe = build_image_pipeline(recipe)
    images = torch.from_numpy(_load_images(rows, recipe.size_px))
    gen = torch.Generator().manual_seed(recipe.seed)
    torch.manual_seed(recipe.seed)
    n = images.shape[0]
    bs = min(recipe.batch_size, n)

    def batch_index() -> torch.Tensor:
        return torch.randint(0, n, (bs,), generator=gen)

    def augment(x: torch.Tensor) -> torch.Tensor:  # horizontal flips keep every shape and colour
        flip = torch.rand(x.shape[0], generator=gen) < 0.5
        return torch.where(flip[:, None, None, None], x.flip(-1), x)

    # 1. autoencoder
    vae = pipe.vae.train()
    opt = torch.optim.AdamW(vae.parameters(), lr=recipe.vae_lr)
    bar = tqdm(range(recipe.vae_steps), desc="image VAE", disable=not progress)
    vae_loss = float("nan")
    for _ in bar:
        x = augment(images[batch_index()])
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample(generator=gen)).sample
        loss = torch.nn.functional.mse_loss(recon, x) + 1e-6 * posterior.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        vae_loss = 0.95 * vae_loss + 0.05 * loss.item() if vae_loss == vae_loss else loss.item()
        bar.set_postfix(loss=f"{vae_loss:.4f}")
    vae.eval().requires_grad_(False)
    with torch.no_grad():
        latents = torch.cat([vae.encode(images[i : i + 256]).latent_dist.mean for i in range(0, n, 256)])
        latents_flipped = torch.cat([vae.encode(images[i : i + 256].flip(-1)).latent_dist.mean for i in range(0, n, 256)])
    scaling = float(1.0 / latents.std())
    vae.register_to_config(scaling_factor=scaling)

    # 2. text encoder + UNet
    tok = pipe.tokenizer
    captions = [r["caption"] for r in rows]
    ids = tok(captions, padding="max_length", max_length=tok.model_max_length, truncation=True, return_tensors="pt").input_ids
    empty = tok([""], padding="max_length", max_length=tok.model_max_length, return_tensors="pt").input_ids
    unet, text_encoder = pipe.unet.train(), pipe.text_encoder.train()
    ema_unet, ema_text = copy.deepcopy(unet).eval(), copy.deepcopy(text_encoder).eval()
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    params = list(unet.parameters()) + list(text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=recipe.unet_lr, weight_decay=0.0)
    warmup = max(1, recipe.unet_steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup))
    bar = tqdm(range(recipe.unet_steps), desc="image UNet", disable=not progress)
    unet_loss = float("nan")
    num_t = noise_scheduler.config.num_train_timesteps
    for _ in bar:
        idx = batch_index()
        flip = (torch.rand(bs, generator=gen) < 0.5)[:, None, None, None]
        z0 = torch.where(flip, latents_flipped[idx], latents[idx]) * scaling
        drop = torch.rand(bs, generator=gen) < recipe.caption_dropout
        batch_ids = torch.where(drop[:, None], empty.expand(bs, -1), ids[idx])
        noise = torch.randn(z0.shape, generator=gen)
        t = torch.randint(0, num_t, (bs,), generator=gen)
        zt = noise_scheduler.add_noise(z0, noise, t)
        cond = text_encoder(batch_ids)[0]
        loss = torch.nn.functional.mse_loss(unet(zt, t, encoder_hidden_states=cond).sample, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        _ema_update(ema_unet, unet, recipe.ema_decay)
        _ema_update(ema_text, text_encoder, recipe.ema_decay)
        unet_loss = 0.98 * unet_loss + 0.02 * loss.item() if unet_loss == unet_loss else loss.item()
        bar.set_postfix(loss=f"{unet_loss:.4f}")
    pipe.unet, pipe.text_encoder = ema_unet.requires_grad_(False), ema_text.requires_grad_(False)
    pipe.register_modules(unet=pipe.unet, text_encoder=pipe.text_encoder)
    out.mkdir(parents=True, exist_ok=True)
    pipe.save_pretrained(str(out), safe_serialization=True)
    return {"vae_loss": round(vae_loss, 5), "unet_loss": round(unet_loss, 5), "latent_scaling_factor": scaling,
            "train_s": round(time.time() - t_start, 1), "num_items": n}


# ---------------------------------------------------------------------------------------- entry points

RECIPES = {Modality.IMAGE: ImageDecoderRecipe}
TRAINERS = {Modality.IMAGE: train_image_decoder}


def trainable_modalities() -> list[Modality]:
    return list(TRAINERS)


def train_decoders(data_dir: str | Path, out_dir: str | Path, *, modalities=None, step_scale: float = 1.0,
                   force: bool = False, progress: bool = True) -> dict:
    """Train (or reuse) the toy decoder of each modality; returns the manifest written to ``OUT/`` :data:`MANIFEST`.

    Args:
        data_dir: a folder written by :func:`polymodal.toyworld.data.write_dataset`.
        out_dir: gets ``<modality>/`` (diffusers folder) and the manifest.
        modalities: default: every modality with a trainer (:func:`trainable_modalities`).
        step_scale: multiplies every training step count (tests: a few steps).
        force: retrain even when the config hash matches.

    Raises:
        ValueError: a modality without a toy trainer (lists the choices), or no items of it in the data.
        FileNotFoundError: no ``catalog.jsonl`` in ``data_dir``.
    """
    data_dir, out_dir = Path(data_dir), Path(out_dir)
    mods = [Modality.parse(m) for m in (modalities or trainable_modalities())]
    for m in mods:
        if m not in TRAINERS:
            raise ValueError(f"no toy decoder trainer for {m.value}; choose from: "
                             f"{', '.join(x.value for x in TRAINERS)}")
    manifest_path = out_dir / MANIFEST
    manifest = json.loads(manifest_path.read_text()) if manifest_path.is_file() else {"decoders": {}}
    for m in mods:
        recipe = RECIPES[m]().scaled(step_scale) if step_scale != 1.0 else RECIPES[m]()
        rows = _catalog_rows(data_dir, m)
        config_hash = _hash({"version": RECIPE_VERSION, "recipe": dataclasses.asdict(recipe), "data": _rows_digest(rows)})
        folder = out_dir / m.value
        entry = manifest["decoders"].get(m.value)
        if not force and entry and entry.get("config_hash") == config_hash and (folder / "model_index.json").is_file():
            if progress:
                print(f"{m.value}: up to date ({folder}, config hash {config_hash})")
            continue
        figures = TRAINERS[m](rows, recipe, folder, progress=progress)
        manifest["decoders"][m.value] = {
            "path": m.value, "config_hash": config_hash, "recipe": dataclasses.asdict(recipe), "figures": figures,
            "cond_tokens": recipe.cond_tokens, "cond_dim": recipe.cond_dim,
            "defaults": {"num_inference_steps": recipe.num_inference_steps, "guidance_scale": recipe.guidance_scale,
                         "height_px": recipe.size_px, "width_px": recipe.size_px},
        }
        out_dir.mkdir(parents=True, exist_ok=True)
        tmp = manifest_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True))
        tmp.replace(manifest_path)
    return manifest


def decoder_config(out_dir: str | Path, modality: Modality | str):
    """The :class:`polymodal.config.DecoderConfig` that loads the trained toy decoder of ``modality``.

    Raises:
        FileNotFoundError: no manifest in ``out_dir``.
        ValueError: the manifest has no decoder of that modality.
    """
    from polymodal.config import DecoderConfig, DecoderDefaults

    out_dir = Path(out_dir)
    manifest_path = out_dir / MANIFEST
    if not manifest_path.is_file():
        raise FileNotFoundError(f"{manifest_path} not found; run polymodal toyworld train-decoders --out {out_dir}")
    m = Modality.parse(modality)
    entry = json.loads(manifest_path.read_text())["decoders"].get(m.value)
    if entry is None:
        raise ValueError(f"{manifest_path} has no {m.value} decoder")
    return DecoderConfig(source="pretrained", path=str((out_dir / entry["path"]).resolve()),
                         cond_tokens=entry["cond_tokens"], cond_dim=entry["cond_dim"],
                         defaults=DecoderDefaults(**entry["defaults"]))
