"""Encoders: tiny (seeded, content-sensitive), CLIP / CLAP from tiny saved folders, ImageBind optional."""

from __future__ import annotations

import math
import sys
import types

import numpy as np
import pytest
import soxr
import torch
from PIL import Image

from polymodal.config import EncoderConfig
from polymodal.encoders import (
    ENCODERS,
    EncoderLoadError,
    EncoderUnavailableError,
    build_encoder,
    subsample_frames,
)
from polymodal.media.audio import decode_audio
from polymodal.media.video import decode_video
from polymodal.modality import Modality
from tests.media_fixtures import PHOTO_NAMES, index_frames, photo, photo_mp4, speech_samples, speech_wav

IMAGE, AUDIO, VIDEO = Modality.IMAGE, Modality.AUDIO, Modality.VIDEO
D = 24


def _tone(freq_hz: float, duration_s: float = 1.5, rate: int = 16000) -> np.ndarray:
    return (0.3 * np.sin(2 * np.pi * freq_hz * np.arange(int(duration_s * rate)) / rate)).astype(np.float32)


def _min_pairwise_distance(e: torch.Tensor) -> float:
    d = torch.cdist(e, e)
    return float(d[~torch.eye(len(e), dtype=torch.bool)].min())


@pytest.fixture(scope="module")
def tiny():
    return {m: build_encoder(m, EncoderConfig(kind="tiny", dim=D), seed=3) for m in (IMAGE, AUDIO, VIDEO)}


@pytest.fixture(scope="module")
def photos():
    return [photo(n) for n in PHOTO_NAMES]


# ------------------------------------------------------------------------------------------------------------ tiny
def test_tiny_shapes_and_state(tiny, photos):
    emb = tiny[IMAGE].encode(photos)
    assert emb.shape == (4, D) and emb.dtype == torch.float32 and not emb.requires_grad
    assert tiny[IMAGE].init_state == "random" and tiny[IMAGE].dim == D
    assert tiny[AUDIO].encode([_tone(440), _tone(880, 0.2)]).shape == (2, D)
    assert tiny[VIDEO].encode([index_frames(5), index_frames(3)]).shape == (2, D)
    assert tiny[IMAGE].encode([]).shape == (0, D)
    assert tiny[IMAGE].describe()["parameters"] > 0


def test_tiny_is_deterministic_per_seed(tiny, photos):
    again = build_encoder(IMAGE, EncoderConfig(kind="tiny", dim=D), seed=3)
    other = build_encoder(IMAGE, EncoderConfig(kind="tiny", dim=D), seed=4)
    torch.testing.assert_close(again.encode(photos), tiny[IMAGE].encode(photos), rtol=0, atol=0)
    assert not torch.allclose(other.encode(photos), tiny[IMAGE].encode(photos), atol=1e-3)
    # the global RNG is left alone
    torch.manual_seed(0)
    a = torch.rand(3)
    torch.manual_seed(0)
    build_encoder(AUDIO, EncoderConfig(kind="tiny", dim=D), seed=9)
    assert torch.equal(torch.rand(3), a)


def test_tiny_image_is_content_sensitive_and_batch_independent(tiny, photos):
    emb = tiny[IMAGE].encode(photos)
    scale = float(emb.norm(dim=1).mean())
    assert _min_pairwise_distance(emb) > 0.2 * scale  # four different photos, four different embeddings
    torch.testing.assert_close(tiny[IMAGE].encode([photos[2]])[0], emb[2], rtol=1e-5, atol=1e-5)
    flipped = tiny[IMAGE].encode([photos[0][:, ::-1].copy()])[0]
    assert float((flipped - emb[0]).norm()) > 0.05 * scale


