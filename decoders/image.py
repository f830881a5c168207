"""Image decoder: Stable Diffusion (``diffusers.StableDiffusionPipeline``), conditioning (B, Q, D_cond).

SD v1.5 takes CLIP ViT-L/14 last hidden states (77, 768); the tiny config (8, 32).
"""

from __future__ import annotations

import numpy as np
from diffusers import StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

from decoders import tiny
from decoders.base import Decoder, seeded
from decoders.media import Medium, image_to_uint8
from polymodal.config import DecoderConfig, DecoderDefaults
from polymodal.modality import Modality


class ImageDecoder(Decoder):
    """Stable Diffusion text-to-image driven by ``prompt_embeds`` (B, Q, D_cond) -> uint8 (H, W, 3)."""

    modality = Modality.IMAGE
    pipeline_class = StableDiffusionPipeline

    @classmethod
    def tiny_pipeline(cls, config: DecoderConfig, *, seed: int = 0) -> StableDiffusionPipeline:
        q, d = config.cond_tokens, config.cond_dim
        tokenizer = tiny.text_tokenizer(model_max_length=q)
        with seeded(seed):
            text_encoder = CLIPTextModel(
                CLIPTextConfig(
                    vocab_size=len(tokenizer),
                    hidden_size=d,
                    intermediate_size=2 * d,
                    num_hidden_layers=1,
                    num_attention_heads=tiny.num_heads(d),
                    max_position_embeddings=q,
                    bos_token_id=tokenizer.bos_token_id,
                    eos_token_id=tokenizer.eos_token_id,
                    pad_token_id=tokenizer.pad_token_id,
                )
            )
            unet = UNet2DConditionModel(
                sample_size=16,
                in_channels=4,
                out_channels=4,
                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
                block_out_channels=tiny.TINY_BLOCKS,
                layers_per_block=1,
                cross_attention_dim=d,
                attention_head_dim=8,
                norm_num_groups=tiny.TINY_GROUPS,
            )
            vae = tiny.vae(3)
        return StableDiffusionPipeline(
            vae=vae,
            text_encoder=text_encoder.eval(),
            tokenizer=tokenizer,
            unet=unet,
            scheduler=tiny.scheduler(),
            safety_checker=None,
            feature_extractor=None,
            image_encoder=None,
            requires_safety_checker=False,
        )

    def _call_options(self, options: DecoderDefaults) -> dict:
        return {"height": options.height_px, "width": options.width_px}

    def _output_items(self, output):
        return output.images

    def _item_flag(self, output, k: int) -> str | None:
        flags = getattr(output, "nsfw_content_detected", None)
        if flags is not None and len(flags) > k and flags[k]:
            return "flagged by the safety checker"
        return None

    def _to_medium(self, raw: np.ndarray, seed: int, options: DecoderDefaults) -> Medium:
        return Medium(Modality.IMAGE, image_to_uint8(raw), seed=seed)
