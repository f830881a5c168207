"""The stage seams are typed Protocols the real stages satisfy; one verb per meaning (``render`` for media);
one ``interleave``, one mime -> modality map, one source of the option bounds."""

from __future__ import annotations

import inspect

import numpy as np
import pytest

from polymodal import config, media_io
from polymodal.modality import Modality
from polymodal.types import SignalGroup, TextPart, interleave
from services.protocol import DecoderStageLike, LLMStageLike, RenderedMedium
from tests.serve_fakes import fake_stages

IMAGE, AUDIO, VIDEO = Modality.IMAGE, Modality.AUDIO, Modality.VIDEO


def _params(fn) -> dict[str, inspect.Parameter]:
    return {k: p for k, p in inspect.signature(fn).parameters.items() if k != "self"}


@pytest.mark.parametrize("proto, method, impl", [
    (LLMStageLike, "stream", "LLMStage"),
    (LLMStageLike, "describe", "LLMStage"),
    (DecoderStageLike, "render", "DecoderStage"),
    (DecoderStageLike, "describe", "DecoderStage"),
])
def test_pipeline_stages_take_every_argument_of_their_seam(proto, method, impl):
    from polymodal import pipeline

    real = _params(getattr(getattr(pipeline, impl), method))
    for name, p in _params(getattr(proto, method)).items():
        assert name in real, f"{impl}.{method} lacks {name!r} of {proto.__name__}"
        assert real[name].kind == p.kind, (impl, method, name)
        if p.default is not inspect.Parameter.empty:
            assert real[name].default is not inspect.Parameter.empty, (impl, method, name)
    # what the real one needs beyond the seam has a default (the services never pass it)
    extra = [k for k, p in real.items() if k not in _params(getattr(proto, method))]
    assert all(real[k].default is not inspect.Parameter.empty for k in extra), extra


def test_pipeline_stages_are_instances_of_their_seams():
    from polymodal.pipeline import build_decoder_stage, build_llm_stage

    llm = build_llm_stage("tiny")
    dec = build_decoder_stage("tiny", IMAGE, d_llm=llm.engine.d_llm)
    assert isinstance(llm, LLMStageLike) and isinstance(dec, DecoderStageLike)
    assert not isinstance(dec, LLMStageLike) and not isinstance(llm, DecoderStageLike)
    n = llm.engine.spec.count(IMAGE)
    group = SignalGroup(IMAGE, np.zeros((n, llm.engine.d_llm), np.float32), np.zeros((n, llm.engine.d_llm), np.float32),
                        0, 0)
    (item,) = dec.render([group], [1])
    assert isinstance(item, RenderedMedium)
    data, mime, ext = item.encode()
    assert mime == "image/png" and ext == "png" and data[:4] == b"\x89PNG"


def test_test_stand_ins_fit_the_seams():
    _, llm, decoders = fake_stages()
    assert isinstance(llm, LLMStageLike)
    assert all(isinstance(d, DecoderStageLike) for d in decoders.values())


def test_one_verb_per_meaning():
    from decoders import Decoder
    from polymodal.pipeline import DecoderStage, LLMStage

    assert hasattr(Decoder, "render") and not hasattr(Decoder, "generate")  # media are rendered
    assert hasattr(DecoderStage, "render") and not hasattr(DecoderStage, "generate")
    assert hasattr(LLMStage, "generate") and not hasattr(LLMStage, "render")  # the LLM generates


