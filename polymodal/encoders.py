"""Input encoders: one registry (``ENCODERS``) mapping a decoded medium to embeddings.

Every encoder takes decoded arrays (see :mod:`polymodal.media_io`). ``encode_tokens`` returns ``(B, N, D_enc)``
float32, what the input projector reads: N = ``encoder.num_tokens`` tokens per item, token 0 the pooled embedding
(N = 1 for every kind by default; ``clip`` with ``options["tokens"] = "patches"`` gives the class token and
every patch, as LLaVA and Kosmos-2 feed their LLMs). ``encode`` returns token 0 alone, ``(B, D_enc)``:

- image: B items of uint8 (H, W, 3) RGB;
- audio: B items of float32 (S,) mono at ``sample_rate_hz`` (resampled with ``soxr`` to the encoder's rate);
- video: B items of uint8 (F, H, W, 3): the frames go through the encoder's *image* path and their embeddings are
  averaged (NExT-GPT / ImageBind average the embeddings of a video's clips). Frames come from
  :func:`polymodal.media_io.decode_video` (F frames at the centres of F equal segments of the duration, 8 by
  default); an item with more than ``options["max_frames"]`` (default 8) frames is subsampled the same way, i.e.
  frame ``floor((i + 0.5) * F / max_frames)`` (stride F / max_frames). Each frame is preprocessed as an image:
  ``tiny`` resizes it to ``image_size_px`` (32) square, ``clip`` and ``imagebind`` resize the shorter side and
  centre-crop (CLIP preprocessing, 224 px for real checkpoints).

Registry keys (``EncoderConfig.kind``):

- ``tiny``: seeded random-initialised small torch modules (tests, the ``tiny``/``smol`` presets).
- ``clip``: transformers ``CLIPVisionModelWithProjection`` + its image processor, by hub id or local folder
  (a full ``CLIPModel`` checkpoint loads too; the text tower's weights are ignored). Image and video. Option
  ``tokens``: ``"pooled"`` (default: ``image_embeds``) or ``"patches"`` (1 + P tokens: the last layer's states
  of the class token and the P patches, each through ``post_layernorm`` and ``visual_projection``, so token 0
  is ``image_embeds`` and every token is D_enc = ``projection_dim``; patches keep their position, which
  grounding needs). Option ``patch_pool`` (default 1): average each k x k window of patch tokens (P / k^2
  tokens, fewer LLM positions; Qwen2-VL merges 2 x 2 patches for the same reason).
- ``clap``: transformers ``ClapAudioModelWithProjection`` + ``ClapFeatureExtractor`` (e.g. laion/clap-htsat-unfused,
  the CLAP AudioLDM uses). Audio.
- ``imagebind``: NExT-GPT's encoder, ImageBind-huge (1024-d, all three media). Optional extra for GPU installs
  (``pip install polymodal[imagebind]``; it needs torchvision/torchaudio/pytorchvideo), imported lazily.

Encoders are frozen (``eval()``, no gradients), as in NExT-GPT.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch
from torch import nn

from polymodal.config import EncoderConfig
from polymodal.devices import DTYPES
from polymodal.modality import Modality

IMAGE, AUDIO, VIDEO = Modality.IMAGE, Modality.AUDIO, Modality.VIDEO


class EncoderUnavailableError(RuntimeError):
    """The encoder's optional package is not installed (e.g. ImageBind on a CPU install)."""


class EncoderLoadError(RuntimeError):
    """A pretrained encoder could not be loaded (missing files, missing or unexpected weights)."""


def _sub_seed(seed: int, *parts: str) -> int:
    return zlib.crc32(":".join((str(seed), *parts)).encode()) & 0x7FFFFFFF


def subsample_frames(num_frames: int, max_frames: int) -> list[int]:
    """Indices of ``min(num_frames, max_frames)`` frames at the centres of equal segments: floor((i+0.5)*F/M)."""
    if num_frames <= max_frames:
        return list(range(num_frames))
    return [math.floor((i + 0.5) * num_frames / max_frames) for i in range(max_frames)]


