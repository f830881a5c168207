"""Input media decoding on real inputs: photos (scikit-image), speech (espeak-ng), MP4/WebM made from photos."""

from __future__ import annotations

import base64
import io
import math

import numpy as np
import pytest
import soxr
from PIL import Image

from polymodal.media.audio import decode_audio
from polymodal.media.image import decode_image
from polymodal.media.video import decode_sound_track, decode_video
from polymodal.media_io import (
    MediaError,
    MediaLimits,
    decode_media,
    encode_data_url,
    parse_data_url,
    sniff_modality,
)
from polymodal.modality import Modality
from polymodal.types import MediaPart
from tests.media_fixtures import (
    PHOTO_NAMES,
    audio_bytes,
    encode_video,
    frame_index,
    image_bytes,
    index_frames,
    photo,
    photo_frames,
    photo_jpeg,
    photo_mp4,
    photo_png,
    speech_samples,
    speech_wav,
)


def _media_error(fn, *args, code: str, medium: str, **kwargs) -> MediaError:
    with pytest.raises(MediaError) as info:
        fn(*args, **kwargs)
    err = info.value
    assert err.code == code, str(err)
    assert err.modality == Modality(medium)
    assert str(err).startswith(f"{medium}:"), str(err)
    assert err.http_status == (413 if code == "too_large" else 400)
    return err


# ------------------------------------------------------------------------------------------------------------ image
@pytest.mark.parametrize("name", PHOTO_NAMES)
def test_real_photo_png_round_trips_exactly(name):
    src = photo(name)
    out = decode_image(photo_png(name))
    assert out.dtype == np.uint8 and out.shape == src.shape
    np.testing.assert_array_equal(out, src)


def test_real_photo_jpeg_decodes_close_to_source():
    src = photo("chelsea")
    out = decode_image(photo_jpeg("chelsea"))
    assert out.shape == src.shape
    assert np.abs(out.astype(int) - src).mean() < 6


def _gray(src: np.ndarray) -> np.ndarray:
    return np.asarray(Image.fromarray(src).convert("L")).astype(int)


@pytest.mark.parametrize(
    "mode,fmt,check",
    [
        ("L", "PNG", "gray"),
        ("1", "PNG", "binary"),
        ("P", "PNG", "palette"),
        ("RGBA", "PNG", "exact"),
        ("LA", "PNG", "gray"),
        ("CMYK", "JPEG", "close"),
        ("L", "JPEG", "gray"),
        ("RGB", "WEBP", "close"),
        ("P", "GIF", "palette"),
        ("RGB", "BMP", "exact"),
        ("RGB", "TIFF", "exact"),
    ],
)
def test_any_mode_becomes_rgb(mode, fmt, check):
    src = photo("coffee")
    out = decode_image(image_bytes(src, fmt, mode=mode))
    assert out.dtype == np.uint8 and out.shape == src.shape
    if check == "exact":
        np.testing.assert_array_equal(out, src)
    elif check == "close":
        assert np.abs(out.astype(int) - src).mean() < 8
    elif check == "palette":  # the colours of the palette, not the indices
        np.testing.assert_array_equal(out, np.asarray(Image.fromarray(src).convert("P").convert("RGB")))
    elif check == "gray":
        np.testing.assert_array_equal(out[..., 0], out[..., 2])
        assert np.abs(out[..., 0].astype(int) - _gray(src)).mean() < 4
    else:  # binary: only black and white, and the dark photo areas stay dark
        assert set(np.unique(out)) <= {0, 255}
        dark = _gray(src) < 60
        assert (out[..., 0][dark] == 0).mean() > 0.8


