"""Audio decoder: AudioLDM (``diffusers.AudioLDMPipeline``), conditioning (B, 1, D_cond).

AudioLDM conditions its UNet on the L2-normalised CLAP text embedding (B, D_cond) used as class labels
(AudioLDM-l-full: D_cond 512); a mel-spectrogram VAE and a HiFi-GAN vocoder turn latents into a waveform at
the vocoder's ``sampling_rate``. Its negative embedding is CLAP(""), computed once at load with the
decoder's own tokenizer.

No edits: diffusers has no AudioLDM audio-to-audio pipeline (nothing to compose over these parts; AudioLDM's
authors did style transfer with their own code, which the ``audioldm`` package ships and DESIGN.md rules out), so
``edit_pipeline_classes`` is empty and a source medium is refused (``ValueError``).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AudioLDMPipeline, UNet2DConditionModel
from transformers import ClapTextConfig, ClapTextModelWithProjection, SpeechT5HifiGan, SpeechT5HifiGanConfig

from decoders import tiny
from decoders.base import Decoder, seeded
from decoders.media import Medium, audio_to_mono
from polymodal.config import DecoderConfig, DecoderDefaults
from polymodal.modality import Modality

TINY_TEXT_LENGTH = 16  # padding length of the tiny CLAP tokenizer
TINY_MEL_BINS = 8
TINY_SAMPLE_RATE_HZ = 16000  # hop of 160 samples per mel frame, as AudioLDM


class AudioDecoder(Decoder):
    """AudioLDM text-to-audio driven by ``prompt_embeds`` (B, 1, D_cond) or (B, D_cond), L2-normalised
    -> float32 mono (S,) at :attr:`sample_rate_hz`."""

    modality = Modality.AUDIO
    pipeline_class = AudioLDMPipeline

    @classmethod
    def tiny_pipeline(cls, config: DecoderConfig, *, seed: int = 0) -> AudioLDMPipeline:
        d = config.cond_dim
        tokenizer = tiny.text_tokenizer(model_max_length=TINY_TEXT_LENGTH)
        with seeded(seed):
            text_encoder = ClapTextModelWithProjection(
                ClapTextConfig(
                    vocab_size=len(tokenizer),
                    hidden_size=32,
                    intermediate_size=64,
                    num_hidden_layers=1,
                    num_attention_heads=2,
                    # Roberta-style positions start after the padding index
                    max_position_embeddings=TINY_TEXT_LENGTH + tokenizer.pad_token_id + 2,
                    projection_dim=d,
                    pad_token_id=tokenizer.pad_token_id,
                    bos_token_id=tokenizer.bos_token_id,
                    eos_token_id=tokenizer.eos_token_id,
                )
            )
            unet = UNet2DConditionModel(
                sample_size=16,
                in_channels=4,
                out_channels=4,
                down_block_types=("DownBlock2D", "DownBlock2D"),
                up_block_types=("UpBlock2D", "UpBlock2D"),
                mid_block_type="UNetMidBlock2D",
                block_out_channels=tiny.TINY_BLOCKS,
                layers_per_block=1,
                norm_num_groups=tiny.TINY_GROUPS,
                cross_attention_dim=d,  # unused: no attention blocks (AudioLDM has no text cross-attention)
                class_embed_type="simple_projection",
                projection_class_embeddings_input_dim=d,
                class_embeddings_concat=True,
            )
            vae = tiny.vae(1)
            vocoder = SpeechT5HifiGan(
                SpeechT5HifiGanConfig(
                    model_in_dim=TINY_MEL_BINS,
                    sampling_rate=TINY_SAMPLE_RATE_HZ,
                    upsample_initial_channel=16,
                    upsample_rates=(10, 16),
                    upsample_kernel_sizes=(20, 32),
                    resblock_kernel_sizes=(3,),
                    resblock_dilation_sizes=((1, 3),),
                    normalize_before=False,
                    initializer_range=0.1,  # audible noise (the default 0.01 gives ~1e-5 amplitude)
                )
            )
        return AudioLDMPipeline(
            vae=vae,
            text_encoder=text_encoder.eval(),
            tokenizer=tokenizer,
            unet=unet,
            scheduler=tiny.scheduler(),
            vocoder=vocoder.eval(),
        )

    @property
    def sample_rate_hz(self) -> int:
        """The vocoder's output rate."""
        return int(self.pipeline.vocoder.config.sampling_rate)

    def _pipeline_cond_shape(self) -> tuple[int, int]:
        return 1, int(self.pipeline.text_encoder.config.projection_dim)

    @torch.no_grad()
    def encode_text(self, captions: list[str]) -> torch.Tensor:
        """Captions -> (B, 1, D_cond): CLAP text embeddings, L2-normalised (as AudioLDM's pipeline)."""
        tok = self.pipeline.tokenizer
        inputs = tok(
            list(captions), padding="max_length", max_length=tok.model_max_length, truncation=True, return_tensors="pt"
        )
        out = self.pipeline.text_encoder(
            inputs.input_ids.to(self.device), attention_mask=inputs.attention_mask.to(self.device)
        )
        return F.normalize(out.text_embeds, dim=-1)[:, None, :].to(self.dtype)

    def _pipeline_embeds(self, prompt_embeds: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        positive = prompt_embeds[:, 0, :]  # AudioLDM: (B, D_cond) class labels
        negative = self.negative_prompt_embeds[0].unsqueeze(0).expand_as(positive).contiguous()
        return positive, negative

    def _call_options(self, options: DecoderDefaults, batch_size: int) -> dict:
        return {"audio_length_in_s": options.duration_s}

    def _output_items(self, output):
        return output.audios

    def _to_medium(self, raw: np.ndarray, seed: int, options: DecoderDefaults) -> Medium:
        return Medium(self.modality, audio_to_mono(raw), seed=seed, sample_rate_hz=self.sample_rate_hz)