def test_tiny_audio_is_content_sensitive_and_honours_the_sample_rate(tiny):
    speech, rate = speech_samples()
    other, _ = speech_samples("Seven green bottles standing on the wall.")
    enc = tiny[AUDIO]
    emb = enc.encode([speech, other, _tone(440, rate=rate), _tone(3000, rate=rate)], sample_rate_hz=rate)
    assert _min_pairwise_distance(emb) > 0.1 * float(emb.norm(dim=1).mean())
    at_16k = enc.encode([soxr.resample(speech, rate, 16000)])[0]  # sample_rate_hz None: already 16 kHz
    torch.testing.assert_close(emb[0], at_16k, rtol=1e-4, atol=1e-4)
    misread = enc.encode([speech], sample_rate_hz=16000)[0]  # the same samples taken as 16 kHz
    assert float((misread - emb[0]).norm()) > 10 * float((at_16k - emb[0]).norm())


def test_tiny_video_averages_image_embeddings_of_frames(tiny, photos):
    img = tiny[IMAGE]
    a, b = photos[0][:64], photos[1][:64]  # frames of one size
    video = np.stack([a, b, b, a])
    torch.testing.assert_close(tiny[VIDEO].encode([video])[0], img.encode([a, b]).mean(0), rtol=1e-5, atol=1e-5)
    # more frames than max_frames (8): centre-of-segment subsampling, stride F / 8
    frames = index_frames(40)
    keep = subsample_frames(40, 8)
    assert keep == [math.floor((i + 0.5) * 5) for i in range(8)] == [2, 7, 12, 17, 22, 27, 32, 37]
    want = img.encode([frames[k] for k in keep]).mean(0)
    torch.testing.assert_close(tiny[VIDEO].encode([frames])[0], want, rtol=1e-5, atol=1e-5)


def test_real_inputs_decode_then_encode(tiny):
    frames, _ = decode_video(photo_mp4(), num_frames=8)
    speech = decode_audio(speech_wav(), target_sample_rate_hz=16000)
    v = tiny[VIDEO].encode([frames])
    s = tiny[AUDIO].encode([speech], sample_rate_hz=16000)
    assert v.shape == s.shape == (1, D) and torch.isfinite(v).all() and torch.isfinite(s).all()


def test_bad_items_raise_value_error_naming_the_item(tiny, photos):
    with pytest.raises(ValueError, match="item 1"):
        tiny[IMAGE].encode([photos[0], np.zeros((8, 8), np.uint8)])
    with pytest.raises(ValueError, match="item 0"):
        tiny[AUDIO].encode([np.zeros((100, 2), np.float32)])
    with pytest.raises(ValueError, match=r"\(F, H, W, 3\)"):
        tiny[VIDEO].encode([photos[0]])
    with pytest.raises(ValueError, match="uint8"):
        tiny[IMAGE].encode([photos[0].astype(np.int32)])
    with pytest.raises(TypeError):
        tiny[IMAGE].encode(photos[0])


def test_registry_errors():
    with pytest.raises(ValueError) as info:
        build_encoder(IMAGE, EncoderConfig(kind="resnet"))
    assert all(k in str(info.value) for k in ENCODERS)
    with pytest.raises(ValueError, match="does not encode image"):
        build_encoder(IMAGE, EncoderConfig(kind="clap", path="x"))
    with pytest.raises(ValueError, match="does not encode audio"):
        build_encoder(AUDIO, EncoderConfig(kind="clip", path="x"))
    with pytest.raises(ValueError, match="needs EncoderConfig.path"):
        build_encoder(IMAGE, EncoderConfig(kind="clip", dim=16))
    with pytest.raises(ValueError, match="unknown options"):
        build_encoder(IMAGE, EncoderConfig(kind="tiny", options={"colour": 1}))


# ------------------------------------------------------------------------------------------------------------ CLIP
@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    from transformers import CLIPConfig, CLIPImageProcessorPil, CLIPModel

    torch.manual_seed(0)
    vision = dict(hidden_size=32, intermediate_size=64, projection_dim=16, num_hidden_layers=1, num_attention_heads=2,
                  image_size=32, patch_size=8)
    text = dict(hidden_size=32, intermediate_size=64, projection_dim=16, num_hidden_layers=1, num_attention_heads=2,
                vocab_size=100, max_position_embeddings=16)
    model = CLIPModel(CLIPConfig(vision_config=vision, text_config=text, projection_dim=16)).eval()
    path = tmp_path_factory.mktemp("clip")
    model.save_pretrained(path)
    CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(path)
    return path, model


