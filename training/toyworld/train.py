"""Toy decoders trained from scratch on toy data, saved as stock diffusers pipelines.

Image: the real image decoder's class, ``diffusers.StableDiffusionPipeline``, with small components, all
trained here (Rombach et al. 2022 recipe at toy scale):

1. ``AutoencoderKL`` (2 levels, 4 latent channels: 32 px -> 16x16 latents) trained on reconstruction
   (MSE + a tiny KL weight); its ``scaling_factor`` is set to 1 / std of the data's latents.
2. ``CLIPTextModel`` (2 layers, D_cond 64, Q 16 positions) over the toy WordLevel tokenizer
   (:func:`training.toyworld.data.toy_tokenizer`) and ``UNet2DConditionModel`` (16 and 32 channels, cross-attention at
   the 8x8 level and in the middle block) trained together on the epsilon-prediction loss with the DDIM
   scheduler's own (SD) noise schedule; captions dropped to ``""`` with probability ``caption_dropout`` so
   classifier-free guidance works; an EMA of the weights is what gets saved.

Audio: ``AudioLDMPipeline`` (spectrogram VAE, CLAP-style text encoder; its ``SpeechT5HifiGan`` vocoder has weights
set to overlap-add sinusoids, not trained). Video: ``AnimateDiffPipeline`` (the same two steps on frames, with a
``UNetMotionModel``; :func:`build_video_pipeline` says why not ``TextToVideoSDPipeline``).

The result is a diffusers folder (``model_index.json`` + component folders) that the product loads with
``decoders.build_decoder(modality, DecoderConfig(source="pretrained", path=...))``; :func:`decoder_config`
(:mod:`polymodal.presets.toy`, the runtime's reader of the manifest) returns that config (with the conditioning
shape and generation defaults) from the manifest.

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
from polymodal.presets.toy import MANIFEST

RECIPE_VERSION = 1
# Recipe fields that only set the saved generation defaults: left out of the config hash.
GENERATION_FIELDS = frozenset({"num_inference_steps", "guidance_scale", "fps", "crf"})


@dataclass(frozen=True)
class ImageDecoderRecipe:
    """Everything that decides what the toy image decoder becomes (hashed for caching)."""

    size_px: int = 32
    cond_tokens: int = 16
    cond_dim: int = 64
    text_layers: int = 2
    unet_blocks: tuple[int, ...] = (16, 32)
    vae_blocks: tuple[int, ...] = (8, 16)
    vae_steps: int = 400
    vae_lr: float = 2e-3
    unet_steps: int = 6000
    unet_lr: float = 1e-3
    batch_size: int = 32
    caption_dropout: float = 0.1
    ema_decay: float = 0.995
    seed: int = 0
    num_inference_steps: int = 20
    guidance_scale: float = 6.0

    def decoder_fields(self) -> dict:
        """``cond_tokens``, ``cond_dim`` and generation ``defaults`` of the DecoderConfig that loads the result."""
        return {"cond_tokens": self.cond_tokens, "cond_dim": self.cond_dim,
                "defaults": {"num_inference_steps": self.num_inference_steps, "guidance_scale": self.guidance_scale,
                             "height_px": self.size_px, "width_px": self.size_px}}

    def scaled(self, factor: float) -> "ImageDecoderRecipe":
        """The same recipe with ``factor`` times the training steps (at least 1 each): tests and quick runs."""
        return dataclasses.replace(self, vae_steps=max(1, int(self.vae_steps * factor)),
                                   unet_steps=max(1, int(self.unet_steps * factor)))


def _hash(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _catalog_rows(data_dir: Path, modality: Modality) -> list[dict]:
    from training.toyworld.data import read_catalog

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
    from training.toyworld.data import toy_tokenizer

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


def _smooth(prev: float, value: float, keep: float) -> float:
    return value if prev != prev else keep * prev + (1.0 - keep) * value


def _train_autoencoder(vae, data, *, steps: int, lr: float, batch_size: int, gen, augment=None,
                       progress: bool, desc: str) -> tuple[float, object]:
    """Reconstruction training of an ``AutoencoderKL`` on ``data`` (N, C, H, W); returns (smoothed loss,
    latent means (N, 4, H', W'))."""
    import torch
    from tqdm import tqdm

    n = data.shape[0]
    bs = min(batch_size, n)
    vae.train()
    opt = torch.optim.AdamW(vae.parameters(), lr=lr)
    bar = tqdm(range(steps), desc=desc, disable=not progress)
    smoothed = float("nan")
    for _ in bar:
        x = data[torch.randint(0, n, (bs,), generator=gen)]
        if augment is not None:
            x = augment(x)
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample(generator=gen)).sample
        loss = torch.nn.functional.mse_loss(recon, x) + 1e-6 * posterior.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        smoothed = _smooth(smoothed, loss.item(), 0.95)
        bar.set_postfix(loss=f"{smoothed:.4f}")
    vae.eval().requires_grad_(False)
    return smoothed, lambda x: torch.cat([vae.encode(x[i : i + 256]).latent_dist.mean for i in range(0, len(x), 256)])


def _train_denoiser(unet, text_encoder, condition, latents, ids, empty_ids, recipe, *, scheduler_config, gen,
                    latents_flipped=None, aux=None, progress: bool, desc: str, train_text_encoder: bool = True,
                    image_latents=None, image_latents_flipped=None, image_dropout: float = 0.0,
                    snr_gamma: float | None = None, x0_weight_cap: float | None = None):
    """Joint denoising training of ``unet`` and ``text_encoder`` (DDPM noise with the pipeline scheduler's betas;
    the target is its ``prediction_type``: the noise, or v = sqrt(a) * noise - sqrt(1 - a) * x0 as in Salimans &
    Ho 2022, sec. 4, which weights the high-noise steps that decide the layout); ``condition(text_encoder, ids)`` gives the UNet's conditioning keyword arguments as the
    stock pipeline passes them. Captions are dropped to ``""`` with probability ``recipe.caption_dropout``.
    ``aux(text_encoder, ids, idx)``, if given, returns an extra loss (and owns parameters: ``aux.parameters()``).
    ``train_text_encoder=False`` keeps the text encoder as it is (frozen, out of the optimiser).
    ``image_latents`` (N, C', h, w), if given: an image-conditioned UNet as InstructPix2Pix trains it (Brooks et al.
    2023, sec. 3.2): the UNet's input is the noisy latents with the item's image latents concatenated on the
    channels (zeros with probability ``image_dropout``, and for items whose conditioning is zeros already);
    ``image_latents_flipped`` pairs with ``latents_flipped``. ``snr_gamma``: Min-SNR-gamma loss weights (Hang et al.
    2023, eq. 7: min(SNR, gamma) / SNR for an epsilon target, / (SNR + 1) for v), which lift the high-noise steps
    where the layout is decided; ``None``: the plain mean squared error. ``x0_weight_cap`` (epsilon targets): the
    noise error weighted 1 + min(1 / SNR, cap), i.e. the plain loss plus the clean-image (x0) error capped at
    ``cap``: at high noise a misplaced shape barely moves the noise error (its x0 error enters it times SNR, ~0.005
    at t = 950 on the toy schedule), so a decoder that could read the layout from an input (InstructPix2Pix's
    source) has almost no reason to; the x0 term gives it one. Not with ``snr_gamma``.
    Returns (smoothed loss, EMA UNet, EMA text encoder)."""
    import torch
    from diffusers import DDPMScheduler
    from tqdm import tqdm

    if snr_gamma is not None and x0_weight_cap is not None:
        raise ValueError("snr_gamma and x0_weight_cap are two loss weightings: give one")
    n = latents.shape[0]
    bs = min(recipe.batch_size, n)
    unet.train()
    text_encoder.train(train_text_encoder)
    if not train_text_encoder:
        text_encoder.requires_grad_(False)
    ema_unet, ema_text = copy.deepcopy(unet).eval(), copy.deepcopy(text_encoder).eval()
    noise_scheduler = DDPMScheduler.from_config(scheduler_config)
    v_target = noise_scheduler.config.prediction_type == "v_prediction"
    if noise_scheduler.config.prediction_type not in ("epsilon", "v_prediction"):
        raise ValueError(f"prediction_type {noise_scheduler.config.prediction_type!r}: epsilon or v_prediction")
    params = list(unet.parameters()) + (list(text_encoder.parameters()) if train_text_encoder else [])
    opt = torch.optim.AdamW(params + (list(aux.parameters()) if aux is not None else []), lr=recipe.unet_lr,
                            weight_decay=0.0)
    warmup = max(1, recipe.unet_steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup))
    bar = tqdm(range(recipe.unet_steps), desc=desc, disable=not progress)
    smoothed = float("nan")
    num_t = noise_scheduler.config.num_train_timesteps
    for _ in bar:
        idx = torch.randint(0, n, (bs,), generator=gen)
        flip = None
        if latents_flipped is not None:
            flip = (torch.rand(bs, generator=gen) < 0.5)[:, None, None, None]
            z0 = torch.where(flip, latents_flipped[idx], latents[idx])
        else:
            z0 = latents[idx]
        drop = torch.rand(bs, generator=gen) < recipe.caption_dropout
        batch_ids = torch.where(drop[:, None], empty_ids.expand(bs, -1), ids[idx])
        noise = torch.randn(z0.shape, generator=gen)
        t = torch.randint(0, num_t, (bs,), generator=gen)
        zt = noise_scheduler.add_noise(z0, noise, t)
        if image_latents is not None:
            zi = image_latents[idx]
            if flip is not None:
                zi = torch.where(flip, image_latents_flipped[idx], zi)
            keep = (torch.rand(bs, generator=gen) >= image_dropout)[:, None, None, None]
            zt = torch.cat([zt, zi * keep], dim=1)
        target = noise if not v_target else noise_scheduler.get_velocity(z0, noise, t)
        pred = unet(zt, t, **condition(text_encoder, batch_ids)).sample
        if snr_gamma is None and x0_weight_cap is None:
            loss = torch.nn.functional.mse_loss(pred, target)
        else:
            abar = noise_scheduler.alphas_cumprod[t]
            snr = abar / (1 - abar)
            if snr_gamma is not None:
                w = torch.clamp(snr, max=snr_gamma) / (snr + 1 if v_target else snr)
            else:
                w = 1 + torch.clamp(1 / snr, max=x0_weight_cap)
            loss = (((pred - target) ** 2).mean(dim=(1, 2, 3)) * w).mean()
        if aux is not None:
            loss = loss + aux(text_encoder, ids[idx], idx)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        _ema_update(ema_unet, unet, recipe.ema_decay)
        if train_text_encoder:
            _ema_update(ema_text, text_encoder, recipe.ema_decay)
        smoothed = _smooth(smoothed, loss.item(), 0.98)
        bar.set_postfix(loss=f"{smoothed:.4f}")
    return smoothed, ema_unet.requires_grad_(False), ema_text.requires_grad_(False)


def _token_ids(tokenizer, captions: list[str]):
    kw = dict(padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt")
    return tokenizer(list(captions), **kw).input_ids, tokenizer([""], **kw).input_ids


def train_image_decoder(rows: list[dict], recipe: ImageDecoderRecipe, out: Path, *, progress: bool = True) -> dict:
    """Train the toy image decoder on catalog ``rows`` and save it to ``out`` (a diffusers folder).

    Returns:
        Training figures (final losses, seconds, latent scaling factor).
    """
    import torch

    torch.set_num_threads(1)
    t_start = time.time()
    pipe = build_image_pipeline(recipe)
    images = torch.from_numpy(_load_images(rows, recipe.size_px))
    gen = torch.Generator().manual_seed(recipe.seed)
    torch.manual_seed(recipe.seed)

    def augment(x):  # horizontal flips keep every shape and colour
        flip = torch.rand(x.shape[0], generator=gen) < 0.5
        return torch.where(flip[:, None, None, None], x.flip(-1), x)

    vae_loss, encode = _train_autoencoder(pipe.vae, images, steps=recipe.vae_steps, lr=recipe.vae_lr,
                                          batch_size=recipe.batch_size, gen=gen, augment=augment,
                                          progress=progress, desc="image VAE")
    with torch.no_grad():
        latents, latents_flipped = encode(images), encode(images.flip(-1))
    scaling = float(1.0 / latents.std())
    pipe.vae.register_to_config(scaling_factor=scaling)
    ids, empty = _token_ids(pipe.tokenizer, [r["caption"] for r in rows])
    unet_loss, pipe.unet, pipe.text_encoder = _train_denoiser(
        pipe.unet, pipe.text_encoder, lambda te, i: {"encoder_hidden_states": te(i)[0]}, latents * scaling, ids,
        empty, recipe, scheduler_config=pipe.scheduler.config, gen=gen, latents_flipped=latents_flipped * scaling,
        progress=progress, desc="image UNet",
    )
    pipe.register_modules(unet=pipe.unet, text_encoder=pipe.text_encoder)
    out.mkdir(parents=True, exist_ok=True)
    pipe.save_pretrained(str(out), safe_serialization=True)
    return {"vae_loss": round(vae_loss, 5), "unet_loss": round(unet_loss, 5), "latent_scaling_factor": scaling,
            "train_s": round(time.time() - t_start, 1), "num_items": len(rows)}


# ---------------------------------------------------------------------------------------- audio

HOP = 160  # samples per spectrogram frame at 16 kHz (AudioLDM's hop)
WINDOW = 2 * HOP
BIN_SPACING_HZ = 200.0  # a multiple of SAMPLE_RATE_HZ / HOP = 100 Hz: overlap-added sinusoids stay in phase


@dataclass(frozen=True)
class AudioDecoderRecipe:
    """Everything that decides what the toy audio decoder becomes (hashed for caching)."""

    num_bins: int = 16  # sinusoid bins at 200, 400, ..., 3200 Hz
    duration_s: float = 1.0
    cond_tokens: int = 16  # text length of the CLAP-style text encoder
    cond_dim: int = 64  # CLAP projection: the UNet's class-label size
    text_hidden: int = 32
    text_layers: int = 2
    unet_blocks: tuple[int, ...] = (16, 32)
    vae_blocks: tuple[int, ...] = (8, 16)
    vae_steps: int = 400
    vae_lr: float = 2e-3
    unet_steps: int = 3000
    unet_lr: float = 1e-3
    batch_size: int = 32
    caption_dropout: float = 0.1
    ema_decay: float = 0.995
    seed: int = 0
    num_inference_steps: int = 20
    guidance_scale: float = 10.0
    spectrogram_gain: float = 2.0  # tone amplitudes (0.3-0.6) scaled towards [0, 1] for the VAE
    attribute_weight: float = 1.0  # auxiliary attribute loss on the text embeddings (see _AttributeHeads)

    def decoder_fields(self) -> dict:
        """AudioLDM conditions on one L2-normalised vector: (Q, D_cond) = (1, cond_dim)."""
        return {"cond_tokens": 1, "cond_dim": self.cond_dim,
                "defaults": {"num_inference_steps": self.num_inference_steps, "guidance_scale": self.guidance_scale,
                             "duration_s": self.duration_s}}

    def scaled(self, factor: float) -> "AudioDecoderRecipe":
        return dataclasses.replace(self, vae_steps=max(1, int(self.vae_steps * factor)),
                                   unet_steps=max(1, int(self.unet_steps * factor)))


def bin_frequencies_hz(num_bins: int) -> np.ndarray:
    """(num_bins,) centre frequencies of the toy spectrogram: 200 Hz, 400 Hz, ..."""
    return BIN_SPACING_HZ * np.arange(1, num_bins + 1)


def _window() -> np.ndarray:
    return 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(WINDOW) / WINDOW)  # periodic Hann: sums to 1 at hop W/2


def tone_spectrogram(audio: np.ndarray, num_bins: int = 16, sample_rate_hz: int = 16000, gain: float = 1.0) -> np.ndarray:
    """Sinusoid amplitudes per frame: float32 (T, num_bins) with T = ceil(S / 160).

    Frame t is the Hann-windowed segment that the vocoder (:func:`sinusoidal_vocoder`) overlap-adds at samples
    [160 t - 80, 160 t + 240); entry (t, k) is the amplitude of the sinusoid at bin k's frequency in it, so
    a steady tone of amplitude a at a bin frequency reads a (times ``gain``).
    """
    x = np.asarray(audio, dtype=np.float64)
    frames = -(-x.size // HOP)
    padded = np.zeros(frames * HOP + WINDOW)
    padded[HOP // 2 : HOP // 2 + x.size] = x
    idx = np.arange(frames)[:, None] * HOP + np.arange(WINDOW)[None, :]
    segments = padded[idx] * _window()
    basis = np.exp(-2j * np.pi * np.outer(np.arange(WINDOW), bin_frequencies_hz(num_bins)) / sample_rate_hz)
    amplitude = np.abs(segments @ basis) * 2.0 / _window().sum()
    return (amplitude * gain).astype(np.float32)


def sinusoidal_vocoder(num_bins: int = 16, sample_rate_hz: int = 16000, gain: float = 1.0):
    """A ``SpeechT5HifiGan`` (AudioLDM's vocoder class) whose weights are set, not trained, to overlap-add
    Hann-windowed sinusoids: spectrogram (B, T, num_bins) -> waveform (B, 160 T).

    conv_pre copies the bins; the one upsampler (stride 160, kernel 320) holds +/- windowed sinusoids; the
    residual block's output convolutions are zero (identity); conv_post recombines the + and - channels
    (their leaky ReLUs sum to a linear map: lrelu(s) - lrelu(-s) = 1.01 s); tanh stays near-linear for
    amplitudes below 0.6. ``gain`` undoes :func:`tone_spectrogram`'s.
    """
    import torch
    from transformers import SpeechT5HifiGan, SpeechT5HifiGanConfig

    vocoder = SpeechT5HifiGan(SpeechT5HifiGanConfig(
        model_in_dim=num_bins, sampling_rate=sample_rate_hz, upsample_initial_channel=num_bins,
        upsample_rates=(HOP,), upsample_kernel_sizes=(WINDOW,), resblock_kernel_sizes=(3,),
        resblock_dilation_sizes=((1,),), normalize_before=False,
    ))
    n = np.arange(WINDOW)
    waves = _window()[None, :] * np.sin(2 * np.pi * np.outer(bin_frequencies_hz(num_bins), n) / sample_rate_hz)
    with torch.no_grad():
        for p in vocoder.parameters():
            p.zero_()
        vocoder.conv_pre.weight[:, :, 3] = torch.eye(num_bins)
        up = vocoder.upsampler[0].weight  # (num_bins, num_bins // 2, WINDOW)
        up[:, 0, :] = torch.from_numpy(waves / gain).float()
        up[:, 1, :] = -torch.from_numpy(waves / gain).float()
        for conv in vocoder.resblocks[0].convs1:  # any finite weights: convs2 = 0 makes the block the identity
            conv.weight[:, :, 1] = torch.eye(conv.weight.shape[0])
        slope = 0.01  # the final leaky ReLU's
        vocoder.conv_post.weight[0, 0, 3] = 1.0 / (1.0 + slope)
        vocoder.conv_post.weight[0, 1, 3] = -1.0 / (1.0 + slope)
    return vocoder.eval()


def build_audio_pipeline(recipe: AudioDecoderRecipe):
    """An ``AudioLDMPipeline`` with random toy components (seeded) and the fixed sinusoidal vocoder."""
    import torch
    from diffusers import AudioLDMPipeline, AutoencoderKL, UNet2DConditionModel
    from transformers import ClapTextConfig, ClapTextModelWithProjection

    from decoders import tiny
    from training.toyworld.data import SAMPLE_RATE_HZ, toy_tokenizer

    tokenizer = toy_tokenizer(recipe.cond_tokens)
    levels = len(recipe.vae_blocks)
    n = len(recipe.unet_blocks)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(recipe.seed)
        text_encoder = ClapTextModelWithProjection(ClapTextConfig(
            vocab_size=len(tokenizer), hidden_size=recipe.text_hidden, intermediate_size=2 * recipe.text_hidden,
            num_hidden_layers=recipe.text_layers, num_attention_heads=tiny.num_heads(recipe.text_hidden),
            max_position_embeddings=recipe.cond_tokens + tokenizer.pad_token_id + 2, projection_dim=recipe.cond_dim,
            pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
        ))
        unet = UNet2DConditionModel(
            sample_size=32, in_channels=4, out_channels=4, down_block_types=("DownBlock2D",) * n,
            up_block_types=("UpBlock2D",) * n, mid_block_type="UNetMidBlock2D", block_out_channels=recipe.unet_blocks,
            layers_per_block=1, norm_num_groups=8, cross_attention_dim=recipe.cond_dim,
            class_embed_type="simple_projection", projection_class_embeddings_input_dim=recipe.cond_dim,
            class_embeddings_concat=True,
        )
        vae = AutoencoderKL(
            in_channels=1, out_channels=1, down_block_types=("DownEncoderBlock2D",) * levels,
            up_block_types=("UpDecoderBlock2D",) * levels, block_out_channels=recipe.vae_blocks, layers_per_block=1,
            latent_channels=4, norm_num_groups=8, sample_size=32, mid_block_add_attention=False,
        )
    vocoder = sinusoidal_vocoder(recipe.num_bins, SAMPLE_RATE_HZ, recipe.spectrogram_gain)
    return AudioLDMPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                            scheduler=tiny.scheduler(), vocoder=vocoder)


def _load_spectrograms(rows: list[dict], recipe: AudioDecoderRecipe) -> np.ndarray:
    """(N, 1, T, num_bins) float32 spectrograms of the catalog's WAV files, cut or padded to duration_s."""
    import soundfile as sf

    from training.toyworld.data import SAMPLE_RATE_HZ

    samples = int(round(recipe.duration_s * SAMPLE_RATE_HZ))
    out = []
    for r in rows:
        audio, sr = sf.read(r["path"], dtype="float32", always_2d=True)
        if sr != SAMPLE_RATE_HZ:
            import soxr

            audio = soxr.resample(audio, sr, SAMPLE_RATE_HZ)
        mono = np.zeros(samples, np.float32)
        mono[: min(samples, len(audio))] = audio.mean(axis=1)[:samples]
        out.append(tone_spectrogram(mono, recipe.num_bins, SAMPLE_RATE_HZ, recipe.spectrogram_gain))
    return np.stack(out)[:, None]


class _AttributeHeads:
    """Auxiliary loss on the decoder's text encoder: linear heads on ``features(text_encoder, ids)`` (B, D_cond)
    predict each caption's attributes (cross-entropy); only the text encoder is kept.

    The diffusion loss alone did not make the jointly trained text encoder carry every attribute the UNet
    needs: audio's pooled CLAP-style embedding stayed nearly the same for every caption (1 - cosine ~ 1e-4;
    the heads stand in for CLAP's contrastive pre-training), and video's states changed 30x less with the
    direction word than with the colour word, so the UNet never learned direction (denoising loss with the
    direction swapped = loss with the right one, to 3 digits).
    """

    def __init__(self, rows: list[dict], keys: tuple[str, ...], dim: int, weight: float, features, *,
                 said_only: bool = False):
        """``said_only``: a caption that does not name its value of an attribute (``"a square moving left"``
        has no colour) gets no loss for that attribute."""
        import re

        import torch

        self.keys, self.weight, self.features = keys, weight, features
        self.labels, self.heads = {}, {}
        for k in keys:
            values = sorted({r["attributes"][k] for r in rows})
            self.labels[k] = torch.tensor([
                values.index(r["attributes"][k])
                if not said_only or r["attributes"][k] in re.findall(r"[a-z]+", r["caption"].lower()) else -100
                for r in rows])
            self.heads[k] = torch.nn.Linear(dim, len(values))

    def parameters(self):
        return [p for h in self.heads.values() for p in h.parameters()]

    def __call__(self, text_encoder, ids, idx):
        import torch.nn.functional as F

        feats = self.features(text_encoder, ids)
        loss = 0.0
        for k in self.keys:
            labels = self.labels[k][idx]
            if (labels >= 0).any():  # (a batch where no caption names it has no loss term)
                loss = loss + F.cross_entropy(self.heads[k](feats), labels, ignore_index=-100)
        return self.weight * loss


def train_audio_decoder(rows: list[dict], recipe: AudioDecoderRecipe, out: Path, *, progress: bool = True) -> dict:
    """Train the toy audio decoder (``AudioLDMPipeline``: VAE over the toy spectrogram, CLAP-style text
    encoder and class-conditioned UNet trained; the sinusoidal vocoder fixed) and save it to ``out``."""
    import torch
    import torch.nn.functional as F

    torch.set_num_threads(1)
    t_start = time.time()
    pipe = build_audio_pipeline(recipe)
    specs = torch.from_numpy(_load_spectrograms(rows, recipe))
    frames = specs.shape[2] - specs.shape[2] % 2 ** (len(recipe.vae_blocks) - 1)
    specs = specs[:, :, :frames]
    gen = torch.Generator().manual_seed(recipe.seed)
    torch.manual_seed(recipe.seed)
    vae_loss, encode = _train_autoencoder(pipe.vae, specs, steps=recipe.vae_steps, lr=recipe.vae_lr,
                                          batch_size=recipe.batch_size, gen=gen, progress=progress, desc="audio VAE")
    with torch.no_grad():
        latents = encode(specs)
    scaling = float(1.0 / latents.std())
    pipe.vae.register_to_config(scaling_factor=scaling)
    ids, empty = _token_ids(pipe.tokenizer, [r["caption"] for r in rows])
    pad = pipe.tokenizer.pad_token_id

    def condition(te, batch_ids):  # as AudioLDMPipeline._encode_prompt: normalised CLAP text_embeds as class labels
        embeds = te(batch_ids, attention_mask=(batch_ids != pad).long()).text_embeds
        return {"encoder_hidden_states": None, "class_labels": F.normalize(embeds, dim=-1)}

    def pooled(te, batch_ids):  # the normalised text_embeds the UNet sees as class labels (scaled for the heads)
        return 8.0 * F.normalize(te(batch_ids, attention_mask=(batch_ids != pad).long()).text_embeds, dim=-1)

    aux = _AttributeHeads(rows, ("pitch", "timbre"), recipe.cond_dim, recipe.attribute_weight, pooled)
    unet_loss, pipe.unet, pipe.text_encoder = _train_denoiser(
        pipe.unet, pipe.text_encoder, condition, latents * scaling, ids, empty, recipe,
        scheduler_config=pipe.scheduler.config, gen=gen, aux=aux, progress=progress, desc="audio UNet",
    )
    pipe.register_modules(unet=pipe.unet, text_encoder=pipe.text_encoder)
    out.mkdir(parents=True, exist_ok=True)
    pipe.save_pretrained(str(out), safe_serialization=True)
    return {"vae_loss": round(vae_loss, 6), "unet_loss": round(unet_loss, 5), "latent_scaling_factor": scaling,
            "train_s": round(time.time() - t_start, 1), "num_items": len(rows)}


# ---------------------------------------------------------------------------------------- video


@dataclass(frozen=True)
class VideoDecoderRecipe:
    """Everything that decides what the toy video decoder becomes (hashed for caching).

    Direction of motion needed three things (decoder checker score on 96 prompts of its own text encoder,
    ``polymodal toyworld score-decoder``; chance 25%): UNet3D (``TextToVideoSDPipeline``), epsilon, 3000 steps:
    35%; ``UNetMotionModel`` (frame positions), epsilon, 2000 steps: 40%, and its denoising loss did not change
    at all with the direction word swapped; + attribute heads on the text states: 47-50%; v-prediction without
    heads: 26%; v-prediction + a direction head: 98% but colours lost (the text states kept only direction);
    v-prediction + colour, shape and direction heads (each only where the caption says it), 2000 steps (9 min):
    100%, colours right.
    """

    size_px: int = 16
    num_frames: int = 8
    fps: int = 8
    cond_tokens: int = 16
    cond_dim: int = 64
    text_layers: int = 2
    unet_blocks: tuple[int, ...] = (16, 32)
    attention_heads: int = 2  # spatial and motion-module heads
    attribute_keys: tuple[str, ...] = ("colour", "shape", "direction")  # heads on the text states (_AttributeHeads)
    attribute_weight: float = 1.0
    # where the shape is in each frame is decided at high noise, where the epsilon loss is nearly blind
    prediction_type: str = "v_prediction"
    vae_blocks: tuple[int, ...] = (8, 16)
    vae_steps: int = 150
    vae_lr: float = 2e-3
    unet_steps: int = 2000
    unet_lr: float = 1e-3
    batch_size: int = 16
    caption_dropout: float = 0.1
    ema_decay: float = 0.995
    seed: int = 0
    num_inference_steps: int = 20
    guidance_scale: float = 3.0
    # the MP4 the service returns: at libx264's default (23) the 16 px frames of 200 held-out requests read back the
    # direction of the raw frames in 173/200 (the service's video share was 83.5%); 18: 192; 16 or lower: 196-198
    crf: int = 12

    def decoder_fields(self) -> dict:
        return {"cond_tokens": self.cond_tokens, "cond_dim": self.cond_dim,
                "defaults": {"num_inference_steps": self.num_inference_steps, "guidance_scale": self.guidance_scale,
                             "height_px": self.size_px, "width_px": self.size_px, "num_frames": self.num_frames,
                             "fps": self.fps, "crf": self.crf}}

    def scaled(self, factor: float) -> "VideoDecoderRecipe":
        return dataclasses.replace(self, vae_steps=max(1, int(self.vae_steps * factor)),
                                   unet_steps=max(1, int(self.unet_steps * factor)))


def build_video_pipeline(recipe: VideoDecoderRecipe):
    """An ``AnimateDiffPipeline`` with random toy components (seeded): per-frame VAE, CLIP text encoder and a
    ``UNetMotionModel`` (SD-style spatial blocks, each followed by an AnimateDiff motion module: temporal
    self-attention with sinusoidal frame positions).

    Not ``TextToVideoSDPipeline`` (the real video decoder's default class): ``UNet3DConditionModel``'s temporal
    attention has no frame positions, and at 16 px / 3000 steps it learned colour, shape and motion but not
    the direction (35% vs 25% chance). ``decoders.VideoDecoder`` loads either class.
    """
    import torch
    from diffusers import AnimateDiffPipeline, AutoencoderKL, UNetMotionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from decoders import tiny
    from training.toyworld.data import toy_tokenizer

    tokenizer = toy_tokenizer(recipe.cond_tokens)
    d = recipe.cond_dim
    levels = len(recipe.vae_blocks)
    n = len(recipe.unet_blocks)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(recipe.seed)
        text_encoder = CLIPTextModel(CLIPTextConfig(
            vocab_size=len(tokenizer), hidden_size=d, intermediate_size=2 * d, num_hidden_layers=recipe.text_layers,
            num_attention_heads=tiny.num_heads(d), max_position_embeddings=recipe.cond_tokens,
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        ))
        unet = UNetMotionModel(
            sample_size=recipe.size_px // 2 ** (levels - 1), in_channels=4, out_channels=4,
            down_block_types=("DownBlockMotion",) * (n - 1) + ("CrossAttnDownBlockMotion",),
            up_block_types=("CrossAttnUpBlockMotion",) + ("UpBlockMotion",) * (n - 1),
            block_out_channels=recipe.unet_blocks, layers_per_block=1, cross_attention_dim=d,
            num_attention_heads=recipe.attention_heads, motion_num_attention_heads=recipe.attention_heads,
            motion_max_seq_length=2 * recipe.num_frames, norm_num_groups=8,
        )
        vae = AutoencoderKL(
            in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * levels,
            up_block_types=("UpDecoderBlock2D",) * levels, block_out_channels=recipe.vae_blocks, layers_per_block=1,
            latent_channels=4, norm_num_groups=8, sample_size=recipe.size_px, mid_block_add_attention=False,
        )
    return AnimateDiffPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                               motion_adapter=None, scheduler=tiny.scheduler(recipe.prediction_type))


