"""The decoder base class: a stock diffusers pipeline driven by ``prompt_embeds`` (B, Q, D_cond).

Every call passes ``prompt_embeds`` AND ``negative_prompt_embeds`` of the same shape (the negative being the
decoder's own text encoder's embedding of ``""``), one ``torch.Generator`` per item seeded with that item's
seed (item k of a batch equals item k rendered alone), ``output_type="np"``, and a step callback that
reports progress and cancels. Subclasses (image, audio, video) say which pipeline, how to build its tiny
random components, and how to turn its output into :class:`decoders.media.Medium`.

Edits (issue #27): ``render(..., sources=[EditSource, ...])`` renders from source media instead of from noise,
conditioned the same way (``prompt_embeds``). The edit pipelines are stock diffusers pipelines composed once over
the loaded pipeline's own components (``from_pipe``: the same UNet, VAE, text encoder and scheduler objects, never
a second copy of the weights): image ``StableDiffusionImg2ImgPipeline`` (the whole image) and
``StableDiffusionInpaintPipeline`` (where a mask allows; a 4-channel UNet, diffusers' legacy inpainting, which
blends the source's latents outside the mask at every step; the source's pixels are kept there exactly), video
``VideoToVideoSDPipeline`` / ``AnimateDiffVideoToVideoPipeline``. Audio: diffusers has no AudioLDM audio-to-audio
pipeline, so the audio decoder cannot edit.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import threading
from collections.abc import Callable
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch

from decoders.errors import DecodeError, DecoderLoadError
from decoders.media import Medium, degenerate_reason, split_batch
from polymodal.config import DecoderConfig, DecoderDefaults, DecoderFastPath
from polymodal.devices import resolve_dtype
from polymodal.modality import Modality
from polymodal.types import EditSource


class _Cancelled(Exception):
    """Raised from the step callback to stop the denoising loop."""


class Decoder:
    """A diffusion decoder: conditioning (B, Q, D_cond) -> media.

    Attributes:
        modality: what it renders.
        init_state: ``"random"`` (tiny config, random weights: a declared state) or ``"pretrained"``.
        cond_shape: (Q, D_cond) of one item's ``prompt_embeds``; audio (1, D_cond).
        defaults: generation options used when a call passes none.
        negative_prompt_embeds: (Q, D_cond), the own text encoder's embedding of ``""`` (computed once).
        pipeline: the stock diffusers pipeline (on ``device``, fp32 on CPU).
    """

    modality: ClassVar[Modality]
    pipeline_class: ClassVar[type]
    # Pipelines a pretrained folder may hold (its model_index.json names one); the first is ``pipeline_class``.
    pipeline_classes: ClassVar[tuple[type, ...]] = ()
    # Edit pipelines by the loaded pipeline's class: {its class: {edit kind: the edit pipeline's class}}; kinds
    # "whole" (a source without mask) and "masked" (a source with a mask). None for a class: it cannot edit.
    edit_pipeline_classes: ClassVar[dict[type, dict[str, type]]] = {}
    # Edit pipelines whose batched call is wrong (diffusers 0.42's VideoToVideoSDPipeline encodes only the first
    # frame when given one generator per item): rendered one item per call, each with its own generator.
    edit_one_item_classes: ClassVar[tuple[type, ...]] = ()
    # Keys of DecoderConfig.options this decoder reads (any other key is refused when it is built).
    config_option_keys: ClassVar[tuple[str, ...]] = ()

    def __init__(
        self,
        pipeline,
        config: DecoderConfig,
        *,
        init_state: str,
        device: str | torch.device = "cpu",
    ):
        """Wrap an already built ``pipeline`` (see :meth:`from_config`).

        Raises:
            DecoderLoadError: the pipeline's conditioning shape differs from ``config`` (cond_tokens, cond_dim).
        """
        self.device = torch.device(device)
        self.dtype = resolve_dtype(config.dtype, self.device)
        self.config = config
        self.init_state = init_state
        self.defaults: DecoderDefaults = config.defaults
        self.cond_shape: tuple[int, int] = (config.cond_tokens, config.cond_dim)
        self.pipeline = pipeline.to(self.device)
        if self.pipeline.dtype != self.dtype:
            self.pipeline.to(dtype=self.dtype)
        self.pipeline.set_progress_bar_config(disable=True)
        self._check_cond_shape()
        self.apply_fast_path(config.fast_path)
        self._lock = threading.Lock()
        self._edit_lock = threading.Lock()
        self._edit_pipelines: dict[str, object] = {}
        self.negative_prompt_embeds: torch.Tensor = self.encode_text([""])[0]

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_config(cls, config: DecoderConfig, *, device: str | torch.device = "cpu", seed: int = 0) -> "Decoder":
        """Build from ``config``: ``source="tiny"`` random components (seeded), ``"pretrained"`` strict load.

        Raises:
            DecoderLoadError: a pretrained load that is missing anything (see ``load_pipeline_strict``); a key of
                ``config.options`` this decoder does not read (:attr:`config_option_keys`).
        """
        from decoders.loading import load_pipeline_strict

        unknown = sorted(set(config.options) - set(cls.config_option_keys))
        if unknown:
            raise DecoderLoadError(f"unknown options for the {cls.modality.value} decoder: {unknown}; it reads: "
                                   f"{', '.join(cls.config_option_keys) or 'none'}")
        dtype = resolve_dtype(config.dtype, torch.device(device))
        if config.source == "tiny":
            pipe, init_state = cls.tiny_pipeline(config, seed=seed), "random"
        else:
            accepted = cls.pipeline_classes or (cls.pipeline_class,)
            pipe, init_state = load_pipeline_strict(accepted, config.path, torch_dtype=dtype), "pretrained"
        return cls(pipe, config, init_state=init_state, device=device)

    @classmethod
    def tiny_pipeline(cls, config: DecoderConfig, *, seed: int = 0):
        """The stock pipeline with tiny random components (seeded), conditioning (Q, D_cond) of ``config``."""
        raise NotImplementedError

    # the pipeline's denoising network, by the attribute name its pipeline class gives it
    _DENOISER_NAMES: ClassVar[tuple[str, ...]] = ("unet", "transformer", "prior", "denoiser")

    def apply_fast_path(self, fast_path: DecoderFastPath) -> None:
        """Apply ``fast_path`` to the pipeline's denoiser (and VAE): attention processor, memory format,
        ``torch.compile`` (see :class:`polymodal.config.DecoderFastPath`); called once by ``__init__``.

        Raises:
            DecoderLoadError: an option other than the default that this pipeline cannot take (no denoiser module,
                or a denoiser without diffusers' attention processors asked for ``eager``): never silently ignored.
        """
        pipe = self.pipeline
        denoiser = next((getattr(pipe, n) for n in self._DENOISER_NAMES
                         if isinstance(getattr(pipe, n, None), torch.nn.Module)), None)
        vae = getattr(pipe, "vae", None)
        modules = [m for m in (denoiser, vae) if isinstance(m, torch.nn.Module)]
        asked = fast_path.model_dump(exclude_defaults=True)
        if asked and denoiser is None:
            raise DecoderLoadError(f"{self.modality.value} decoder: fast_path {asked} needs a denoiser module; "
                                   f"{type(pipe).__name__} has none of {self._DENOISER_NAMES}")
        if fast_path.attention == "eager":
            from diffusers.models.attention_processor import AttnProcessor

            with_processors = [m for m in modules if hasattr(m, "set_attn_processor")]
            if denoiser not in with_processors:
                raise DecoderLoadError(f"{self.modality.value} decoder: fast_path attention=eager needs diffusers' "
                                       f"attention processors; {type(denoiser).__name__} has none")
            for m in with_processors:
                m.set_attn_processor(AttnProcessor())
        if fast_path.channels_last:
            for m in modules:
                m.to(memory_format=torch.channels_last)
        if fast_path.compile != "off":
            denoiser.compile(mode=fast_path.compile)

    def _check_cond_shape(self) -> None:
        got = self._pipeline_cond_shape()
        if got != self.cond_shape:
            raise DecoderLoadError(
                f"{self.modality.value} decoder: the pipeline conditions on (Q, D_cond) = {got}, the config says "
                f"{self.cond_shape}; set cond_tokens / cond_dim to match the checkpoint"
            )

    def _pipeline_cond_shape(self) -> tuple[int, int]:
        """(Q, D_cond) the loaded pipeline's text encoder produces (CLIP-style: tokenizer length x hidden)."""
        pipe = self.pipeline
        return int(pipe.tokenizer.model_max_length), int(pipe.text_encoder.config.hidden_size)

    # ------------------------------------------------------------------ conditioning

    @torch.no_grad()
    def encode_text(self, captions: list[str]) -> torch.Tensor:
        """Captions -> (B, Q, D_cond) with the decoder's own tokenizer and text encoder (the targets of
        NExT-GPT's decoding alignment). CLIP-style default: the stock ``pipeline.encode_prompt``."""
        embeds, _ = self.pipeline.encode_prompt(list(captions), self.device, 1, False)
        return embeds.to(self.dtype)

    def _pipeline_embeds(self, prompt_embeds: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, Q, D_cond) -> (prompt_embeds, negative_prompt_embeds) as the stock pipeline takes them."""
        negative = self.negative_prompt_embeds.unsqueeze(0).expand_as(prompt_embeds).contiguous()
        return prompt_embeds, negative

    def _check_embeds(self, prompt_embeds: torch.Tensor, num_seeds: int) -> torch.Tensor:
        q, d = self.cond_shape
        if prompt_embeds.ndim == 2 and q == 1:
            prompt_embeds = prompt_embeds[:, None, :]
        if prompt_embeds.ndim != 3 or tuple(prompt_embeds.shape[1:]) != (q, d):
            raise ValueError(
                f"{self.modality.value} decoder: prompt_embeds must have shape (B, {q}, {d}), got "
                f"{tuple(prompt_embeds.shape)}"
            )
        if prompt_embeds.shape[0] != num_seeds:
            raise ValueError(f"{prompt_embeds.shape[0]} prompt_embeds but {num_seeds} seeds: one seed per item")
        return prompt_embeds.to(self.device, self.dtype)

    # ------------------------------------------------------------------ editing

    def _edit_classes(self) -> dict[str, type]:
        for base, kinds in self.edit_pipeline_classes.items():
            if isinstance(self.pipeline, base):
                return kinds
        return {}

    @property
    def edit_kinds(self) -> tuple[str, ...]:
        """The edits this decoder can render: ``"whole"`` (a source medium) and ``"masked"`` (a source image and a
        mask); ``()``: it cannot edit (audio)."""
        return tuple(self._edit_classes())

    @property
    def edit_options(self) -> tuple[str, ...]:
        """The :class:`~polymodal.config.DecoderDefaults` fields its edits read: ``("strength",)`` for SDEdit-style
        pipelines (img2img, inpainting, video-to-video: the source noised to ``strength``); ``()`` when it cannot
        edit. A request setting an edit option not listed here is refused (the ingress reads it from ``describe``)."""
        return ("strength",) if self.edit_kinds else ()

    def edit_pipeline(self, kind: str):
        """The stock pipeline of edit ``kind`` over this decoder's own components, composed once (diffusers'
        ``from_pipe``: the very UNet, VAE, text encoder, tokenizer and scheduler objects of :attr:`pipeline`).

        Raises:
            ValueError: a kind this decoder has no pipeline for (lists its kinds; an audio decoder has none).
        """
        classes = self._edit_classes()
        if kind not in classes:
            can = ", ".join(classes) or "none: diffusers has no edit pipeline over these parts"
            raise ValueError(f"the {self.modality.value} decoder ({type(self.pipeline).__name__}) cannot render "
                             f"a {kind!r} edit; its edits: {can}")
        with self._edit_lock:
            pipe = self._edit_pipelines.get(kind)
            if pipe is None and type(self.pipeline) is classes[kind]:  # it edits itself (InstructPix2Pix)
                pipe = self.pipeline
            elif pipe is None:
                pipe = classes[kind].from_pipe(self.pipeline)
                pipe.set_progress_bar_config(disable=True)
                self._edit_pipelines[kind] = pipe
        return pipe

    def _check_sources(self, sources: list[EditSource], num_seeds: int, options: DecoderDefaults) -> str:
        """The edit kind of a batch of sources.

        Raises:
            ValueError: not one source per seed, a source of another modality, sources that differ in shape or in
            having a mask, a mask of the wrong shape, or a strength that leaves no denoising step.
        """
        if len(sources) != num_seeds:
            raise ValueError(f"{len(sources)} edit sources but {num_seeds} seeds: one source per item")
        for s in sources:
            if Modality.parse(s.modality) is not self.modality:
                raise ValueError(f"a {Modality.parse(s.modality).value} source sent to the {self.modality.value} "
                                 "decoder")
            if s.mask is not None and tuple(s.mask.shape) != tuple(s.data.shape[:2]):
                raise ValueError(f"the edit mask has shape {tuple(s.mask.shape)}, its image {tuple(s.data.shape)}: "
                                 "(H, W) of the image expected")
        if len({s.signature for s in sources}) != 1:
            raise ValueError("one batch of edits must share the source's shape and whether it has a mask")
        if "strength" in self.edit_options and int(options.num_inference_steps * options.strength) < 1:
            raise ValueError(f"strength {options.strength} x {options.num_inference_steps} steps leaves no denoising "
                             "step: raise the strength or the steps (their product must be >= 1)")
        return "masked" if sources[0].mask is not None else "whole"

    def _edit_inputs(self, pipe, sources: list[EditSource], options: DecoderDefaults) -> dict:
        """The edit pipeline's keyword arguments for ``sources`` (the source media, mask, ``strength``)."""
        raise NotImplementedError

    # ------------------------------------------------------------------ rendering

    def _call_options(self, options: DecoderDefaults, batch_size: int) -> dict:
        """Modality-specific keyword arguments of a generation call of ``batch_size`` items (sizes, frames,
        duration)."""
        raise NotImplementedError

    def _output_items(self, output) -> object:
        """The per-item-batched array of the pipeline output (``images`` / ``audios`` / ``frames``)."""
        raise NotImplementedError

    def _to_medium(self, raw, seed: int, options: DecoderDefaults) -> Medium:
        raise NotImplementedError

    def _item_flag(self, output, k: int) -> str | None:
        """A pipeline-specific reason to reject item k (e.g. a safety checker), or ``None``."""
        return None

    def render(
        self,
        prompt_embeds: torch.Tensor,
        seeds: list[int],
        options: DecoderDefaults | None = None,
        should_cancel: Callable[[], bool] | None = None,
        on_step: Callable[[int], None] | None = None,
        sources: list[EditSource] | None = None,
    ) -> list[Medium | DecodeError]:
        """Render B media from conditioning (or, with ``sources``, B edits of source media).

        Args:
            prompt_embeds: (B, Q, D_cond) (audio also (B, D_cond)); e.g. an output projector's output or
                :meth:`encode_text`.
            seeds: B seeds, one ``torch.Generator`` each: item k equals item k rendered alone.
            options: steps, guidance, size, frames, duration, strength; ``None`` = :attr:`defaults`.
            should_cancel: polled at every denoising step; when it returns True the run stops and every
                item is a ``DecodeError(reason="cancelled")``.
            on_step: called with the step index after every denoising step.
            sources: B :class:`polymodal.types.EditSource` (one shape, all with or all without a mask): item k
                starts from source k noised to ``options.strength`` (:meth:`edit_pipeline`); the output has the
                source's size (and frames); with a mask the source's pixels are kept where the mask is False.

        Returns:
            One entry per item, in order: a :class:`Medium`, or a :class:`DecodeError` for an item whose
            output is NaN / all black / silent (never returned as a black file), or for cancellation.

        Raises:
            ValueError: wrong ``prompt_embeds`` shape, seed count, or options the pipeline rejects; sources this
            decoder cannot edit (see :meth:`edit_pipeline`, ``_check_sources``).
        """
        seeds = [int(s) for s in seeds]
        prompt_embeds = self._check_embeds(prompt_embeds, len(seeds))
        options = options or self.defaults
        sources = list(sources) if sources is not None else None
        if sources is not None:
            pipe = self.edit_pipeline(self._check_sources(sources, len(seeds), options))
        else:
            pipe = self.pipeline
        if should_cancel is not None and should_cancel():
            return [DecodeError(s, DecodeError.CANCELLED) for s in seeds]
        positive, negative = self._pipeline_embeds(prompt_embeds)

        def step(i: int) -> None:
            if on_step is not None:
                on_step(i)
            if should_cancel is not None and should_cancel():
                raise _Cancelled

        if "callback_on_step_end" in inspect.signature(pipe.__call__).parameters:
            def callback_on_step_end(pipe, i, t, callback_kwargs):
                step(i)
                return callback_kwargs

            callback_kwargs = {"callback_on_step_end": callback_on_step_end}
        else:
            callback_kwargs = {"callback": lambda i, t, latents: step(i), "callback_steps": 1}

        def call(ks: list[int]) -> list[tuple[object, str | None]]:
            one = sources is not None and isinstance(pipe, self.edit_one_item_classes)
            generators = [torch.Generator("cpu").manual_seed(seeds[k]) for k in ks]
            inputs = (self._edit_inputs(pipe, [sources[k] for k in ks], options) if sources is not None
                      else self._call_options(options, len(ks)))
            output = pipe(
                prompt_embeds=positive[ks],
                negative_prompt_embeds=negative[ks],
                generator=generators[0] if one else generators,
                num_inference_steps=options.num_inference_steps,
                guidance_scale=options.guidance_scale,
                output_type="np",
                **inputs,
                **callback_kwargs,
            )
            items = split_batch(self._output_items(output), len(ks))
            return [(raw, self._item_flag(output, j)) for j, raw in enumerate(items)]

        batches = ([[k] for k in range(len(seeds))] if sources is not None and isinstance(pipe, self.edit_one_item_classes)
                   else [list(range(len(seeds)))])
        with self._lock, torch.inference_mode():
            try:
                outputs = [item for ks in batches for item in call(ks)]
            except _Cancelled:
                return [DecodeError(s, DecodeError.CANCELLED) for s in seeds]
        results: list[Medium | DecodeError] = []
        for k, ((raw, flag), seed) in enumerate(zip(outputs, seeds)):
            reason = degenerate_reason(self.modality, raw) or flag
            if reason is not None:
                results.append(DecodeError(seed, reason))
                continue
            medium = self._to_medium(raw, seed, options)
            if sources is not None and sources[k].mask is not None:
                medium = dataclasses.replace(medium, data=keep_outside_mask(medium.data, sources[k]))
            reason = degenerate_reason(self.modality, raw, medium.data)
            results.append(DecodeError(seed, reason) if reason else medium)
        return results

    def save_pretrained(self, path: str | Path) -> None:
        """Write the pipeline in the diffusers on-disk layout (model_index.json + component folders)."""
        self.pipeline.save_pretrained(str(path), safe_serialization=True)

    @property
    def output_mime_type(self) -> str:
        """The MIME type of the files this decoder's media encode to (default: its modality codec's; a kind whose
        pipelines write different files, e.g. 3D meshes or point clouds, says which): an artifact reserved before
        rendering is named after it."""
        return self.modality.spec.codec.mime_type

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}({type(self.pipeline).__name__}, init_state={self.init_state!r}, "
            f"cond_shape={self.cond_shape}, device={self.device}, dtype={self.dtype})"
        )


@contextlib.contextmanager
def seeded(seed: int):
    """Context: torch's CPU RNG forked and seeded (random initialisation of tiny components)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def keep_outside_mask(data: np.ndarray, source: EditSource) -> np.ndarray:
    """The rendered image (H, W, 3) with the source's pixels wherever its mask is False (what may not change stays
    exactly as it was; diffusers' legacy inpainting keeps only the VAE's reconstruction of it).

    Raises:
        ValueError: the render and the source differ in shape.
    """
    if data.shape != source.data.shape:
        raise ValueError(f"the edit has shape {data.shape}, its source {source.data.shape}")
    return np.where(np.asarray(source.mask, dtype=bool)[..., None], data, source.data).astype(data.dtype)
