"""Decoders: stock diffusers pipelines driven by prompt_embeds (tiny random components, CPU)."""

from __future__ import annotations

import io
import json
import pickle
import shutil

import av
import numpy as np
import pytest
import soundfile as sf
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from decoders import (
    DECODERS,
    DecodeError,
    DecoderLoadError,
    Medium,
    build_decoder,
    save_tiny_checkpoint,
)
from decoders.media import video_to_uint8
from polymodal.modality import Modality
from polymodal.presets import get_preset

IMAGE, AUDIO, VIDEO = Modality.IMAGE, Modality.AUDIO, Modality.VIDEO
ALL = list(get_preset("tiny").decoders)  # the modalities tiny decodes (3D: tests/test_object3d.py)
CAPTIONS = ["a red circle", "a dog running on the beach", "calm blue sea at night", "a cat"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # The tiny models are dominated by thread overhead on a shared 2-core machine.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def configs():
    return get_preset("tiny").decoders


@pytest.fixture(scope="module")
def decoders(configs):
    return {m: build_decoder(m, configs[m], seed=0) for m in ALL}


def cfg_options(dec, **update):
    """The decoder's defaults with guidance > 1, so the negative path matters."""
    return dec.defaults.model_copy(update={"guidance_scale": 4.0, **update})


def as_float(x: np.ndarray) -> np.ndarray:
    return x.astype(np.float64)


def assert_same_medium(a: Medium, b: Medium) -> None:
    assert a.data.shape == b.data.shape
    if a.modality is AUDIO:
        np.testing.assert_allclose(a.data, b.data, atol=1e-5)
    else:  # uint8: allow one level of rounding
        assert np.abs(as_float(a.data) - as_float(b.data)).max() <= 1


def stock_items(dec, output):
    """The stock pipeline's per-item float arrays, converted independently of the decoder's code."""
    if dec.modality is IMAGE:
        return [(np.clip(x, 0, 1) * 255).round().astype(np.uint8) for x in output.images]
    if dec.modality is VIDEO:
        return [(np.clip(x, 0, 1) * 255).round().astype(np.uint8) for x in output.frames]
    return [np.asarray(x, dtype=np.float32) for x in output.audios]


def stock_call(dec, options, seed, **kwargs):
    extra = {
        IMAGE: dict(height=options.height_px, width=options.width_px),
        VIDEO: dict(height=options.height_px, width=options.width_px, num_frames=options.num_frames),
        AUDIO: dict(audio_length_in_s=options.duration_s),
    }[dec.modality]
    with torch.no_grad():
        return dec.pipeline(
            generator=[torch.Generator().manual_seed(seed)],
            num_inference_steps=options.num_inference_steps,
            guidance_scale=options.guidance_scale,
            output_type="np",
            **extra,
            **kwargs,
        )


# ------------------------------------------------------------------ registry and declared state


def test_registry_and_declared_state(decoders, configs):
    assert set(DECODERS) == set(Modality)
    with pytest.raises(ValueError, match="image"):
        build_decoder("smell", configs[IMAGE])
    for m, dec in decoders.items():
        assert dec.modality is m
        assert dec.init_state == "random"
        assert dec.cond_shape == (configs[m].cond_tokens, configs[m].cond_dim)
        assert tuple(dec.negative_prompt_embeds.shape) == dec.cond_shape
        torch.testing.assert_close(dec.negative_prompt_embeds, dec.encode_text([""])[0])
        emb = dec.encode_text(CAPTIONS[:2])
        assert tuple(emb.shape) == (2, *dec.cond_shape)
        assert not torch.allclose(emb[0], emb[1]), "different captions must embed differently"


def test_audio_text_embeds_are_l2_normalised(decoders):
    emb = decoders[AUDIO].encode_text(CAPTIONS)
    assert tuple(emb.shape) == (4, 1, decoders[AUDIO].cond_shape[1])
    torch.testing.assert_close(emb.norm(dim=-1), torch.ones(4, 1))


def test_fp32_on_cpu_whatever_the_config_says(configs):
    dec = build_decoder(IMAGE, configs[IMAGE].model_copy(update={"dtype": "float16"}))
    assert dec.pipeline.unet.dtype == torch.float32
    assert dec.pipeline.text_encoder.dtype == torch.float32


def test_same_tiny_seed_same_weights_other_seed_differs(configs, decoders):
    again = build_decoder(IMAGE, configs[IMAGE], seed=0)
    other = build_decoder(IMAGE, configs[IMAGE], seed=1)
    w0 = decoders[IMAGE].pipeline.unet.conv_in.weight
    torch.testing.assert_close(again.pipeline.unet.conv_in.weight, w0)
    assert not torch.allclose(other.pipeline.unet.conv_in.weight, w0)


# ------------------------------------------------------------------ parity with the stock pipeline


@pytest.mark.parametrize("modality", ALL, ids=lambda m: m.value)
def test_own_text_embedding_equals_stock_prompt(decoders, modality):
    dec = decoders[modality]
    options = cfg_options(dec)
    caption, seed = "a red circle", 7
    ours = dec.render(dec.encode_text([caption]), [seed], options)[0]
    assert isinstance(ours, Medium) and ours.seed == seed
    stock = stock_items(dec, stock_call(dec, options, seed, prompt=[caption]))[0]
    if modality is AUDIO:
        np.testing.assert_allclose(ours.data, stock, atol=1e-5)
        assert ours.sample_rate_hz == dec.pipeline.vocoder.config.sampling_rate
    else:
        assert ours.data.shape == stock.shape
        assert np.abs(as_float(ours.data) - as_float(stock)).max() <= 1

    # The negative embedding matters at this guidance: a zero negative gives another output.
    positive = dec.encode_text([caption])
    if modality is AUDIO:
        positive = positive[:, 0]
    zero_neg = stock_items(
        dec,
        stock_call(dec, options, seed, prompt_embeds=positive, negative_prompt_embeds=torch.zeros_like(positive)),
    )[0]
    assert np.abs(as_float(zero_neg) - as_float(stock)).max() > (1e-4 if modality is AUDIO else 2)


@pytest.mark.parametrize("modality", ALL, ids=lambda m: m.value)
def test_batch_item_equals_item_alone_and_seeds_differ(decoders, modality):
    dec = decoders[modality]
    options = cfg_options(dec)
    embeds = dec.encode_text(CAPTIONS)
    seeds = [11, 12, 13, 14]
    batch = dec.render(embeds, seeds, options)
    assert [m.seed for m in batch] == seeds
    for k in range(4):
        alone = dec.render(embeds[k : k + 1], [seeds[k]], options)[0]
        assert_same_medium(batch[k], alone)
    same_caption = dec.render(embeds[:1].repeat(2, 1, 1), [1, 2], options)
    assert np.abs(as_float(same_caption[0].data) - as_float(same_caption[1].data)).max() > 1e-3


@pytest.mark.parametrize("modality", ALL, ids=lambda m: m.value)
def test_negative_embeds_always_passed_so_no_tokenizer_is_needed(decoders, modality):
    # Without negative_prompt_embeds, diffusers tokenises "" at guidance > 1: with no tokenizer that fails.
    dec = decoders[modality]
    emb = dec.encode_text(["a cat"])
    expected = dec.render(emb, [4], cfg_options(dec))[0]
    tokenizer = dec.pipeline.tokenizer
    dec.pipeline.tokenizer = None
    try:
        got = dec.render(emb, [4], cfg_options(dec))[0]
    finally:
        dec.pipeline.tokenizer = tokenizer
    assert_same_medium(got, expected)


def test_decode_error_survives_pickling():
    err = pickle.loads(pickle.dumps(DecodeError(42, DecodeError.CANCELLED)))
    assert (err.seed, err.reason, err.cancelled) == (42, "cancelled", True)
    assert "42" in str(err)


def test_audio_accepts_b_d_and_rejects_wrong_shapes(decoders):
    dec = decoders[AUDIO]
    emb = dec.encode_text(["a dog"])
    a = dec.render(emb, [3])[0]
    b = dec.render(emb[:, 0], [3])[0]
    np.testing.assert_allclose(a.data, b.data, atol=1e-6)
    with pytest.raises(ValueError, match="shape"):
        dec.render(torch.zeros(1, 2, dec.cond_shape[1]), [0])
    with pytest.raises(ValueError, match="seed"):
        dec.render(emb, [0, 1])


def test_media_shapes_follow_options(decoders):
    img = decoders[IMAGE].render(decoders[IMAGE].encode_text(["x"]), [0], cfg_options(decoders[IMAGE], width_px=48))
    assert img[0].data.shape == (32, 48, 3) and img[0].data.dtype == np.uint8
    vid_dec = decoders[VIDEO]
    vid = vid_dec.render(vid_dec.encode_text(["x"]), [0], cfg_options(vid_dec, num_frames=3, fps=5))[0]
    assert vid.data.shape == (3, 32, 32, 3) and vid.fps == 5.0
    aud_dec = decoders[AUDIO]
    aud = aud_dec.render(aud_dec.encode_text(["x"]), [0], cfg_options(aud_dec, duration_s=0.8))[0]
    assert aud.data.dtype == np.float32 and aud.data.ndim == 1
    assert aud.data.shape[0] == int(0.8 * aud.sample_rate_hz)
    assert aud.duration_s == pytest.approx(0.8)


# ------------------------------------------------------------------ NaN / black detection


def _final_stage(dec):
    """The module whose output is the medium, and the number of its output rows per item."""
    if dec.modality is AUDIO:
        return dec.pipeline.vocoder, 1
    per_item = dec.defaults.num_frames if dec.modality is VIDEO else 1
    return dec.pipeline.vae.decoder, per_item


@pytest.mark.parametrize("modality", ALL, ids=lambda m: m.value)
def test_nan_and_black_items_are_reported_not_returned(decoders, modality):
    dec = decoders[modality]
    module, rows = _final_stage(dec)
    black = 0.0 if modality is AUDIO else -1.0  # VAE range [-1, 1] -> 0 after denormalising

    def corrupt(mod, inputs, output):
        out = output.clone()
        out[1 * rows : 2 * rows] = float("nan")
        out[2 * rows : 3 * rows] = black
        return out

    handle = module.register_forward_hook(corrupt)
    try:
        results = dec.render(dec.encode_text(CAPTIONS[:3]), [5, 6, 7])
    finally:
        handle.remove()
    assert isinstance(results[0], Medium) and results[0].seed == 5
    assert isinstance(results[1], DecodeError) and results[1].seed == 6 and "NaN" in results[1].reason
    assert isinstance(results[2], DecodeError) and results[2].seed == 7
    assert ("silent" if modality is AUDIO else "black") in results[2].reason
    assert results[1].reason.startswith("degenerate output")


# ------------------------------------------------------------------ cancellation and progress


@pytest.mark.parametrize("modality", ALL, ids=lambda m: m.value)
def test_cancellation_stops_before_all_steps(decoders, modality):
    dec = decoders[modality]
    steps: list[int] = []
    results = dec.render(
        dec.encode_text(CAPTIONS[:2]),
        [1, 2],
        cfg_options(dec, num_inference_steps=6),
        should_cancel=lambda: len(steps) >= 2,
        on_step=steps.append,
    )
    assert steps == [0, 1]
    assert all(isinstance(r, DecodeError) and r.cancelled for r in results)
    assert [r.seed for r in results] == [1, 2]


def test_on_step_reports_every_step(decoders):
    dec = decoders[IMAGE]
    steps: list[int] = []
    out = dec.render(dec.encode_text(["x"]), [0], cfg_options(dec, num_inference_steps=3), on_step=steps.append)
    assert steps == [0, 1, 2] and isinstance(out[0], Medium)


# ------------------------------------------------------------------ pretrained loading path


@pytest.fixture(scope="module")
def checkpoints(configs, tmp_path_factory):
    root = tmp_path_factory.mktemp("decoder_ckpts")
    return {m: save_tiny_checkpoint(m, configs[m], root / m.value, seed=0) for m in ALL}


def pretrained(config, path):
    return config.model_copy(update={"source": "pretrained", "path": str(path)})


@pytest.mark.parametrize("modality", ALL, ids=lambda m: m.value)
def test_saved_tiny_checkpoint_loads_via_pretrained_path(decoders, configs, checkpoints, modality):
    path = checkpoints[modality]
    index = json.loads((path / "model_index.json").read_text())
    assert index["_class_name"] == DECODERS[modality].pipeline_class.__name__
    assert list((path / "unet").glob("*.safetensors")), "weights are safetensors"
    dec = build_decoder(modality, pretrained(configs[modality], path))
    assert dec.init_state == "pretrained"
    torch.testing.assert_close(dec.negative_prompt_embeds, decoders[modality].negative_prompt_embeds)
    options = cfg_options(dec)
    emb = dec.encode_text(["a cat"])
    assert_same_medium(dec.render(emb, [9], options)[0], decoders[modality].render(emb, [9], options)[0])


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_missing_folder_refused_with_clear_message(configs, tmp_path):
    missing = tmp_path / "no_such_model"
    with pytest.raises(DecoderLoadError, match="does not exist"):
        build_decoder(IMAGE, pretrained(configs[IMAGE], missing))
    with pytest.raises(DecoderLoadError, match="needs `path`"):
        build_decoder(IMAGE, configs[IMAGE].model_copy(update={"source": "pretrained"}))
    tmp_path.joinpath("empty").mkdir()
    with pytest.raises(DecoderLoadError, match="model_index.json"):
        build_decoder(IMAGE, pretrained(configs[IMAGE], tmp_path / "empty"))


def test_missing_component_refused(configs, checkpoints, tmp_path):
    path = _copy(checkpoints[AUDIO], tmp_path / "audio")
    shutil.rmtree(path / "vocoder")
    with pytest.raises(DecoderLoadError, match="vocoder"):
        build_decoder(AUDIO, pretrained(configs[AUDIO], path))
    index = json.loads((path / "model_index.json").read_text())
    del index["vocoder"]
    (path / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(DecoderLoadError, match="'vocoder' is missing from model_index.json"):
        build_decoder(AUDIO, pretrained(configs[AUDIO], path))


def test_missing_and_unexpected_keys_refused(configs, checkpoints, tmp_path):
    path = _copy(checkpoints[IMAGE], tmp_path / "image")
    te_file = next((path / "text_encoder").glob("*.safetensors"))
    weights = load_file(te_file)
    dropped = sorted(weights)[0]
    save_file({k: v for k, v in weights.items() if k != dropped}, te_file, metadata={"format": "pt"})
    with pytest.raises(DecoderLoadError, match="missing keys") as err:
        build_decoder(IMAGE, pretrained(configs[IMAGE], path))
    assert "text_encoder" in str(err.value) and dropped in str(err.value)

    save_file(weights, te_file, metadata={"format": "pt"})  # restore, then add a stray key to the UNet
    unet_file = next((path / "unet").glob("*.safetensors"))
    unet_weights = load_file(unet_file)
    unet_weights["extra_block.weight"] = torch.zeros(3)
    save_file(unet_weights, unet_file, metadata={"format": "pt"})
    with pytest.raises(DecoderLoadError, match="unexpected keys") as err:
        build_decoder(IMAGE, pretrained(configs[IMAGE], path))
    assert "'unet'" in str(err.value) and "extra_block.weight" in str(err.value)


def test_video_decoder_loads_an_animatediff_folder(tmp_path):
    """A folder whose model_index.json names AnimateDiffPipeline (UNetMotionModel, no separate motion adapter)
    loads as the video decoder; batch item k equals item k alone; the image decoder refuses it by name."""
    from diffusers import AnimateDiffPipeline

    from polymodal.config import DecoderConfig
    from training.toyworld.train import VideoDecoderRecipe, build_video_pipeline

    recipe = VideoDecoderRecipe()
    build_video_pipeline(recipe).save_pretrained(str(tmp_path), safe_serialization=True)
    cfg = DecoderConfig(source="pretrained", path=str(tmp_path), cond_tokens=recipe.cond_tokens,
                        cond_dim=recipe.cond_dim, defaults=recipe.decoder_fields()["defaults"])
    dec = build_decoder(VIDEO, cfg)
    assert isinstance(dec.pipeline, AnimateDiffPipeline) and "AnimateDiffPipeline" in repr(dec)
    options = cfg_options(dec, num_inference_steps=2)
    emb = dec.encode_text(["a red circle moving to the left", "a blue square moving up"])
    both = dec.render(emb, [3, 4], options)
    alone = dec.render(emb[1:], [4], options)
    assert both[0].data.shape == (recipe.num_frames, recipe.size_px, recipe.size_px, 3)
    assert_same_medium(both[1], alone[0])
    assert not np.array_equal(both[0].data, both[1].data)
    with pytest.raises(DecoderLoadError, match="AnimateDiffPipeline"):
        build_decoder(IMAGE, cfg.model_copy(update={"cond_tokens": 8, "cond_dim": 32}))


def test_wrong_pipeline_or_conditioning_refused(configs, checkpoints):
    with pytest.raises(DecoderLoadError, match="TextToVideoSDPipeline"):
        build_decoder(IMAGE, pretrained(configs[IMAGE], checkpoints[VIDEO]))
    wrong = pretrained(configs[VIDEO], checkpoints[VIDEO]).model_copy(update={"cond_dim": 64})
    with pytest.raises(DecoderLoadError, match="cond_dim"):
        build_decoder(VIDEO, wrong)


# ------------------------------------------------------------------ media encoding


def test_png_round_trip(decoders):
    dec = decoders[IMAGE]
    medium = dec.render(dec.encode_text(["x"]), [0])[0]
    data, mime, ext = medium.encode()
    assert (mime, ext) == ("image/png", "png")
    back = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    np.testing.assert_array_equal(back, medium.data)


def test_wav_round_trip(decoders):
    dec = decoders[AUDIO]
    medium = dec.render(dec.encode_text(["x"]), [0])[0]
    assert float(np.abs(medium.data).max()) > 1e-3, "tiny audio is audible noise"
    data, mime, ext = medium.encode()
    assert (mime, ext) == ("audio/wav", "wav")
    back, rate = sf.read(io.BytesIO(data), dtype="float32")
    assert rate == medium.sample_rate_hz == dec.sample_rate_hz
    np.testing.assert_array_equal(back, medium.data)


def _decode_mp4(data: bytes) -> list[np.ndarray]:
    with av.open(io.BytesIO(data)) as container:
        stream = container.streams.video[0]
        assert stream.codec_context.name == "h264"
        assert stream.codec_context.pix_fmt == "yuv420p"
        return [f.to_ndarray(format="rgb24") for f in container.decode(stream)]


def test_mp4_round_trip(decoders):
    dec = decoders[VIDEO]
    medium = dec.render(dec.encode_text(["x"]), [0], cfg_options(dec, num_frames=5, fps=6))[0]
    data, mime, ext = medium.encode()
    assert (mime, ext) == ("video/mp4", "mp4")
    frames = _decode_mp4(data)
    assert len(frames) == 5 and frames[0].shape == (32, 32, 3)
    # lossy, but a flat-coloured video survives closely
    flat = Medium(VIDEO, np.full((3, 16, 16, 3), (200, 40, 90), dtype=np.uint8), seed=0, fps=8.0)
    back = _decode_mp4(flat.encode()[0])
    assert np.abs(as_float(back[1]) - as_float(flat.data[1])).max() < 8


def test_mp4_crf_trades_bytes_for_fidelity(decoders):
    """A lower ``crf`` keeps the frames closer (and the file bigger); the video decoder stamps its option."""
    rng = np.random.default_rng(1)
    frames = np.repeat(rng.integers(0, 256, (1, 16, 16, 3), dtype=np.uint8), 6, axis=0)
    frames[:, 4:8, 4:8] = (250, 20, 20)
    for t in range(6):  # a small red square moving right over a noisy background
        frames[t, 10:14, 2 + 2 * t:6 + 2 * t] = (20, 20, 250)
    errors, sizes = {}, {}
    for crf in (None, 30, 12):
        data = Medium(VIDEO, frames, seed=0, fps=8.0, crf=crf).encode()[0]
        errors[crf] = np.abs(as_float(np.stack(_decode_mp4(data))) - as_float(frames)).mean()
        sizes[crf] = len(data)
    assert errors[12] < errors[None] < errors[30], errors  # None: libx264's own default, 23
    assert sizes[12] > sizes[None] > sizes[30], sizes
    dec = decoders[VIDEO]
    assert dec.defaults.crf == 18
    medium = dec.render(dec.encode_text(["x"]), [0], cfg_options(dec, crf=30))[0]
    assert medium.crf == 30


def test_mp4_odd_size_is_padded():
    video = Medium(VIDEO, np.random.default_rng(0).integers(0, 255, (2, 15, 17, 3), dtype=np.uint8), seed=0, fps=4.0)
    frames = _decode_mp4(video.encode()[0])
    assert len(frames) == 2 and frames[0].shape == (16, 18, 3)


def test_medium_validates_its_data():
    with pytest.raises(ValueError, match="uint8"):
        Medium(IMAGE, np.zeros((4, 4, 3), dtype=np.float32), seed=0)
    with pytest.raises(ValueError, match="sample_rate_hz"):
        Medium(AUDIO, np.zeros(10, dtype=np.float32), seed=0)


# ------------------------------------------------------------------ frame normalisation


def test_video_frames_normalised_from_any_layout_and_range():
    rng = np.random.default_rng(0)
    unit = rng.random((5, 8, 10, 3), dtype=np.float32)  # (F, H, W, C) in [0, 1]; F != C (unambiguous)
    expected = (unit * 255).round().astype(np.uint8)
    cases = {
        "fhwc [0,1]": unit,
        "1fhwc": unit[None],
        "[-1,1]": unit * 2 - 1,
        "list of frames": list(unit),
        "fchw tensor": torch.from_numpy(unit).permute(0, 3, 1, 2),
        "cfhw tensor (VAE layout)": torch.from_numpy(unit).permute(3, 0, 1, 2),
        "list of PIL": [Image.fromarray(f) for f in expected],
        "uint8": expected,
    }
    for name, video in cases.items():
        got = video_to_uint8(video)
        assert got.dtype == np.uint8 and got.shape == (5, 8, 10, 3), name
        assert np.abs(as_float(got) - as_float(expected)).max() <= 1, name
