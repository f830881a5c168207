"""The decoder's and the LLM's fast-path options (issue #30): each changes what it says, renders what the default
renders, and an option a pipeline cannot take is refused, never ignored."""

from __future__ import annotations

import types

import numpy as np
import pytest
import torch

from decoders import ImageDecoder
from decoders.errors import DecoderLoadError
from polymodal.config import DecoderConfig, LLMConfig
from polymodal.llm import _tiny_model
from polymodal.presets import get_preset


@pytest.fixture(scope="module")
def reference():
    """The default decoder's render of two seeds (the fast paths must give the same images)."""
    embeds = torch.randn(2, 8, 32, generator=torch.Generator().manual_seed(0))
    return embeds, ImageDecoder.from_config(DecoderConfig()).render(embeds, [0, 1])


def _pixels(medium) -> np.ndarray:
    return np.asarray(medium.data, dtype=np.int16)


@pytest.mark.parametrize("fast_path", [{"attention": "eager"}, {"channels_last": True},
                                       {"attention": "eager", "channels_last": True}])
def test_a_fast_path_renders_what_the_default_renders(reference, fast_path):
    embeds, ref = reference
    decoder = ImageDecoder.from_config(DecoderConfig(fast_path=fast_path))
    unet = decoder.pipeline.unet
    processors = {type(p).__name__ for p in unet.attn_processors.values()}
    assert processors == ({"AttnProcessor"} if fast_path.get("attention") == "eager" else {"AttnProcessor2_0"})
    assert unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last) == bool(
        fast_path.get("channels_last"))
    out = decoder.render(embeds, [0, 1])
    for a, b in zip(out, ref):
        assert np.abs(_pixels(a) - _pixels(b)).max() <= 1  # 8-bit rounding of float differences at most


def test_compile_compiles_the_denoiser_in_place():
    decoder = ImageDecoder.from_config(DecoderConfig(fast_path={"compile": "reduce-overhead"}))
    unet = decoder.pipeline.unet
    assert type(unet).__name__ == "UNet2DConditionModel"  # the module stays itself (from_pipe, save keep working)
    assert unet._compiled_call_impl is not None  # noqa: SLF001 - what nn.Module.compile sets
    assert ImageDecoder.from_config(DecoderConfig()).pipeline.unet._compiled_call_impl is None  # noqa: SLF001


def test_an_option_the_pipeline_cannot_take_is_refused():
    decoder = ImageDecoder.from_config(DecoderConfig())
    decoder.pipeline = types.SimpleNamespace(vae=None)
    with pytest.raises(DecoderLoadError, match="needs a denoiser module"):
        decoder.apply_fast_path(DecoderConfig(fast_path={"channels_last": True}).fast_path)
    decoder.apply_fast_path(DecoderConfig().fast_path)  # the defaults ask nothing of it
    decoder.pipeline = types.SimpleNamespace(unet=torch.nn.Linear(2, 2))
    with pytest.raises(DecoderLoadError, match="attention processors"):
        decoder.apply_fast_path(DecoderConfig(fast_path={"attention": "eager"}).fast_path)


def test_the_llm_attention_implementation_is_applied_and_answers_alike():
    ids = torch.tensor([[1, 5, 9, 42, 7]])
    logits = {}
    for impl in ("sdpa", "eager"):
        model = _tiny_model(LLMConfig(attn_implementation=impl), 600, 0, torch.device("cpu"), torch.float32)
        assert model.config._attn_implementation == impl  # noqa: SLF001
        with torch.no_grad():
            logits[impl] = model(ids).logits
    torch.testing.assert_close(logits["sdpa"], logits["eager"], atol=1e-5, rtol=1e-4)


def test_init_on_the_target_device_draws_the_weights_there():
    """``init_device="target"`` builds the random model on the LLM's device in its dtype (a 7B on a GPU in
    seconds); ``meta`` stands in for the GPU here. The default draws on the CPU (the same weights everywhere)."""
    cfg = LLMConfig.model_validate({"tiny": {"init_device": "target"}})
    model = _tiny_model(cfg, 600, 0, torch.device("meta"), torch.float16)
    assert {p.device.type for p in model.parameters()} == {"meta"}
    assert {p.dtype for p in model.parameters()} == {torch.float16}
    assert torch.get_default_dtype() == torch.float32  # restored
    on_cpu = _tiny_model(cfg, 600, 0, torch.device("cpu"), torch.float32)  # target = the CPU: the CPU's weights
    default = _tiny_model(LLMConfig(), 600, 0, torch.device("cpu"), torch.float32)
    torch.testing.assert_close(on_cpu.model.embed_tokens.weight, default.model.embed_tokens.weight)
    assert get_preset("nextgpt-7b-random").llm.tiny.init_device == "target"