def test_transparency_is_composited_on_white():
    src = photo("rocket")
    rgba = np.dstack([src, np.full(src.shape[:2], 255, np.uint8)])
    rgba[:, : src.shape[1] // 2, 3] = 0  # left half fully transparent
    out = decode_image(image_bytes(rgba, "PNG"))
    assert (out[:, : src.shape[1] // 2] == 255).all()
    np.testing.assert_array_equal(out[:, src.shape[1] // 2 :], src[:, src.shape[1] // 2 :])


def test_16_bit_png_keeps_its_top_8_bits():
    gray8 = _gray(photo("astronaut")).astype(np.uint16)
    img = Image.fromarray(gray8 * 257)  # uint16 -> mode I;16
    assert img.mode.startswith("I;16")
    buf = io.BytesIO()
    img.save(buf, "PNG")
    out = decode_image(buf.getvalue())
    np.testing.assert_array_equal(out[..., 1], gray8)


@pytest.mark.parametrize("orientation,expected", [(6, lambda a: np.rot90(a, -1)), (8, lambda a: np.rot90(a, 1)),
                                                   (3, lambda a: a[::-1, ::-1])])
def test_exif_orientation_is_applied(orientation, expected):
    src = photo("chelsea")  # 96 x 72: not square, so a rotation shows in the shape
    img = Image.fromarray(src)
    exif = Image.Exif()
    exif[0x0112] = orientation
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=95, exif=exif.tobytes())
    out = decode_image(buf.getvalue())
    want = expected(src)
    assert out.shape == want.shape
    assert np.abs(out.astype(int) - want).mean() < 5
    assert np.abs(out.astype(int) - want).mean() < np.abs(np.rot90(out, 2).astype(int) - want).mean()


@pytest.mark.parametrize("make", [
    lambda: b"this is not an image at all",
    lambda: photo_png("astronaut")[: len(photo_png("astronaut")) // 2],
    lambda: photo_jpeg("chelsea")[: len(photo_jpeg("chelsea")) // 2],
    lambda: photo_png("astronaut")[:20],
    lambda: b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4,
])
def test_corrupt_or_truncated_image_names_the_medium(make):
    _media_error(decode_image, make(), code="corrupt", medium="image")


def test_other_medium_given_as_image_is_unsupported():
    err = _media_error(decode_image, photo_mp4(), code="unsupported", medium="image")
    assert "video" in str(err)


def test_image_limits():
    _media_error(decode_image, photo_png(), MediaLimits(max_bytes=1000), code="too_large", medium="image")
    _media_error(decode_image, photo_png(), MediaLimits(max_pixels=95 * 96), code="too_large", medium="image")
    # A decompression bomb: 25 Mpx of one grey level compresses to a few tens of kB; rejected from the header.
    buf = io.BytesIO()
    Image.new("L", (5000, 5000), 7).save(buf, "PNG")
    assert len(buf.getvalue()) < 200_000
    err = _media_error(decode_image, buf.getvalue(), code="too_large", medium="image")
    assert "5000x5000" in str(err)


# ------------------------------------------------------------------------------------------------------------ audio
def _corr(a: np.ndarray, b: np.ndarray) -> float:
    n = min(len(a), len(b))
    return float(np.corrcoef(a[:n], b[:n])[0, 1])


def test_real_speech_wav_decodes_at_16k():
    samples, rate = speech_samples()
    out = decode_audio(speech_wav())
    assert out.dtype == np.float32 and out.ndim == 1
    assert abs(len(out) - round(len(samples) * 16000 / rate)) <= 1
    assert 1.0 < len(out) / 16000 < 15.0
    assert float(np.sqrt(np.mean(out**2))) > 0.01  # speech, not silence
    assert _corr(out, soxr.resample(samples, rate, 16000)) > 0.999


def test_stereo_44k_is_mixed_down_and_resampled():
    speech, rate = speech_samples()
    left = soxr.resample(speech, rate, 44100).astype(np.float32)
    tone = 0.3 * np.sin(2 * np.pi * 440 * np.arange(len(left)) / 44100).astype(np.float32)
    data = audio_bytes(np.stack([left, tone], axis=1), 44100, "WAV", "FLOAT")
    out = decode_audio(data, target_sample_rate_hz=16000)
    assert abs(len(out) - round(len(left) * 16000 / 44100)) <= 1
    want = soxr.resample((left + tone) / 2, 44100, 16000)
    assert _corr(out, want) > 0.999
    assert _corr(out, soxr.resample(left, 44100, 16000)) < 0.99  # not just the left channel


@pytest.mark.parametrize("fmt,subtype,min_corr", [("FLAC", "PCM_16", 0.999), ("OGG", "VORBIS", 0.9),
                                                  ("OGG", "OPUS", 0.8), ("WAV", "PCM_U8", 0.98)])
def test_flac_ogg_decode(fmt, subtype, min_corr):
    speech, rate = speech_samples()
    if subtype == "OPUS":
        speech, rate = soxr.resample(speech, rate, 48000).astype(np.float32), 48000
    out = decode_audio(audio_bytes(speech, rate, fmt, subtype), target_sample_rate_hz=16000)
    assert abs(len(out) - round(len(speech) * 16000 / rate)) <= 1
    want = soxr.resample(speech, rate, 16000)
    # lossy codecs may shift by a few samples: best correlation over small lags
    best = max(_corr(out[lag:], want) for lag in range(0, 40, 2))
    assert best > min_corr


def test_audio_to_48k_for_clap():
    out = decode_audio(speech_wav(), target_sample_rate_hz=48000)
    speech, rate = speech_samples()
    assert abs(len(out) - round(len(speech) * 48000 / rate)) <= 1


@pytest.mark.parametrize("fmt,subtype", [("WAV", "PCM_16"), ("FLAC", "PCM_16"), ("OGG", "VORBIS")])
@pytest.mark.parametrize("cut", [0.5, 0.9, 40])
def test_truncated_audio_is_corrupt(fmt, subtype, cut):
    speech, rate = speech_samples()
    data = audio_bytes(speech, rate, fmt, subtype)
    n = int(len(data) * cut) if cut < 1 else cut
    _media_error(decode_audio, data[:n], code="corrupt", medium="audio")


def test_garbage_and_empty_audio_are_corrupt():
    _media_error(decode_audio, b"RIFF\x00\x00\x00\x00garbage" * 10, code="corrupt", medium="audio")
    _media_error(decode_audio, b"", code="corrupt", medium="audio")
    _media_error(decode_audio, audio_bytes(np.zeros(0, np.float32), 16000), code="corrupt", medium="audio")


def test_image_given_as_audio_is_unsupported():
    err = _media_error(decode_audio, photo_png(), code="unsupported", medium="audio")
    assert "image" in str(err)


def test_audio_limits():
    data = speech_wav()
    _media_error(decode_audio, data, limits=MediaLimits(max_bytes=1000), code="too_large", medium="audio")
    err = _media_error(decode_audio, data, limits=MediaLimits(max_audio_duration_s=1.0), code="too_large",
                       medium="audio")
    assert "duration" in str(err)
    many = audio_bytes(np.zeros((1600, 12), np.float32), 16000, "WAV")
    _media_error(decode_audio, many, code="too_large", medium="audio")


# ------------------------------------------------------------------------------------------------------------ video
def test_real_photo_mp4_samples_frames_of_the_slideshow():
    src = photo_frames()  # 16 frames (4 photos x 4), 64x48
    frames, fps = decode_video(photo_mp4(fps=8), num_frames=8)
    assert frames.dtype == np.uint8 and frames.shape == (8, 48, 64, 3)
    assert fps == pytest.approx(8.0)
    for i, frame in enumerate(frames):
        want = math.floor((i + 0.5) * 16 / 8)
        errors = [np.abs(frame.astype(int) - s).mean() for s in src]
        assert int(np.argmin(errors)) == want, (i, errors)


@pytest.mark.parametrize(
    "n,f,codec,fmt,gop",
    [(40, 8, "libx264", "mp4", 12), (10, 4, "libvpx-vp9", "webm", None), (5, 8, "mpeg4", "mp4", None),
     (37, 7, "libx264", "mp4", 5), (16, 1, "libx264", "mp4", None)],
)
def test_video_sampling_is_evenly_spaced(n, f, codec, fmt, gop):
    data = encode_video(index_frames(n), fps=10, codec=codec, fmt=fmt, gop=gop)
    frames, fps = decode_video(data, num_frames=f)
    assert frames.shape == (f, 32, 32, 3)
    assert fps == pytest.approx(10.0)
    assert [frame_index(x) for x in frames] == [math.floor((i + 0.5) * n / f) for i in range(f)]


class _CountingContainer:
    """Proxy of a PyAV input container that counts decoded frames."""

    def __init__(self, inner, counter):
        self._inner, self._counter = inner, counter

    def __getattr__(self, name):
        return getattr(self._inner, name)

    def __enter__(self):
        self._inner.__enter__()
        return self

    def __exit__(self, *exc):
        return self._inner.__exit__(*exc)

    def decode(self, *args, **kwargs):
        for frame in self._inner.decode(*args, **kwargs):
            self._counter.append(frame.pts)
            yield frame


def test_long_video_is_sampled_by_seeking_not_decoded_whole(monkeypatch):
    import av

    n, gop = 400, 20
    data = encode_video(index_frames(40, 16, 16)[np.arange(n) % 40], fps=25, gop=gop)
    decoded: list = []
    real_open = av.open
    monkeypatch.setattr(av, "open", lambda *a, **k: _CountingContainer(real_open(*a, **k), decoded))
    frames, _ = decode_video(data, num_frames=8)
    want = [math.floor((i + 0.5) * n / 8) for i in range(8)]
    assert [frame_index(x) for x in frames] == [w % 40 for w in want]
    assert 8 <= len(decoded) <= 8 * (gop + 4) < n


@pytest.mark.parametrize("matrix,white_rows", [((0, 0x10000, 0, -0x10000, 0, 0, 0, 0, 0x40000000), slice(0, 8)),
                                               ((0, -0x10000, 0, 0x10000, 0, 0, 0, 0, 0x40000000), slice(24, 32))])
def test_display_matrix_rotation_is_applied(matrix, white_rows):
    import struct

    frame = np.zeros((16, 32, 3), np.uint8)
    frame[:, :8] = 255  # white left quarter
    data = bytearray(encode_video([frame] * 3, fps=10))
    m = data.find(b"tkhd") + 44  # the track header's display matrix (what phones write for portrait video)
    data[m : m + 36] = struct.pack(">9i", *matrix)
    frames, _ = decode_video(bytes(data), num_frames=1)
    assert frames.shape == (1, 32, 16, 3)
    rows = frames[0, :, :, 0].mean(axis=1)
    assert (rows[white_rows] > 200).all() and (np.delete(rows, np.r_[white_rows]) < 50).all()


def test_video_size_px_scales_the_shorter_side():
    frames, _ = decode_video(photo_mp4(), num_frames=3, size_px=24)
    assert frames.shape == (3, 24, 32, 3)


def test_corrupt_and_truncated_video():
    mp4 = photo_mp4()
    webm = photo_mp4(codec="libvpx-vp9", fmt="webm")
    assert decode_video(webm, num_frames=2)[0].shape == (2, 48, 64, 3)
    for bad in (b"\x00\x00\x00\x18ftypisom" + bytes(300), mp4[: len(mp4) // 2], mp4[:100], webm[: len(webm) // 2],
                b"not a video"):
        _media_error(decode_video, bad, code="corrupt", medium="video")


def test_audio_given_as_video_is_unsupported():
    err = _media_error(decode_video, speech_wav(), code="unsupported", medium="video")
    assert "audio" in str(err)


def test_video_limits():
    data = photo_mp4()  # 2 s, 64x48
    _media_error(decode_video, data, limits=MediaLimits(max_bytes=500), code="too_large", medium="video")
    _media_error(decode_video, data, limits=MediaLimits(max_video_duration_s=1.5), code="too_large", medium="video")
    _media_error(decode_video, data, limits=MediaLimits(max_video_frame_pixels=64 * 47), code="too_large",
                 medium="video")
    with pytest.raises(ValueError) as info:
        decode_video(data, num_frames=9)
    assert not isinstance(info.value, MediaError) and "num_frames" in str(info.value)


# ----------------------------------------------------------------------------------------------- data URLs, sniff
def test_data_url_round_trip_and_decode_media():
    png = photo_png("rocket")
    url = encode_data_url(png, "image/png")
    assert url.startswith("data:image/png;base64,")
    mime, data = parse_data_url(url)
    assert (mime, data) == ("image/png", png)
    part = decode_media("image", data, name="rocket.png")
    assert isinstance(part, MediaPart) and part.modality is Modality.IMAGE and part.name == "rocket.png"
    np.testing.assert_array_equal(part.data, photo("rocket"))
    assert parse_data_url("data:audio/wav;rate=16000;base64," + base64.b64encode(b"abc").decode())[1] == b"abc"


@pytest.mark.parametrize(
    "url,code,modality",
    [
        ("https://example.com/cat.png", "unsupported", None),
        ("data:image/png,rawtext", "unsupported", Modality.IMAGE),
        ("data:image/png;base64,abc$def", "corrupt", Modality.IMAGE),
        ("data:image/png;base64,abc", "corrupt", Modality.IMAGE),  # bad padding
        ("data:image/png;base64,YWJj ZA==", "corrupt", Modality.IMAGE),
        ("data:;base64,YWJj", "corrupt", None),
        ("data:video/mp4;base64", "corrupt", Modality.VIDEO),
        ("data:audio/wav;base64," + "A" * 2000, "too_large", Modality.AUDIO),
    ],
)
def test_malformed_data_urls(url, code, modality):
    with pytest.raises(MediaError) as info:
        parse_data_url(url, limits=MediaLimits(max_bytes=1000))
    assert info.value.code == code and info.value.modality == modality


def test_encode_data_url_rejects_bad_mime():
    with pytest.raises(ValueError):
        encode_data_url(b"x", "png")


def test_sniff_modality_of_real_files():
    assert sniff_modality(photo_png()) is Modality.IMAGE
    assert sniff_modality(photo_jpeg()) is Modality.IMAGE
    assert sniff_modality(speech_wav()) is Modality.AUDIO
    speech, rate = speech_samples()
    assert sniff_modality(audio_bytes(speech, rate, "FLAC")) is Modality.AUDIO
    assert sniff_modality(audio_bytes(speech, rate, "OGG", "VORBIS")) is Modality.AUDIO
    assert sniff_modality(photo_mp4()) is Modality.VIDEO
    assert sniff_modality(photo_mp4(codec="libvpx-vp9", fmt="webm")) is Modality.VIDEO
    assert sniff_modality(b"hello world") is None


def test_decode_media_audio_and_video_parts():
    audio = decode_media(Modality.AUDIO, speech_wav(), sample_rate_hz=16000)
    assert audio.sample_rate_hz == 16000 and audio.data.ndim == 1
    video = decode_media("video", photo_mp4(), num_frames=4, size_px=32)
    assert video.data.shape == (4, 32, 43, 3) and video.fps == pytest.approx(8.0)


def _tone(freq_hz: float, duration_s: float, rate: int) -> np.ndarray:
    t = np.arange(int(duration_s * rate)) / rate
    return (0.5 * np.sin(2 * np.pi * freq_hz * t)).astype(np.float32)


def test_a_videos_sound_track_is_decoded_to_16k_mono_when_asked():
    """An MP4 with a 440 Hz AAC sound track at 22.05 kHz (2 s, as the frames): asked for, the part carries it as an
    audio part, mono float32 at 16 kHz, the tone's pitch kept; not asked for, or no audio stream: ``None``."""
    frames = photo_frames()  # 16 frames: 2 s at 8 fps
    data = encode_video(frames, 8, sound=(_tone(440.0, 2.0, 22050), 22050))
    video = decode_media("video", data, num_frames=4, sound_track=True)
    track = video.sound_track
    assert video.data.shape[0] == 4 and track is not None and track.modality is Modality.AUDIO
    assert track.sample_rate_hz == 16000 and track.data.dtype == np.float32 and track.data.ndim == 1
    assert abs(len(track.data) / 16000 - 2.0) < 0.15  # AAC's priming / padding: a few ms
    spectrum = np.abs(np.fft.rfft(track.data[4000:-4000]))
    assert np.fft.rfftfreq(len(track.data) - 8000, 1 / 16000)[spectrum.argmax()] == pytest.approx(440.0, abs=5)
    assert 0.3 < np.abs(track.data).max() < 0.7
    assert decode_media("video", data, num_frames=4).sound_track is None  # not asked for
    silent = encode_video(frames, 8)
    assert decode_sound_track(silent) is None
    assert decode_media("video", silent, num_frames=4, sound_track=True).sound_track is None
    _media_error(decode_sound_track, data, limits=MediaLimits(max_video_duration_s=0.5), code="too_large",
                 medium="video")


def test_a_webm_stereo_sound_track_is_averaged_to_mono():
    """Opus in WebM, stereo at 48 kHz: the channels are averaged (the tone in one channel, silence in the other:
    half its amplitude; libswresample's own downmix would give 1/sqrt(2)); over the channel limit: too large."""
    tone = _tone(300.0, 2.0, 48000)
    data = encode_video(photo_frames(), 8, codec="libvpx-vp9", fmt="webm", sound=(np.stack([tone, 0 * tone]), 48000))
    sound = decode_sound_track(data)
    assert sound is not None and abs(len(sound) / 16000 - 2.0) < 0.15
    assert 0.2 < np.abs(sound[4000:-4000]).max() < 0.3  # 0.5 / 2
    assert np.fft.rfftfreq(len(sound), 1 / 16000)[np.abs(np.fft.rfft(sound)).argmax()] == pytest.approx(300.0, abs=5)
    _media_error(decode_sound_track, data, limits=MediaLimits(max_audio_channels=1), code="too_large",
                 medium="video")
