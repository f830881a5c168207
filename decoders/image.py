"""Image decoder: Stable Diffusion (``diffusers.StableDiffusionPipeline``), conditioning (B, Q, D_cond).

SD v1.5 takes CLIP ViT-L/14 last hidden states (77, 768); the tiny config (8, 32).

Edits (issue #27) compose ``StableDiffusionImg2ImgPipeline`` (the whole image) and ``StableDiffusionInpaintPipeline``
(only where a mask allows) over the loaded components (see :mod:`decoders.base`).
"""

from __future__ import annotations

import numpy as np
from diffusers import (
    StableDiffusionImg2ImgPipeline,
    StableDiffusionInpaintPipeline,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)

from decoders import tiny
from decoders.base import Decoder
from decoders.media import Medium, image_to_uint8
from polymodal.config import DecoderConfig, DecoderDefaults
from polymodal.modality import Modality
from polymodal.types import EditSource


class ImageDecoder(Decoder):
    """Stable Diffusion text-to-image driven by ``prompt_embeds`` (B, Q, D_cond) -> uint8 (H, W, 3)."""

    modality = Modality.IMAGE
    pipeline_class = StableDiffusionPipeline
    edit_pipeline_classes = {
        StableDiffusionPipeline: {"whole": StableDiffusionImg2ImgPipeline, "masked": StableDiffusionInpaintPipeline},
    }

    @classmethod
    def tiny_pipeline(cls, config: DecoderConfig, *, seed: int = 0) -> StableDiffusionPipeline:
        return StableDiffusionPipeline(
            **tiny.clip_conditioned_parts(config, UNet2DConditionModel, "2D", seed=seed),
            safety_checker=None,
            feature_extractor=None,
            image_encoder=None,
            requires_safety_checker=False,
        )

    def _call_options(self, options: DecoderDefaults) -> dict:
        return {"height": options.height_px, "width": options.width_px}

    def _edit_inputs(self, pipe, sources: list[EditSource], options: DecoderDefaults) -> dict:
        from PIL import Image

        inputs = {"image": [Image.fromarray(np.ascontiguousarray(s.data)) for s in sources],
                  "strength": options.strength}
        if sources[0].mask is not None:  # diffusers: white = repaint
            inputs["mask_image"] = [Image.fromarray(np.where(s.mask, 255, 0).astype(np.uint8), mode="L")
                                    for s in sources]
            inputs["height"], inputs["width"] = sources[0].data.shape[:2]
        return inputs

    def _output_items(self, output):
        return output.images

    def _item_flag(self, output, k: int) -> str | None:
        flags = getattr(output, "nsfw_content_detected", None)
        if flags is not None and len(flags) > k and flags[k]:
            return "flagged by the safety checker"
        return None

    def _to_medium(self, raw: np.ndarray, seed: int, options: DecoderDefaults) -> Medium:
        return Medium(self.modality, image_to_uint8(raw), seed=seed)