def _load_videos(rows: list[dict], recipe: VideoDecoderRecipe) -> np.ndarray:
    """(N, F, 3, size_px, size_px) float32 in [-1, 1]: the first ``num_frames`` frames of each MP4, resized."""
    import av
    from PIL import Image

    out = []
    for r in rows:
        with av.open(r["path"]) as container:
            frames = [f.to_image() for f in container.decode(video=0)][: recipe.num_frames]
        if len(frames) < recipe.num_frames:
            raise ValueError(f"{r['path']}: {len(frames)} frames, the recipe needs {recipe.num_frames}")
        size = (recipe.size_px, recipe.size_px)
        out.append(np.stack([np.asarray(f.convert("RGB").resize(size, Image.BOX) if f.size != size else f.convert("RGB"),
                                        dtype=np.float32) for f in frames]))
    return (np.stack(out).transpose(0, 1, 4, 2, 3) / 127.5 - 1.0).astype(np.float32)


def train_video_decoder(rows: list[dict], recipe: VideoDecoderRecipe, out: Path, *, progress: bool = True) -> dict:
    """Train the toy video decoder (``AnimateDiffPipeline``: per-frame VAE, then CLIP text encoder and
    ``UNetMotionModel`` together) on the catalog's MP4s and save it to ``out``."""
    import torch

    torch.set_num_threads(1)
    t_start = time.time()
    pipe = build_video_pipeline(recipe)
    videos = torch.from_numpy(_load_videos(rows, recipe))  # (N, F, 3, H, W)
    n, f = videos.shape[:2]
    gen = torch.Generator().manual_seed(recipe.seed)
    torch.manual_seed(recipe.seed)
    frames = videos.reshape(n * f, *videos.shape[2:])
    vae_loss, encode = _train_autoencoder(pipe.vae, frames, steps=recipe.vae_steps, lr=recipe.vae_lr,
                                          batch_size=4 * recipe.batch_size, gen=gen, progress=progress,
                                          desc="video VAE")
    with torch.no_grad():
        z = encode(frames)
    latents = z.reshape(n, f, *z.shape[1:]).permute(0, 2, 1, 3, 4).contiguous()  # (N, 4, F, h, w)
    scaling = float(1.0 / latents.std())
    pipe.vae.register_to_config(scaling_factor=scaling)
    ids, empty = _token_ids(pipe.tokenizer, [r["caption"] for r in rows])
    pad = pipe.tokenizer.pad_token_id

    def states_mean(te, batch_ids):  # mean of the states the UNet attends to, over the caption's tokens
        keep = (batch_ids != pad).unsqueeze(-1).float()
        return (te(batch_ids)[0] * keep).sum(1) / keep.sum(1)

    aux = _AttributeHeads(rows, recipe.attribute_keys, recipe.cond_dim, recipe.attribute_weight, states_mean,
                          said_only=True)
    unet_loss, pipe.unet, pipe.text_encoder = _train_denoiser(
        # as AnimateDiffPipeline passes them: the text states repeated for every frame (B * F, Q, D_cond)
        pipe.unet, pipe.text_encoder, lambda te, i: {"encoder_hidden_states": te(i)[0].repeat_interleave(f, dim=0)},
        latents * scaling, ids, empty, recipe, scheduler_config=pipe.scheduler.config, gen=gen, aux=aux,
        progress=progress, desc="video UNet",
    )
    pipe.register_modules(unet=pipe.unet, text_encoder=pipe.text_encoder)
    out.mkdir(parents=True, exist_ok=True)
    pipe.save_pretrained(str(out), safe_serialization=True)
    return {"vae_loss": round(vae_loss, 5), "unet_loss": round(unet_loss, 5), "latent_scaling_factor": scaling,
            "train_s": round(time.time() - t_start, 1), "num_items": n}