def _as_image(x: np.ndarray, where: str) -> np.ndarray:
    if not isinstance(x, np.ndarray) or x.ndim != 3 or x.shape[2] != 3 or 0 in x.shape:
        shape = getattr(x, "shape", type(x).__name__)
        raise ValueError(f"{where}: expected an RGB image array (H, W, 3), got {shape}")
    if x.dtype == np.uint8:
        return x
    if np.issubdtype(x.dtype, np.floating):  # float images in [0, 1]
        return (np.clip(x, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    raise ValueError(f"{where}: expected uint8 (or float in [0, 1]) pixels, got {x.dtype}")


def _as_audio(x: np.ndarray, where: str) -> np.ndarray:
    if not isinstance(x, np.ndarray) or x.ndim != 1 or x.shape[0] == 0:
        shape = getattr(x, "shape", type(x).__name__)
        raise ValueError(f"{where}: expected mono samples (S,) with S >= 1, got {shape}")
    if not np.issubdtype(x.dtype, np.floating):
        raise ValueError(f"{where}: expected float samples, got {x.dtype}")
    return x.astype(np.float32, copy=False)


def _as_video(x: np.ndarray, where: str) -> np.ndarray:
    if not isinstance(x, np.ndarray) or x.ndim != 4 or x.shape[3] != 3 or 0 in x.shape:
        shape = getattr(x, "shape", type(x).__name__)
        raise ValueError(f"{where}: expected video frames (F, H, W, 3), got {shape}")
    return x


def _resample(x: np.ndarray, from_hz: int, to_hz: int) -> np.ndarray:
    if from_hz == to_hz:
        return x
    import soxr

    return soxr.resample(x, from_hz, to_hz, quality="HQ").astype(np.float32, copy=False)


class Encoder:
    """A frozen input encoder for one modality.

    Attributes:
        modality: the medium it encodes.
        dim: D_enc, the size of one embedding.
        init_state: ``"random"`` (seeded random initialisation, a declared state) or ``"pretrained"``.
        kind: the registry key.
        num_tokens: N, tokens per item of :meth:`encode_tokens` (1: one pooled embedding).
        sample_rate_hz: the rate audio is resampled to before encoding (audio encoders), else ``None``.
        max_frames: most frames per video item (video encoders).
        module: the underlying ``torch.nn.Module`` (frozen).
    """

    kind: ClassVar[str] = ""
    modalities: ClassVar[frozenset[Modality]] = frozenset()

    def __init__(self, modality: Modality, dim: int, init_state: str, module: nn.Module, *,
                 device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                 sample_rate_hz: int | None = None, max_frames: int = 8, batch_size: int = 32, path: str | None = None,
                 num_tokens: int = 1):
        self.modality = modality
        self.dim = dim
        self.num_tokens = num_tokens
        self.init_state = init_state
        self.device = torch.device(device)
        self.dtype = dtype
        path = INPUT_PATHS.get(modality)
        self.sample_rate_hz = sample_rate_hz if path is not None and path.waveform else None
        self.max_frames = max_frames
        self.batch_size = batch_size
        self.path = path
        self.module = module.to(device=self.device, dtype=dtype).eval().requires_grad_(False)

    # -- construction -------------------------------------------------------------------------------------------
    @classmethod
    def build(cls, modality: Modality, config: EncoderConfig, *, device: str | torch.device = "cpu",
              seed: int = 0) -> "Encoder":
        raise NotImplementedError

    @staticmethod
    def _common_options(config: EncoderConfig) -> dict:
        opts = dict(config.options)
        dtype_name = str(opts.pop("dtype", "float32"))
        if dtype_name not in DTYPES:
            raise ValueError(f"encoder option dtype={dtype_name!r}; choose from: {', '.join(DTYPES)}")
        max_frames = int(opts.pop("max_frames", 8))
        batch_size = int(opts.pop("batch_size", 32))
        if max_frames < 1 or batch_size < 1:
            raise ValueError(f"encoder options max_frames and batch_size must be >= 1, got {max_frames}, {batch_size}")
        return dict(dtype=DTYPES[dtype_name], max_frames=max_frames, batch_size=batch_size, rest=opts)

    # -- encoding -----------------------------------------------------------------------------------------------
    def encode(self, items: Sequence[np.ndarray], *, sample_rate_hz: int | None = None) -> torch.Tensor:
        """The pooled embedding of B decoded media: token 0 of :meth:`encode_tokens`, (B, D_enc) float32.

        Raises:
            ValueError / TypeError: as :meth:`encode_tokens`.
        """
        return self.encode_tokens(items, sample_rate_hz=sample_rate_hz)[:, 0]

    def encode_tokens(self, items: Sequence[np.ndarray], *, sample_rate_hz: int | None = None) -> torch.Tensor:
        """Encode B decoded media of this encoder's modality into what the input projector reads.

        Args:
            items: B arrays: image uint8 (H, W, 3); audio float32 (S,); video uint8 (F, H, W, 3) (each token is
                averaged over the frames).
            sample_rate_hz: rate of the audio items (``None``: already at ``self.sample_rate_hz``).

        Returns:
            (B, N, D_enc) float32 on ``self.device`` (no gradient), N = ``self.num_tokens``, token 0 pooled.

        Raises:
            TypeError: ``items`` is not a list of arrays.
            ValueError: an item of the wrong shape or dtype (names its index), a non-positive sample rate.
        """
        if isinstance(items, np.ndarray) or not isinstance(items, (list, tuple)):
            raise TypeError(f"{self.modality.value} encoder: expected a list of arrays, got {type(items).__name__}")
        if not items:
            return torch.zeros(0, self.num_tokens, self.dim, device=self.device)
        name = f"{self.modality.value} encoder"
        path = INPUT_PATHS.get(self.modality)
        if path is None:
            readable = ", ".join(m.value for m in INPUT_PATHS)
            raise ValueError(f"{name}: encoders read {readable}, not {self.modality.value}")
        with torch.no_grad():
            out = path.encode(self, items, name, sample_rate_hz)
        if out.dim() == 2:  # the kind's hook gives one embedding per item: (n, D_enc)
            out = out[:, None]
        want = (len(items), self.num_tokens, self.dim)
        if out.shape != want:
            raise RuntimeError(f"{name} produced {tuple(out.shape)}, expected {want}")
        return out.float()

    __call__ = encode

    def _batched(self, items: list, fn) -> torch.Tensor:
        return torch.cat([fn(items[i : i + self.batch_size]) for i in range(0, len(items), self.batch_size)])

    # hooks: (n, D_enc) (one token per item) or (n, N, D_enc)
    def _encode_images(self, images: list[np.ndarray]) -> torch.Tensor:
        raise ValueError(f"encoder {self.kind!r} has no image path")

    def _encode_audio(self, clips: list[np.ndarray]) -> torch.Tensor:
        raise ValueError(f"encoder {self.kind!r} has no audio path")

    def to(self, device: str | torch.device) -> "Encoder":
        self.device = torch.device(device)
        self.module.to(self.device)
        return self

    def describe(self) -> dict:
        """Manifest entry: kind, modality, D_enc, init state, source path, parameter count."""
        return {
            "kind": self.kind, "modality": self.modality.value, "dim": self.dim, "num_tokens": self.num_tokens,
            "init_state": self.init_state,
            "path": self.path, "parameters": sum(p.numel() for p in self.module.parameters()),
        }

    def __repr__(self) -> str:
        return f"{type(self).__name__}(modality={self.modality.value}, dim={self.dim}, init_state={self.init_state})"


def _image_items(enc: Encoder, items: Sequence[np.ndarray], name: str, sample_rate_hz: int | None) -> torch.Tensor:
    return enc._encode_images([_as_image(x, f"{name}, item {i}") for i, x in enumerate(items)])


def _audio_items(enc: Encoder, items: Sequence[np.ndarray], name: str, sample_rate_hz: int | None) -> torch.Tensor:
    rate = enc.sample_rate_hz if sample_rate_hz is None else int(sample_rate_hz)
    if rate <= 0:
        raise ValueError(f"{name}: sample_rate_hz must be positive, got {rate}")
    clips = [_resample(_as_audio(x, f"{name}, item {i}"), rate, enc.sample_rate_hz) for i, x in enumerate(items)]
    return enc._encode_audio(clips)


def _video_items(enc: Encoder, items: Sequence[np.ndarray], name: str, sample_rate_hz: int | None) -> torch.Tensor:
    videos = [_as_video(x, f"{name}, item {i}") for i, x in enumerate(items)]
    frames, counts = [], []
    for i, v in enumerate(videos):
        keep = subsample_frames(v.shape[0], enc.max_frames)
        frames.extend(_as_image(v[k], f"{name}, item {i} frame {k}") for k in keep)
        counts.append(len(keep))
    per_frame = enc._encode_images(frames)
    return torch.stack([chunk.mean(dim=0) for chunk in torch.split(per_frame, counts)])


@dataclass(frozen=True)
class InputPath:
    """How one modality's items reach an encoder.

    Attributes:
        encode: ``(encoder, items, name, sample_rate_hz)`` -> (B, D_enc) or (B, N, D_enc) through the kind's hooks.
        network: the name of the network the items go through (``"image"``: :meth:`Encoder._encode_images`, video
            frames too; ``"audio"``: :meth:`Encoder._encode_audio`); the tiny kind seeds its weights with it.
        waveform: items are waveforms, resampled to the encoder's ``sample_rate_hz``.
    """

    encode: Callable[[Encoder, Sequence[np.ndarray], str, int | None], torch.Tensor]
    network: str
    waveform: bool = False


# The input paths of the modalities encoders read (video: each frame through the image path, averaged per item).
INPUT_PATHS: dict[Modality, InputPath] = {
    IMAGE: InputPath(_image_items, "image"),
    AUDIO: InputPath(_audio_items, "audio", waveform=True),
    VIDEO: InputPath(_video_items, "image"),
}


# ------------------------------------------------------------------------------------------------------------ tiny
class _TinyImageNet(nn.Module):
    """(B, 3, S, S) -> (B, D_enc): two strided convolutions, a linear map of the whole feature map, LayerNorm."""

    def __init__(self, dim: int, image_size_px: int):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, stride=2, padding=1)
        self.conv2 = nn.Conv2d(16, 32, 3, stride=2, padding=1)
        side = math.ceil(math.ceil(image_size_px / 2) / 2)
        self.proj = nn.Linear(32 * side * side, dim)
        self.norm = nn.LayerNorm(dim, elementwise_affine=False)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        h = nn.functional.gelu(self.conv2(nn.functional.gelu(self.conv1(pixels))))
        return self.norm(self.proj(h.flatten(1)))


class _TinyAudioNet(nn.Module):
    """(B, 1, F_bins, T_bins) pooled log-power spectrogram -> (B, D_enc): MLP, LayerNorm."""

    def __init__(self, dim: int, freq_bins: int, time_bins: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(freq_bins * time_bins, 128), nn.GELU(), nn.Linear(128, dim))
        self.norm = nn.LayerNorm(dim, elementwise_affine=False)

    def forward(self, spec: torch.Tensor) -> torch.Tensor:
        return self.norm(self.mlp(spec.flatten(1)))


class TinyEncoder(Encoder):
    """Seeded random-initialised small encoder (a declared ``init_state="random"``, not a failure).

    - image / video frames: resized (Pillow, bilinear) to ``image_size_px`` square (option, default 32), scaled to
      [-1, 1], two stride-2 3x3 convolutions (16, 32 channels), Linear(32 * (S/4)^2 -> D_enc), LayerNorm.
    - audio at 16 kHz: log10 power STFT (n_fft 400 = 25 ms, hop 160 = 10 ms, Hann) of the whole clip, average-pooled
      to 32 frequency x 16 time bins (any length maps to a fixed size), MLP(512 -> 128 -> D_enc), LayerNorm.

    The weights depend only on ``(seed, modality)`` (video shares the image weights): the same seed builds the
    same encoder in any process.
    """

    kind = "tiny"
    modalities = frozenset(INPUT_PATHS)
    FREQ_BINS, TIME_BINS, N_FFT, HOP = 32, 16, 400, 160

    @classmethod
    def build(cls, modality, config, *, device="cpu", seed=0):
        common = cls._common_options(config)
        rest = common.pop("rest")
        image_size_px = int(rest.pop("image_size_px", 32))
        if rest:
            raise ValueError(f"unknown options for the tiny encoder: {sorted(rest)}; known: image_size_px, "
                             "max_frames, batch_size, dtype")
        if image_size_px < 4:
            raise ValueError(f"tiny encoder image_size_px must be >= 4, got {image_size_px}")
        with torch.random.fork_rng(devices=[]):
            # video frames go through the image network: same weights as the image encoder of this seed
            path = INPUT_PATHS[modality]  # video frames: the image network (same seed, same weights)
            torch.manual_seed(_sub_seed(seed, "tiny-encoder", path.network))
            module = (_TinyAudioNet(config.dim, cls.FREQ_BINS, cls.TIME_BINS) if path.waveform
                      else _TinyImageNet(config.dim, image_size_px))
        enc = cls(modality, config.dim, "random", module, device=device, sample_rate_hz=16000, **common)
        enc.image_size_px = image_size_px
        return enc

    def _encode_images(self, images):
        from PIL import Image

        size = self.image_size_px

        def run(chunk):
            arr = np.stack([np.asarray(Image.fromarray(x).resize((size, size), Image.BILINEAR)) for x in chunk])
            pixels = torch.from_numpy(arr).permute(0, 3, 1, 2).to(self.device, self.dtype) / 127.5 - 1.0
            return self.module(pixels)

        return self._batched(images, run)

    def _encode_audio(self, clips):
        window = torch.hann_window(self.N_FFT, device=self.device)
        feats = []
        for x in clips:
            wave = torch.tensor(np.asarray(x, dtype=np.float32)).to(self.device)
            if wave.shape[0] < self.N_FFT:
                wave = nn.functional.pad(wave, (0, self.N_FFT - wave.shape[0]))
            spec = torch.stft(wave, self.N_FFT, self.HOP, window=window, return_complex=True).abs().pow(2)
            logspec = (torch.log10(spec + 1e-10) + 5.0) / 5.0  # (201, T), roughly in [-1, 1]
            pooled = nn.functional.adaptive_avg_pool2d(logspec[None, None], (self.FREQ_BINS, self.TIME_BINS))
            feats.append(pooled[0])
        return self.module(torch.stack(feats).to(self.dtype))


# ---------------------------------------------------------------------------------------------------- transformers
def _require_path(kind: str, config: EncoderConfig) -> str:
    if not config.path:
        raise ValueError(f"encoder {kind!r} needs EncoderConfig.path (a hub id or a local folder)")
    return config.path


def _load_checked(model_cls, path: str, kind: str, allowed_unexpected: tuple[str, ...]):
    """``from_pretrained`` with strict key checking: missing or mismatched weights are an error; unexpected ones
    only when they belong to the other tower of a two-tower checkpoint (``allowed_unexpected`` prefixes).
    transformers' own load report (a table of those keys, as a warning) is held back: these checks replace it.
    (With that logger above WARNING, transformers 5 also checks the model's tensor-parallel plan and warns that
    no layer "was sharded", through a second logger: held back too.)"""
    import logging

    quiet = [logging.getLogger(f"transformers.{name}") for name in ("modeling_utils", "distributed.tensor_parallel")]
    levels = [q.level for q in quiet]
    for q in quiet:
        q.setLevel(logging.ERROR)
    try:
        model, info = model_cls.from_pretrained(path, output_loading_info=True)
    except (OSError, ValueError, KeyError) as e:
        raise EncoderLoadError(f"encoder {kind!r}: cannot load {model_cls.__name__} from {path!r}: {e}") from e
    finally:
        for q, level in zip(quiet, levels):
            q.setLevel(level)
    missing = sorted(info.get("missing_keys") or [])
    mismatched = sorted(str(k) for k in (info.get("mismatched_keys") or []))
    unexpected = sorted(k for k in (info.get("unexpected_keys") or []) if not k.startswith(allowed_unexpected))
    if missing or mismatched or unexpected:
        raise EncoderLoadError(
            f"encoder {kind!r} from {path!r}: missing weights {missing[:5]}, mismatched {mismatched[:5]}, "
            f"unexpected {unexpected[:5]} (refusing to run with partly random weights)"
        )
    return model


def _load_processor(cls_names: tuple[str, ...], path: str, kind: str):
    import transformers

    for name in cls_names:
        cls = getattr(transformers, name, None)
        if cls is None:
            continue
        try:
            return cls.from_pretrained(path)
        except (OSError, ValueError, KeyError) as e:
            raise EncoderLoadError(f"encoder {kind!r}: cannot load the {name} preprocessor config from {path!r} "
                                   f"(preprocessor_config.json): {e}") from e
    raise EncoderLoadError(f"encoder {kind!r}: transformers has none of {cls_names}")


def _check_dim(kind: str, config: EncoderConfig, model_dim: int, path: str) -> None:
    if model_dim != config.dim:
        raise ValueError(f"encoder {kind!r} from {path!r} gives {model_dim}-d embeddings (projection_dim) but "
                         f"EncoderConfig.dim is {config.dim}; set dim={model_dim}")


class CLIPEncoder(Encoder):
    """CLIP image tower (transformers ``CLIPVisionModelWithProjection``): ``image_embeds`` (B, projection_dim), or
    with ``options["tokens"] = "patches"`` the class and patch tokens (B, 1 + P, projection_dim) (module docstring).

    Preprocessing is the checkpoint's own image processor (``CLIPImageProcessorPil``, Pillow/numpy: shorter side
    resized to ``size``, centre crop, CLIP mean/std). Embeddings are not normalised (as the model returns them).
    """

    kind = "clip"
    modalities = frozenset({IMAGE, VIDEO})
    TOKENS = ("pooled", "patches")

    @classmethod
    def build(cls, modality, config, *, device="cpu", seed=0):
        path = _require_path(cls.kind, config)
        from transformers import CLIPVisionModelWithProjection

        common = cls._common_options(config)
        rest = common.pop("rest")
        tokens = str(rest.pop("tokens", "pooled"))
        pool = int(rest.pop("patch_pool", 1))
        if rest:
            raise ValueError(f"unknown options for the clip encoder: {sorted(rest)}; known: tokens, patch_pool, "
                             "max_frames, batch_size, dtype")
        if tokens not in cls.TOKENS:
            raise ValueError(f"clip encoder option tokens={tokens!r}; choose from: {', '.join(cls.TOKENS)}")
        model = _load_checked(CLIPVisionModelWithProjection, path, cls.kind,
                              ("text_model.", "text_projection.", "logit_scale"))
        _check_dim(cls.kind, config, model.config.projection_dim, path)
        grid = model.config.image_size // model.config.patch_size
        if pool < 1 or grid % pool:
            raise ValueError(f"clip encoder option patch_pool={pool} must divide the {grid} x {grid} patch grid")
        n = 1 + (grid // pool) ** 2 if tokens == "patches" else 1
        enc = cls(modality, config.dim, "pretrained", model, device=device, path=path, num_tokens=n, **common)
        enc.tokens, enc.grid, enc.patch_pool = tokens, grid, pool
        enc.processor = _load_processor(("CLIPImageProcessorPil", "CLIPImageProcessor"), path, cls.kind)
        return enc

    def _encode_images(self, images):
        def run(chunk):
            pixels = self.processor(images=list(chunk), return_tensors="pt")["pixel_values"]
            out = self.module(pixel_values=pixels.to(self.device, self.dtype))
            if self.tokens == "pooled":
                return out.image_embeds
            h = self.module.visual_projection(self.module.vision_model.post_layernorm(out.last_hidden_state))
            g, k = self.grid, self.patch_pool
            patches = h[:, 1:].reshape(len(h), g // k, k, g // k, k, -1).mean(dim=(2, 4))  # row-major windows
            return torch.cat([h[:, :1], patches.flatten(1, 2)], dim=1)  # (n, 1 + (g / k)^2, D_enc)

        return self._batched(images, run)


class CLAPEncoder(Encoder):
    """CLAP audio tower (transformers ``ClapAudioModelWithProjection`` + ``ClapFeatureExtractor``): ``audio_embeds``.

    Audio is resampled to the feature extractor's rate (48 kHz for LAION CLAP). Clips longer than its
    ``max_length_s`` (10 s) are cropped (``rand_trunc``) or fused (``fusion``) by the feature extractor, which draws
    random offsets: they are drawn from a generator seeded by ``seed``, per item, so the same input always gives
    the same embedding whatever else is in the batch.
    """

    kind = "clap"
    modalities = frozenset({AUDIO})

    @classmethod
    def build(cls, modality, config, *, device="cpu", seed=0):
        path = _require_path(cls.kind, config)
        from transformers import ClapAudioModelWithProjection

        common = cls._common_options(config)
        if common.pop("rest"):
            raise ValueError(f"unknown options for the clap encoder: {sorted(config.options)}")
        model = _load_checked(ClapAudioModelWithProjection, path, cls.kind,
                              ("text_model.", "text_projection.", "logit_scale"))
        _check_dim(cls.kind, config, model.config.projection_dim, path)
        extractor = _load_processor(("ClapFeatureExtractor",), path, cls.kind)
        enc = cls(modality, config.dim, "pretrained", model, device=device, path=path,
                  sample_rate_hz=int(extractor.sampling_rate), **common)
        enc.feature_extractor = extractor
        enc.seed = seed
        return enc

    def _encode_audio(self, clips):
        feats, longer = [], []
        for x in clips:
            state = np.random.get_state()  # the extractor draws crops from numpy's global generator
            try:
                np.random.seed(_sub_seed(self.seed, "clap-crop"))
                out = self.feature_extractor(x, sampling_rate=self.sample_rate_hz, return_tensors="pt")
            finally:
                np.random.set_state(state)
            feats.append(out["input_features"][0])
            longer.append(out["is_longer"][0])

        def run(idx):
            return self.module(
                input_features=torch.stack([feats[i] for i in idx]).to(self.device, self.dtype),
                is_longer=torch.stack([longer[i] for i in idx]).to(self.device),
            ).audio_embeds

        return self._batched(list(range(len(clips))), run)


# ------------------------------------------------------------------------------------------------------- imagebind
IMAGEBIND_INSTALL_HINT = (
    "pip install polymodal[imagebind] (GPU installs: ImageBind needs torchvision, torchaudio and pytorchvideo "
    "built for your torch)"
)
_CLIP_MEAN = np.array([0.48145466, 0.4578275, 0.40821073], np.float32)
_CLIP_STD = np.array([0.26862954, 0.26130258, 0.27577711], np.float32)


def _import_imagebind():
    try:
        from imagebind.models import imagebind_model
        from imagebind.models.imagebind_model import ModalityType
    except ImportError as e:
        raise EncoderUnavailableError(
            f"encoder 'imagebind' (NExT-GPT's ImageBind-huge) is not installed ({e}); {IMAGEBIND_INSTALL_HINT}; "
            "or choose a preset whose encoders are 'tiny', 'clip' or 'clap'"
        ) from e
    return imagebind_model, ModalityType


class ImageBindEncoder(Encoder):
    """ImageBind-huge (Girdhar et al., 2023), NExT-GPT's encoder: 1024-d, L2-normalised, all three media.

    ``config.path``: ``imagebind_huge.pth`` (loaded strictly); ``None`` lets ImageBind fetch it into
    ``.checkpoints/``. Images/frames: shorter side to 224 (bicubic), centre crop 224, CLIP mean/std (ImageBind's
    vision transform, done with Pillow/numpy). Audio: ImageBind's own pipeline (16 kHz, 3 clips of 2 s spaced by
    pytorchvideo's ``ConstantClipsPerVideoSampler``, 128-bin kaldi fbank of 204 frames, mean -4.268 std 9.138;
    the clip embeddings are averaged inside the model). Video: the sampled frames as images, averaged (ImageBind
    proper feeds 2-frame clips; single frames keep one video path for every encoder).
    """

    kind = "imagebind"
    modalities = frozenset(INPUT_PATHS)
    DIM = 1024

    @classmethod
    def build(cls, modality, config, *, device="cpu", seed=0):
        imagebind_model, modality_type = _import_imagebind()
        if config.dim != cls.DIM:
            raise ValueError(f"encoder 'imagebind' gives {cls.DIM}-d embeddings; EncoderConfig.dim is {config.dim}")
        common = cls._common_options(config)
        if common.pop("rest"):
            raise ValueError(f"unknown options for the imagebind encoder: {sorted(config.options)}")
        if config.path:
            model = imagebind_model.imagebind_huge(pretrained=False)
            try:
                state = torch.load(config.path, map_location="cpu", weights_only=True)
                model.load_state_dict(state, strict=True)
            except (OSError, RuntimeError, KeyError) as e:
                raise EncoderLoadError(f"encoder 'imagebind': cannot load {config.path!r}: {e}") from e
        else:
            model = imagebind_model.imagebind_huge(pretrained=True)
        enc = cls(modality, cls.DIM, "pretrained", model, device=device, path=config.path,
                  sample_rate_hz=16000, **common)
        enc.modality_type = modality_type
        return enc

    def _encode_images(self, images):
        from PIL import Image

        def prep(x):
            img = Image.fromarray(x)
            scale = 224 / min(img.size)
            img = img.resize((max(224, round(img.width * scale)), max(224, round(img.height * scale))), Image.BICUBIC)
            left, top = (img.width - 224) // 2, (img.height - 224) // 2
            arr = np.asarray(img.crop((left, top, left + 224, top + 224)), np.float32) / 255.0
            return ((arr - _CLIP_MEAN) / _CLIP_STD).transpose(2, 0, 1)

        def run(chunk):
            pixels = torch.from_numpy(np.stack([prep(x) for x in chunk])).to(self.device, self.dtype)
            return self.module({self.modality_type.VISION: pixels})[self.modality_type.VISION]

        return self._batched(images, run)

    def _encode_audio(self, clips):
        from imagebind.data import get_clip_timepoints, waveform2melspec
        from pytorchvideo.data.clip_sampling import ConstantClipsPerVideoSampler

        rate = self.sample_rate_hz
        items = []
        for x in clips:
            sampler = ConstantClipsPerVideoSampler(clip_duration=2, clips_per_video=3)
            wave = torch.tensor(np.asarray(x, dtype=np.float32))[None]
            mels = []
            for start_s, end_s in get_clip_timepoints(sampler, wave.shape[1] / rate):
                piece = wave[:, int(start_s * rate) : int(end_s * rate)]
                mels.append((waveform2melspec(piece, rate, 128, 204) - (-4.268)) / 9.138)
            items.append(torch.stack(mels))  # (3 clips, 1, 128, 204)

        def run(chunk):
            batch = torch.stack(chunk).to(self.device, self.dtype)
            return self.module({self.modality_type.AUDIO: batch})[self.modality_type.AUDIO]

        return self._batched(items, run)


# --------------------------------------------------------------------------------------------------------- registry
ENCODERS: dict[str, type[Encoder]] = {
    "tiny": TinyEncoder,
    "clip": CLIPEncoder,
    "clap": CLAPEncoder,
    "imagebind": ImageBindEncoder,
}


def build_encoder(modality: Modality | str, config: EncoderConfig, *, device: str | torch.device = "cpu",
                  seed: int = 0) -> Encoder:
    """Build the encoder ``config.kind`` for ``modality``.

    Raises:
        ValueError: unknown kind (lists the choices), a kind that does not encode this modality, bad options,
            ``config.dim`` not matching the checkpoint.
        EncoderUnavailableError: the kind's optional package is missing (``imagebind``).
        EncoderLoadError: a pretrained checkpoint cannot be loaded or has missing/unexpected weights.
    """
    modality = Modality.parse(modality)
    if config.kind not in ENCODERS:
        raise ValueError(f"unknown encoder kind {config.kind!r}; choose from: {', '.join(ENCODERS)}")
    cls = ENCODERS[config.kind]
    if modality not in cls.modalities:
        can = ", ".join(sorted(m.value for m in cls.modalities))
        raise ValueError(f"encoder {config.kind!r} does not encode {modality.value} (it encodes: {can})")
    return cls.build(modality, config, device=device, seed=seed)