def test_one_interleave():
    import polymodal.pipeline
    import services.ingress.responses

    assert polymodal.pipeline.interleave is interleave
    assert services.ingress.responses.interleave is interleave
    groups = [SignalGroup(IMAGE, np.zeros((1, 1)), np.zeros((1, 1)), 1, 7),
              SignalGroup(AUDIO, np.zeros((1, 1)), np.zeros((1, 1)), 0, 3)]
    parts = interleave("One two three", groups, ["IMG", "AUD"], text_part=lambda t: {"text": t})
    assert parts == [{"text": "One"}, "AUD", {"text": "two"}, "IMG", {"text": "three"}]
    # an offset before the previous one is clamped to it; past the end, to the end
    back = [SignalGroup(IMAGE, np.zeros((1, 1)), np.zeros((1, 1)), 0, 5),
            SignalGroup(IMAGE, np.zeros((1, 1)), np.zeros((1, 1)), 1, 2)]
    assert interleave("hello world", back, ["X", "Y"]) == [TextPart("hello"), "X", "Y", TextPart("world")]
    late = [SignalGroup(IMAGE, np.zeros((1, 1)), np.zeros((1, 1)), 0, 99)]
    assert interleave("ab", late, ["X"]) == [TextPart("ab"), "X"]


def test_one_mime_map():
    import services.ingress.media_input as media_input

    assert media_io.modality_of_mime("image/png") is IMAGE
    assert media_io.modality_of_mime("Audio/X-WAV") is AUDIO
    assert media_io.modality_of_mime("video/mp4") is VIDEO
    assert media_io.modality_of_mime("text/plain") is None and media_io.modality_of_mime("application/pdf") is None
    src = inspect.getsource(media_input)
    assert "modality_of_mime" in src and 'split("/"' not in src  # the ingress asks media_io, no map of its own
    assert not hasattr(media_io, "_modality_of_mime")


def test_one_source_of_option_bounds():
    from services import schemas
    from services.settings import Limits

    def le(model, field):
        return next(m.le for m in model.model_fields[field].metadata if getattr(m, "le", None) is not None)

    # today's values (kept)
    assert (config.MAX_INFERENCE_STEPS, config.MAX_GUIDANCE_SCALE, config.MAX_SIZE_PX, config.MAX_NUM_FRAMES,
            config.MAX_FPS, config.MAX_DURATION_S, config.MAX_CRF, config.MAX_NEW_TOKENS,
            config.MAX_INPUT_VIDEO_FRAMES) == (200, 30.0, 2048, 128, 60, 30.0, 51, 4096, 8)
    same = {
        config.MAX_INFERENCE_STEPS: [(config.DecoderDefaults, "num_inference_steps"), (Limits, "max_inference_steps"),
                                     (schemas.ImageOptions, "num_inference_steps"),
                                     (schemas.ImageGenerationRequest, "num_inference_steps")],
        config.MAX_SIZE_PX: [(config.DecoderDefaults, "height_px"), (Limits, "max_height_px"),
                             (Limits, "max_width_px"), (schemas.VideoOptions, "width_px")],
        config.MAX_NUM_FRAMES: [(config.DecoderDefaults, "num_frames"), (Limits, "max_num_frames"),
                                (schemas.VideoCreateRequest, "num_frames")],
        config.MAX_FPS: [(config.DecoderDefaults, "fps"), (Limits, "max_fps"), (schemas.VideoOptions, "fps")],
        config.MAX_DURATION_S: [(config.DecoderDefaults, "duration_s"), (Limits, "max_duration_s"),
                                (schemas.AudioOptions, "duration_s"), (schemas.VideoCreateRequest, "seconds")],
        config.MAX_NEW_TOKENS: [(config.GenerationConfig, "max_new_tokens"), (Limits, "max_new_tokens"),
                                (schemas.ChatCompletionRequest, "max_tokens")],
        config.MAX_CRF: [(config.DecoderDefaults, "crf"), (schemas.VideoOptions, "crf")],
        config.MAX_INPUT_VIDEO_FRAMES: [(Limits, "max_input_video_frames")],
    }
    for bound, fields in same.items():
        for model, field in fields:
            assert le(model, field) == bound, (model.__name__, field)
    assert media_io.MediaLimits().max_video_frames_sampled == config.MAX_INPUT_VIDEO_FRAMES
    # a server may tighten a bound, never exceed it
    Limits(max_inference_steps=10)
    with pytest.raises(ValueError):
        Limits(max_inference_steps=config.MAX_INFERENCE_STEPS + 1)
