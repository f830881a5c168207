"""``generate_image`` / ``generate_audio`` / ``generate_video``: a caption -> a medium, through a decoder's own
text encoder.

The caption is encoded by the decoder pipeline's own tokenizer and text encoder (``Decoder.encode_text``: (1, Q,
D_cond), the very conditioning NExT-GPT's decoding alignment targets), then rendered by the decoder. No LLM and no
output projector are involved: this is the tool route to media (Visual ChatGPT calling Stable Diffusion), beside the
signal-token route. The decoder is passed in (built by the caller, or the decoder deployment's own), so tests need
no Ray. Works for every decoder the project builds: ``tiny`` (random weights, offline BPE tokenizer: noise, but
the right shape) and ``toy`` (trained on captions: ``generate_image("a red circle")`` reads back as a red circle
with the toy checker).
"""

from __future__ import annotations

from typing import Any, ClassVar

from pydantic import Field, field_validator

from polymodal.modality import Modality
from polymodal.types import MediaPart
from skills.base import Skill, SkillError, SkillParams, SkillResult


def render(decoder, prompt_embeds, seeds: list[int], options) -> list:
    """The one place that calls the decoder's render method (``Decoder.render``).

    Args:
        prompt_embeds: (B, Q, D_cond).
    Returns:
        One ``Medium`` or ``DecodeError`` per seed.
    """
    return decoder.render(prompt_embeds, seeds, options)


class GenerateParams(SkillParams):
    """Arguments common to the generators; unset options take the decoder's defaults."""

    caption: str = Field(min_length=1, max_length=1000, description="what to make, in words")
    seed: int = Field(0, ge=0, le=2**31 - 1, description="random seed (same caption and seed: same medium)")
    num_inference_steps: int | None = Field(None, ge=1, le=200, description="denoising steps (none: the decoder's)")
    guidance_scale: float | None = Field(None, ge=0.0, le=30.0, description="classifier-free guidance scale")

    @field_validator("caption")
    @classmethod
    def _not_blank(cls, v: str) -> str:
        v = v.strip()
        if not v:
            raise ValueError("caption must not be blank")
        return v


class GenerateImageParams(GenerateParams):
    height_px: int | None = Field(None, ge=8, le=2048, description="image height (none: the decoder's)")
    width_px: int | None = Field(None, ge=8, le=2048, description="image width (none: the decoder's)")


class GenerateAudioParams(GenerateParams):
    duration_s: float | None = Field(None, gt=0.0, le=30.0, description="length in seconds (none: the decoder's)")


class GenerateVideoParams(GenerateParams):
    num_frames: int | None = Field(None, ge=1, le=128, description="frames (none: the decoder's)")
    height_px: int | None = Field(None, ge=8, le=2048, description="frame height (none: the decoder's)")
    width_px: int | None = Field(None, ge=8, le=2048, description="frame width (none: the decoder's)")


class _GenerateSkill(Skill):
    """Caption -> medium with one decoder of ``modality``."""

    modality: ClassVar[Modality]
    accepts = ("text",)
    weight = "heavy"

    def __init__(self, decoder):
        """``decoder``: a built :class:`decoders.base.Decoder` of this skill's modality (``encode_text``,
        ``generate``, ``defaults``, ``cond_shape``).

        Raises:
            ValueError: a decoder of another modality.
        """
        got = getattr(decoder, "modality", None)
        if got is None or Modality.parse(got) is not self.modality:
            raise ValueError(f"{self.name} needs a {self.modality.value} decoder, got {decoder!r}")
        self.decoder = decoder

    def _options(self, params: GenerateParams):
        defaults = self.decoder.defaults
        updates: dict[str, Any] = {k: v for k, v in params.model_dump(exclude={"caption", "seed"}).items()
                                   if v is not None}
        return type(defaults).model_validate({**defaults.model_dump(), **updates})

    def _run(self, params: GenerateParams, media: tuple[MediaPart, ...]) -> SkillResult:
        options = self._options(params)
        embeds = self.decoder.encode_text([params.caption])
        q, d = self.decoder.cond_shape
        if tuple(embeds.shape) != (1, q, d):
            raise SkillError(f"{self.modality.value} decoder's text encoder gave {tuple(embeds.shape)}, its "
                             f"conditioning is (1, {q}, {d})")
        (out,) = render(self.decoder, embeds, [params.seed], options)
        if isinstance(out, Exception):  # decoders.DecodeError: NaN, all black / silent, cancelled
            raise SkillError(f"the {self.modality.value} decoder produced no usable output: "
                             f"{getattr(out, 'reason', out)}")
        return SkillResult(self.name, self._summary(out, params), media=(out,),
                           data={"caption": params.caption, "seed": params.seed, "modality": self.modality.value,
                                 "shape": list(out.data.shape), "options": options.model_dump()})

    def _summary(self, medium, params: GenerateParams) -> str:
        raise NotImplementedError


class GenerateImageSkill(_GenerateSkill):
    name = "generate_image"
    description = "Make an image from a caption with the preset's image decoder (through its own text encoder)."
    Params = GenerateImageParams
    modality = Modality.IMAGE
    returns = ("text", "image", "data")

    def _summary(self, medium, params: GenerateParams) -> str:
        h, w = medium.data.shape[:2]
        return f"generated an image ({w}x{h} px, seed {params.seed}) of {params.caption!r}"


class GenerateAudioSkill(_GenerateSkill):
    name = "generate_audio"
    description = "Make a sound from a caption with the preset's audio decoder (through its own text encoder)."
    Params = GenerateAudioParams
    modality = Modality.AUDIO
    returns = ("text", "audio", "data")

    def _summary(self, medium, params: GenerateParams) -> str:
        return (f"generated a sound ({medium.duration_s:.2f} s at {medium.sample_rate_hz} Hz, seed {params.seed}) "
                f"of {params.caption!r}")


class GenerateVideoSkill(_GenerateSkill):
    name = "generate_video"
    description = "Make a short video from a caption with the preset's video decoder (through its own text encoder)."
    Params = GenerateVideoParams
    modality = Modality.VIDEO
    returns = ("text", "video", "data")

    def _summary(self, medium, params: GenerateParams) -> str:
        f, h, w = medium.data.shape[:3]
        return (f"generated a video ({f} frames of {w}x{h} px at {medium.fps:g} fps, seed {params.seed}) of "
                f"{params.caption!r}")
