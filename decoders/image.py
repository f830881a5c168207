"""Image decoder: Stable Diffusion (``diffusers.StableDiffusionPipeline``), conditioning (B, Q, D_cond).

SD v1.5 takes CLIP ViT-L/14 last hidden states (77, 768); the tiny config (8, 32).

Edits (issue #27) compose ``StableDiffusionImg2ImgPipeline`` (the whole image) and ``StableDiffusionInpaintPipeline``
(only where a mask allows) over the loaded components (see :mod:`decoders.base`).

A folder whose ``model_index.json`` names ``StableDiffusionInstructPix2PixPipeline`` (Brooks et al. 2023,
"InstructPix2Pix", sec. 3.2: the UNet's ``conv_in`` widened to 8 channels, the source's VAE latents concatenated to
the noisy latents at every step) is one pipeline that both generates and edits, over one set of weights:

- **generation**: the source latents are zeros, the "no image" condition the model was trained with (the paper's
  conditioning dropout); with zeros the image-conditioned and unconditioned branches of its three-way guidance are
  the same, so ``image_guidance_scale`` does not matter and the result is plain classifier-free guidance at
  ``guidance_scale`` (computed over three copies of the latents: 1.5x the UNet work of a plain Stable Diffusion
  pipeline when ``guidance_scale > 1``).
- **edits** (``"whole"``): the source image itself, at every step; ``image_guidance_scale`` (>= 1; the paper's
  s_I, default 1.5) says how closely the edit follows it. There is no ``strength``: nothing is noised.
  ``"masked"``: the same edit, then the source's pixels kept where the mask is False (diffusers has no
  InstructPix2Pix inpainting pipeline).

``source="tiny"`` with ``options: {"pipeline": "instruct-pix2pix"}`` builds a tiny random one (8 input channels).
"""

from __future__ import annotations

import numpy as np
import torch
from diffusers import (
    StableDiffusionImg2ImgPipeline,
    StableDiffusionInpaintPipeline,
    StableDiffusionInstructPix2PixPipeline,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)

from decoders import tiny
from decoders.base import Decoder
from decoders.errors import DecoderLoadError
from decoders.media import Medium, image_to_uint8
from polymodal.config import DecoderConfig, DecoderDefaults
from polymodal.modality import Modality
from polymodal.types import EditSource


class ImageDecoder(Decoder):
    """Stable Diffusion text-to-image driven by ``prompt_embeds`` (B, Q, D_cond) -> uint8 (H, W, 3)."""

    modality = Modality.IMAGE
    pipeline_class = StableDiffusionPipeline
    pipeline_classes = (StableDiffusionPipeline, StableDiffusionInstructPix2PixPipeline)
    edit_pipeline_classes = {
        StableDiffusionPipeline: {"whole": StableDiffusionImg2ImgPipeline, "masked": StableDiffusionInpaintPipeline},
        StableDiffusionInstructPix2PixPipeline: {"whole": StableDiffusionInstructPix2PixPipeline,
                                                 "masked": StableDiffusionInstructPix2PixPipeline},
    }
    config_option_keys = ("pipeline",)
    TINY_PIPELINES = {"stable-diffusion": StableDiffusionPipeline,
                      "instruct-pix2pix": StableDiffusionInstructPix2PixPipeline}

    @classmethod
    def tiny_pipeline(cls, config: DecoderConfig, *, seed: int = 0) -> StableDiffusionPipeline:
        """Tiny random Stable Diffusion; ``config.options["pipeline"] == "instruct-pix2pix"``: InstructPix2Pix
        (``conv_in`` with 8 input channels).

        Raises:
            DecoderLoadError: another ``pipeline`` option (lists the choices).
        """
        name = config.options.get("pipeline", "stable-diffusion")
        if name not in cls.TINY_PIPELINES:
            raise DecoderLoadError(f"unknown image decoder pipeline {name!r}; choices: {', '.join(cls.TINY_PIPELINES)}")
        parts = tiny.clip_conditioned_parts(config, UNet2DConditionModel, "2D", seed=seed,
                                            in_channels=8 if name == "instruct-pix2pix" else 4)
        return cls.TINY_PIPELINES[name](**parts, safety_checker=None, feature_extractor=None,
                                        requires_safety_checker=False, **(
                                            {"image_encoder": None} if name == "stable-diffusion" else {}))

    @property
    def reads_source(self) -> bool:
        """Whether its edits read the source at every step (InstructPix2Pix) instead of starting from it noised."""
        return isinstance(self.pipeline, StableDiffusionInstructPix2PixPipeline)

    @property
    def edit_options(self) -> tuple[str, ...]:
        return ("image_guidance_scale",) if self.reads_source else super().edit_options

    @torch.no_grad()
    def encode_text(self, captions: list[str]) -> torch.Tensor:
        if not self.reads_source:
            return super().encode_text(captions)
        # InstructPix2Pix has no public encode_prompt; its _encode_prompt is the encoding its own call uses (the same
        # tokenizer and CLIP text encoder pass as Stable Diffusion's), without guidance: (B, Q, D_cond)
        return self.pipeline._encode_prompt(list(captions), self.device, 1, False).to(self.dtype)

    def _call_options(self, options: DecoderDefaults, batch_size: int) -> dict:
        if not self.reads_source:
            return {"height": options.height_px, "width": options.width_px}
        # InstructPix2Pix: the "no image" condition (zero latents; 4 channels are taken as latents as they are)
        scale = self.pipeline.vae_scale_factor
        zeros = torch.zeros(batch_size, 4, options.height_px // scale, options.width_px // scale,
                            device=self.device, dtype=self.dtype)
        return {"image": zeros, "image_guidance_scale": 1.0}

    def _edit_inputs(self, pipe, sources: list[EditSource], options: DecoderDefaults) -> dict:
        from PIL import Image

        inputs = {"image": [Image.fromarray(np.ascontiguousarray(s.data)) for s in sources]}
        if self.reads_source:  # the mask is applied after (decoders.base.keep_outside_mask)
            return {**inputs, "image_guidance_scale": options.image_guidance_scale}
        inputs["strength"] = options.strength
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