# ---------------------------------------------------------------------------------------- entry points

RECIPES = {Modality.IMAGE: ImageDecoderRecipe, Modality.AUDIO: AudioDecoderRecipe, Modality.VIDEO: VideoDecoderRecipe}
TRAINERS = {Modality.IMAGE: train_image_decoder, Modality.AUDIO: train_audio_decoder,
            Modality.VIDEO: train_video_decoder}


def trainable_modalities() -> list[Modality]:
    return list(TRAINERS)


def train_decoders(data_dir: str | Path, out_dir: str | Path, *, modalities=None, step_scale: float = 1.0,
                   force: bool = False, progress: bool = True) -> dict:
    """Train (or reuse) the toy decoder of each modality; returns the manifest written to ``OUT/`` :data:`MANIFEST`.

    Args:
        data_dir: a folder written by :func:`training.toyworld.data.write_dataset`.
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
        trained_fields = {k: v for k, v in dataclasses.asdict(recipe).items() if k not in GENERATION_FIELDS}
        config_hash = _hash({"version": RECIPE_VERSION, "recipe": trained_fields, "data": _rows_digest(rows)})
        folder = out_dir / m.value
        entry = manifest["decoders"].get(m.value)
        if not force and entry and entry.get("config_hash") == config_hash and (folder / "model_index.json").is_file():
            if progress:
                print(f"{m.value}: up to date ({folder}, config hash {config_hash})")
            if entry.get("defaults") != recipe.decoder_fields()["defaults"]:  # generation defaults: no retraining
                entry.update(recipe=dataclasses.asdict(recipe), **recipe.decoder_fields())
                _write_manifest(manifest_path, manifest, m)
            continue
        figures = TRAINERS[m](rows, recipe, folder, progress=progress)
        manifest["decoders"][m.value] = {
            "path": m.value, "config_hash": config_hash, "recipe": dataclasses.asdict(recipe), "figures": figures,
            **recipe.decoder_fields(),
        }
        _write_manifest(manifest_path, manifest, m)
    return manifest


def _write_manifest(manifest_path: Path, manifest: dict, modality: Modality) -> None:
    """Write ``manifest`` atomically, keeping other modalities' entries another run wrote meanwhile."""
    manifest_path.parent.mkdir(parents=True, exist_ok=True)
    if manifest_path.is_file():
        on_disk = json.loads(manifest_path.read_text())["decoders"]
        manifest["decoders"] = {**on_disk, modality.value: manifest["decoders"][modality.value]}
    tmp = manifest_path.with_suffix(".tmp")
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True))
    tmp.replace(manifest_path)