def test_clip_from_saved_two_tower_folder_matches_the_saved_model(clip_dir, photos):
    from transformers import CLIPImageProcessorPil

    path, model = clip_dir
    enc = build_encoder(IMAGE, EncoderConfig(kind="clip", path=str(path), dim=16))
    assert enc.init_state == "pretrained" and enc.dim == 16
    emb = enc.encode(photos)
    assert emb.shape == (4, 16)
    pixels = CLIPImageProcessorPil.from_pretrained(path)(images=photos, return_tensors="pt")["pixel_values"]
    assert pixels.shape == (4, 3, 32, 32)
    with torch.no_grad():
        want = model.visual_projection(model.vision_model(pixel_values=pixels).pooler_output)
    torch.testing.assert_close(emb, want, rtol=1e-4, atol=1e-5)
    assert _min_pairwise_distance(emb) > 0.05 * float(emb.norm(dim=1).mean())

    video = build_encoder(VIDEO, EncoderConfig(kind="clip", path=str(path), dim=16))
    a, b = photos[0][:64], photos[3][:64]
    torch.testing.assert_close(video.encode([np.stack([a, b])])[0], enc.encode([a, b]).mean(0), rtol=1e-4, atol=1e-5)


def test_clip_patch_tokens_start_with_the_pooled_embedding_and_keep_position(clip_dir, photos):
    path, model = clip_dir
    pooled = build_encoder(IMAGE, EncoderConfig(kind="clip", path=str(path), dim=16))
    patches = build_encoder(IMAGE, EncoderConfig(kind="clip", path=str(path), dim=16, options={"tokens": "patches"}))
    assert (pooled.num_tokens, patches.num_tokens) == (1, 1 + (32 // 8) ** 2)
    tok = patches.encode_tokens(photos)
    assert tok.shape == (4, 17, 16) and pooled.encode_tokens(photos).shape == (4, 1, 16)
    torch.testing.assert_close(tok[:, 0], pooled.encode(photos), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(patches.encode(photos), pooled.encode(photos), rtol=1e-5, atol=1e-6)
    # a bright square in the top-left corner changes the top-left patch more than the bottom-right one
    grey = np.full((32, 32, 3), 128, np.uint8)
    marked = grey.copy()
    marked[:8, :8] = 255
    a, b = patches.encode_tokens([grey, marked])
    assert float((a[1] - b[1]).norm()) > 2 * float((a[16] - b[16]).norm())
    video = build_encoder(VIDEO, EncoderConfig(kind="clip", path=str(path), dim=16, options={"tokens": "patches"}))
    torch.testing.assert_close(video.encode_tokens([np.stack([grey, marked])])[0], (a + b) / 2, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="choose from: pooled, patches"):
        build_encoder(IMAGE, EncoderConfig(kind="clip", path=str(path), dim=16, options={"tokens": "grid"}))
    # patch_pool 2: each token the mean of a 2 x 2 window of patches, windows in row-major order
    pooled2 = build_encoder(IMAGE, EncoderConfig(kind="clip", path=str(path), dim=16,
                                                 options={"tokens": "patches", "patch_pool": 2}))
    assert pooled2.num_tokens == 1 + 2 * 2
    got = pooled2.encode_tokens([marked])[0]
    torch.testing.assert_close(got[0], b[0])
    torch.testing.assert_close(got[1], b[[1, 2, 5, 6]].mean(0), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got[4], b[[11, 12, 15, 16]].mean(0), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="must divide the 4 x 4 patch grid"):
        build_encoder(IMAGE, EncoderConfig(kind="clip", path=str(path), dim=16,
                                           options={"tokens": "patches", "patch_pool": 3}))


def test_clip_load_is_strict(clip_dir, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    path, _ = clip_dir
    with pytest.raises(ValueError, match="projection_dim"):
        build_encoder(IMAGE, EncoderConfig(kind="clip", path=str(path), dim=32))
    # a checkpoint missing the projection weights refuses to load (no silent random init)
    broken = tmp_path / "broken"
    shutil.copytree(path, broken)
    weights = load_file(broken / "model.safetensors")
    del weights["visual_projection.weight"]
    save_file(weights, broken / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(EncoderLoadError, match="visual_projection"):
        build_encoder(IMAGE, EncoderConfig(kind="clip", path=str(broken), dim=16))
    # no preprocessor config
    bare = tmp_path / "bare"
    shutil.copytree(path, bare)
    (bare / "preprocessor_config.json").unlink()
    with pytest.raises(EncoderLoadError, match="preprocessor"):
        build_encoder(IMAGE, EncoderConfig(kind="clip", path=str(bare), dim=16))
    with pytest.raises(EncoderLoadError, match="cannot load"):
        build_encoder(IMAGE, EncoderConfig(kind="clip", path=str(tmp_path / "nowhere"), dim=16))


# ------------------------------------------------------------------------------------------------------------ CLAP
def _save_clap(path, fused: bool):
    from transformers import ClapConfig, ClapFeatureExtractor, ClapModel

    torch.manual_seed(1)
    mel_bins = 64 if fused else 16  # the extractor's fusion path is written for 64 mel bins
    audio = dict(window_size=4, num_mel_bins=mel_bins, spec_size=4 * mel_bins, patch_size=4 if not fused else 16,
                 patch_stride=(4, 4) if not fused else (16, 16), hidden_size=32, projection_dim=16, depths=[1, 1],
                 num_attention_heads=[2, 2], patch_embeds_hidden_size=16, num_hidden_layers=2,
                 enable_fusion=fused, fusion_type="aff_2d" if fused else None)
    text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, vocab_size=100,
                max_position_embeddings=40, projection_dim=16)
    model = ClapModel(ClapConfig(audio_config=audio, text_config=text, projection_dim=16)).eval()
    model.save_pretrained(path)
    extractor = ClapFeatureExtractor(
        feature_size=mel_bins, sampling_rate=16000, hop_length=160, max_length_s=2, fft_window_size=400,
        frequency_min=50, frequency_max=8000, truncation="fusion" if fused else "rand_trunc",
    )
    extractor.save_pretrained(path)
    return model, extractor


@pytest.fixture(scope="module")
def clap_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("clap")
    model, extractor = _save_clap(path, fused=False)
    return path, model, extractor


def test_clap_from_saved_folder_matches_the_saved_model(clap_dir):
    path, model, extractor = clap_dir
    enc = build_encoder(AUDIO, EncoderConfig(kind="clap", path=str(path), dim=16))
    assert enc.sample_rate_hz == 16000 and enc.init_state == "pretrained"
    tone = _tone(440, 1.0)
    emb = enc.encode([tone, _tone(1500, 1.0)])
    assert emb.shape == (2, 16)
    feats = extractor(tone, sampling_rate=16000, return_tensors="pt")  # <= max length: no random crop
    with torch.no_grad():
        out = model.audio_model(input_features=feats["input_features"], is_longer=feats["is_longer"])
        want = model.audio_projection(out.pooler_output)
    torch.testing.assert_close(emb[0], want[0], rtol=1e-4, atol=1e-5)
    assert float((emb[0] - emb[1]).norm()) > 1e-3


def test_clap_real_speech_is_resampled_deterministic_and_batch_independent(clap_dir):
    path, _, _ = clap_dir
    enc = build_encoder(AUDIO, EncoderConfig(kind="clap", path=str(path), dim=16), seed=5)
    speech, rate = speech_samples()  # ~4 s at 22.05 kHz: longer than the extractor's 2 s, so it is cropped
    a = enc.encode([speech], sample_rate_hz=rate)
    b = enc.encode([_tone(440, 1.0), speech], sample_rate_hz=rate)
    torch.testing.assert_close(a[0], b[1], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(enc.encode([soxr.resample(speech, rate, 16000)])[0], a[0], rtol=1e-3, atol=1e-4)
    np.random.seed(0)
    x = np.random.rand()
    np.random.seed(0)
    enc.encode([speech], sample_rate_hz=rate)
    assert np.random.rand() == x  # numpy's global generator is left as it was


def test_clap_fused_checkpoint(tmp_path):
    _save_clap(tmp_path, fused=True)
    enc = build_encoder(AUDIO, EncoderConfig(kind="clap", path=str(tmp_path), dim=16))
    speech, rate = speech_samples()
    emb = enc.encode([speech, _tone(440, 1.0)], sample_rate_hz=rate)
    assert emb.shape == (2, 16) and torch.isfinite(emb).all()
    torch.testing.assert_close(enc.encode([speech], sample_rate_hz=rate)[0], emb[0], rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------------------- ImageBind
def test_imagebind_absent_gives_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "imagebind", None)  # import imagebind -> ImportError, installed or not
    with pytest.raises(EncoderUnavailableError) as info:
        build_encoder(IMAGE, EncoderConfig(kind="imagebind", dim=1024))
    assert "pip install polymodal[imagebind]" in str(info.value)


def test_imagebind_glue_with_a_stand_in_package(monkeypatch, tmp_path, photos):
    """The adapter's own work (preprocessing, strict checkpoint load, video averaging) against ImageBind's API."""
    seen = []

    class StandIn(torch.nn.Module):  # ImageBindModel's interface: dict of modality -> tensor in and out
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(3, 1024)

        def forward(self, inputs):
            (key, x), = inputs.items()
            seen.append((key, tuple(x.shape), x.detach().clone()))
            return {key: torch.nn.functional.normalize(self.proj(x.mean(dim=(2, 3))), dim=-1)}

    torch.manual_seed(0)
    reference = StandIn()
    torch.save(reference.state_dict(), tmp_path / "imagebind_huge.pth")
    model_mod = types.ModuleType("imagebind.models.imagebind_model")
    model_mod.imagebind_huge = lambda pretrained=False: StandIn()
    model_mod.ModalityType = types.SimpleNamespace(VISION="vision", AUDIO="audio")
    pkg, models = types.ModuleType("imagebind"), types.ModuleType("imagebind.models")
    models.imagebind_model = model_mod
    for name, mod in (("imagebind", pkg), ("imagebind.models", models), ("imagebind.models.imagebind_model", model_mod)):
        monkeypatch.setitem(sys.modules, name, mod)

    with pytest.raises(ValueError, match="1024"):
        build_encoder(IMAGE, EncoderConfig(kind="imagebind", dim=512, path=str(tmp_path / "imagebind_huge.pth")))
    enc = build_encoder(IMAGE, EncoderConfig(kind="imagebind", dim=1024, path=str(tmp_path / "imagebind_huge.pth")))
    white = np.full((300, 400, 3), 255, np.uint8)
    cat = np.asarray(Image.fromarray(photos[1]).resize((400, 300)))
    emb = enc.encode([white, cat])
    assert emb.shape == (2, 1024)
    key, shape, pixels = seen[-1]
    assert key == "vision" and shape == (2, 3, 224, 224)
    clip_mean, clip_std = np.array([0.48145466, 0.4578275, 0.40821073]), np.array([0.26862954, 0.26130258, 0.27577711])
    np.testing.assert_allclose(pixels[0, :, 100, 100].numpy(), (1 - clip_mean) / clip_std, rtol=1e-5)
    with torch.no_grad():
        want = torch.nn.functional.normalize(reference.proj(pixels.mean(dim=(2, 3))), dim=-1)
    torch.testing.assert_close(emb, want)  # the checkpoint's weights, not a fresh random init
    video = build_encoder(VIDEO, EncoderConfig(kind="imagebind", dim=1024, path=str(tmp_path / "imagebind_huge.pth")))
    torch.testing.assert_close(video.encode([np.stack([white, cat])])[0], emb.mean(0), rtol=1e-5, atol=1e-6)
    torch.save({"other.weight": torch.zeros(1)}, tmp_path / "wrong.pth")
    with pytest.raises(EncoderLoadError):
        build_encoder(IMAGE, EncoderConfig(kind="imagebind", dim=1024, path=str(tmp_path / "wrong.pth")))
