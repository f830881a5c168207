"""Tiny components shared by the random-initialised (``source="tiny"``) decoders.

Sized so that a 2-step 32x32 generation takes well under a second on CPU. The tokenizer is the project's
offline BPE (:func:`polymodal.offline_tokenizer.tiny_tokenizer`) with CLIP/Roberta-style begin and end
tokens around every text, so the embedding of ``""`` is defined.
"""

from __future__ import annotations

from diffusers import AutoencoderKL, DDIMScheduler

from decoders.base import seeded
from polymodal.offline_tokenizer import tiny_tokenizer

TINY_VOCAB_SIZE = 512
# Channels of the tiny UNets / VAEs; 2 levels, so the VAE scale factor is 2 (32 px -> 16 latent px).
TINY_BLOCKS = (16, 32)
TINY_VAE_BLOCKS = (8, 16)
TINY_GROUPS = 8


def text_tokenizer(model_max_length: int):
    """Offline BPE tokenizer padding to ``model_max_length``; every text becomes ``<eos> ... <eos>``
    (the begin and end token are both ``<|endoftext|>``, as CLIP's end token)."""
    return tiny_tokenizer(vocab_size=TINY_VOCAB_SIZE, model_max_length=model_max_length, wrap=True)


def num_heads(dim: int) -> int:
    """The largest of 4, 2, 1 heads dividing ``dim``."""
    return next(h for h in (4, 2, 1) if dim % h == 0)


def vae(channels: int) -> AutoencoderKL:
    """A 2-level KL autoencoder with 4 latent channels (image: 3 channels; AudioLDM mel: 1)."""
    return AutoencoderKL(
        in_channels=channels,
        out_channels=channels,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=TINY_VAE_BLOCKS,
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=TINY_GROUPS,
        sample_size=32,
    )


def scheduler(prediction_type: str = "epsilon") -> DDIMScheduler:
    """DDIM with Stable Diffusion's noise schedule; the UNet predicts ``prediction_type`` (``epsilon`` or
    ``v_prediction``, as SD 2's 768 px models)."""
    return DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type=prediction_type,
    )


def clip_text_encoder(tokenizer, *, num_tokens: int, dim: int):
    """A one-layer random ``CLIPTextModel`` of width ``dim`` over ``tokenizer`` (Q = ``num_tokens`` positions)."""
    from transformers import CLIPTextConfig, CLIPTextModel

    return CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=dim,
            intermediate_size=2 * dim,
            num_hidden_layers=1,
            num_attention_heads=num_heads(dim),
            max_position_embeddings=num_tokens,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    ).eval()


def unet_kwargs(cross_attention_dim: int, dims: str, in_channels: int = 4) -> dict:
    """Constructor arguments of a tiny 2-level conditional UNet; ``dims`` is ``"2D"`` or ``"3D"``; ``in_channels`` 8
    for InstructPix2Pix (the source's latents beside the noisy ones)."""
    return dict(
        sample_size=16,
        in_channels=in_channels,
        out_channels=4,
        down_block_types=(f"CrossAttnDownBlock{dims}", f"DownBlock{dims}"),
        up_block_types=(f"UpBlock{dims}", f"CrossAttnUpBlock{dims}"),
        block_out_channels=TINY_BLOCKS,
        layers_per_block=1,
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=8,
        norm_num_groups=TINY_GROUPS,
    )


def clip_conditioned_parts(config, unet_class, dims: str, *, seed: int = 0, in_channels: int = 4) -> dict:
    """The tiny random parts of a CLIP-conditioned pipeline (Stable Diffusion, text-to-video): ``tokenizer`` padding
    to Q = ``config.cond_tokens``, a one-layer CLIP ``text_encoder`` of width D_cond = ``config.cond_dim``, a 2-level
    ``unet`` of ``unet_class`` (``dims``: ``"2D"`` or ``"3D"``) cross-attending to (Q, D_cond), an RGB ``vae`` and
    the DDIM ``scheduler``; built under torch's RNG seeded with ``seed``; ``in_channels``: the UNet's (8 for
    InstructPix2Pix)."""
    q, d = config.cond_tokens, config.cond_dim
    tokenizer = text_tokenizer(model_max_length=q)
    with seeded(seed):
        text_encoder = clip_text_encoder(tokenizer, num_tokens=q, dim=d)
        unet = unet_class(**unet_kwargs(d, dims, in_channels))
        rgb_vae = vae(3)
    return dict(vae=rgb_vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler())
