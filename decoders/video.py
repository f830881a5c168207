"""Video decoder: a text-to-video UNet, ``diffusers.TextToVideoSDPipeline`` (zeroscope-style, the default and
the tiny random config) or ``diffusers.AnimateDiffPipeline`` (an SD UNet with AnimateDiff motion modules,
``UNetMotionModel``; Guo et al. 2023, "AnimateDiff", sec. 4): a pretrained folder's ``model_index.json`` names
which. Both take CLIP last hidden states as ``prompt_embeds`` (B, Q, D_cond) and return frames the same way.

zeroscope_v2_576w takes OpenCLIP ViT-H last hidden states (77, 1024); the tiny config (8, 32).
Edits (issue #27): ``VideoToVideoSDPipeline`` over a text-to-video UNet, ``AnimateDiffVideoToVideoPipeline`` over
AnimateDiff's, composed over the loaded components (see :mod:`decoders.base`); the whole video (no masks).
UNet3D's temporal attention has no frame positions (order reaches it only through padded temporal convolutions);
AnimateDiff's motion modules add sinusoidal frame positions, which is what lets the toy world's video decoder
learn the direction of motion on CPU (``training.toyworld.train``).
"""

from __future__ import annotations

import numpy as np
from diffusers import (
    AnimateDiffPipeline,
    AnimateDiffVideoToVideoPipeline,
    TextToVideoSDPipeline,
    UNet3DConditionModel,
    VideoToVideoSDPipeline,
)

from decoders import tiny
from decoders.base import Decoder
from decoders.media import Medium, video_to_uint8
from polymodal.config import DecoderConfig, DecoderDefaults
from polymodal.modality import Modality
from polymodal.types import EditSource


class VideoDecoder(Decoder):
    """Text-to-video diffusion driven by ``prompt_embeds`` (B, Q, D_cond) -> uint8 (F, H, W, 3) at ``fps``."""

    modality = Modality.VIDEO
    pipeline_class = TextToVideoSDPipeline
    pipeline_classes = (TextToVideoSDPipeline, AnimateDiffPipeline)
    edit_pipeline_classes = {
        TextToVideoSDPipeline: {"whole": VideoToVideoSDPipeline},
        AnimateDiffPipeline: {"whole": AnimateDiffVideoToVideoPipeline},
    }
    edit_one_item_classes = (VideoToVideoSDPipeline,)

    @classmethod
    def tiny_pipeline(cls, config: DecoderConfig, *, seed: int = 0) -> TextToVideoSDPipeline:
        return TextToVideoSDPipeline(**tiny.clip_conditioned_parts(config, UNet3DConditionModel, "3D", seed=seed))

    def _call_options(self, options: DecoderDefaults, batch_size: int) -> dict:
        return {"height": options.height_px, "width": options.width_px, "num_frames": options.num_frames}

    def _edit_inputs(self, pipe, sources: list[EditSource], options: DecoderDefaults) -> dict:
        from PIL import Image

        def frames(s: EditSource) -> list:
            return [Image.fromarray(np.ascontiguousarray(f)) for f in s.data]

        if isinstance(pipe, AnimateDiffVideoToVideoPipeline):  # a batch: one list of frames per item
            h, w = sources[0].data.shape[1:3]
            return {"video": [frames(s) for s in sources], "strength": options.strength, "height": h, "width": w}
        return {"video": frames(sources[0]), "strength": options.strength}  # one item per call (edit_one_item_classes)

    def _output_items(self, output):
        return output.frames

    def _to_medium(self, raw, seed: int, options: DecoderDefaults) -> Medium:
        return Medium(self.modality, video_to_uint8(raw), seed=seed, fps=float(options.fps), crf=options.crf)
