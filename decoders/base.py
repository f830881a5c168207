"""The decoder base class: a stock diffusers pipeline driven by ``prompt_embeds`` (B, Q, D_cond).

Every call passes ``prompt_embeds`` AND ``negative_prompt_embeds`` of the same shape (the negative being the
decoder's own text encoder's embedding of ``""``), one ``torch.Generator`` per item seeded with that item's
seed (item k of a batch equals item k rendered alone), ``output_type="np"``, and a step callback that
reports progress and cancels. Subclasses (image, audio, video) say which pipeline, how to build its tiny
random components, and how to turn its output into :class:`decoders.media.Medium`.
"""

from __future__ import annotations

import contextlib
import inspect
import threading
from collections.abc import Callable
from pathlib import Path
from typing import ClassVar

import torch

from decoders.errors import DecodeError, DecoderLoadError
from decoders.media import Medium, degenerate_reason, split_batch
from polymodal.config import DecoderConfig, DecoderDefaults
from polymodal.devices import resolve_dtype
from polymodal.modality import Modality


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
        self._lock = threading.Lock()
        params = inspect.signature(self.pipeline.__call__).parameters
        self._step_end_callback = "callback_on_step_end" in params
        self.negative_prompt_embeds: torch.Tensor = self.encode_text([""])[0]

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_config(cls, config: DecoderConfig, *, device: str | torch.device = "cpu", seed: int = 0) -> "Decoder":
        """Build from ``config``: ``source="tiny"`` random components (seeded), ``"pretrained"`` strict load.

        Raises:
            DecoderLoadError: a pretrained load that is missing anything (see ``load_pipeline_strict``).
        """
        from decoders.loading import load_pipeline_strict

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

    # ------------------------------------------------------------------ rendering

    def _call_options(self, options: DecoderDefaults) -> dict:
        """Modality-specific keyword arguments of the pipeline call (sizes, frames, duration)."""
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
    ) -> list[Medium | DecodeError]:
        """Render B media from conditioning.

        Args:
            prompt_embeds: (B, Q, D_cond) (audio also (B, D_cond)); e.g. an output projector's output or
                :meth:`encode_text`.
            seeds: B seeds, one ``torch.Generator`` each: item k equals item k rendered alone.
            options: steps, guidance, size, frames, duration; ``None`` = :attr:`defaults`.
            should_cancel: polled at every denoising step; when it returns True the run stops and every
                item is a ``DecodeError(reason="cancelled")``.
            on_step: called with the step index after every denoising step.

        Returns:
            One entry per item, in order: a :class:`Medium`, or a :class:`DecodeError` for an item whose
            output is NaN / all black / silent (never returned as a black file), or for cancellation.

        Raises:
            ValueError: wrong ``prompt_embeds`` shape, seed count, or options the pipeline rejects.
        """
        seeds = [int(s) for s in seeds]
        prompt_embeds = self._check_embeds(prompt_embeds, len(seeds))
        options = options or self.defaults
        if should_cancel is not None and should_cancel():
            return [DecodeError(s, DecodeError.CANCELLED) for s in seeds]
        positive, negative = self._pipeline_embeds(prompt_embeds)

        def step(i: int) -> None:
            if on_step is not None:
                on_step(i)
            if should_cancel is not None and should_cancel():
                raise _Cancelled

        if self._step_end_callback:
            def callback_on_step_end(pipe, i, t, callback_kwargs):
                step(i)
                return callback_kwargs

            callback_kwargs = {"callback_on_step_end": callback_on_step_end}
        else:
            callback_kwargs = {"callback": lambda i, t, latents: step(i), "callback_steps": 1}

        kwargs = dict(
            prompt_embeds=positive,
            negative_prompt_embeds=negative,
            generator=[torch.Generator("cpu").manual_seed(s) for s in seeds],
            num_inference_steps=options.num_inference_steps,
            guidance_scale=options.guidance_scale,
            output_type="np",
            **self._call_options(options),
            **callback_kwargs,
        )
        with self._lock, torch.inference_mode():
            try:
                output = self.pipeline(**kwargs)
            except _Cancelled:
                return [DecodeError(s, DecodeError.CANCELLED) for s in seeds]
        items = split_batch(self._output_items(output), len(seeds))
        results: list[Medium | DecodeError] = []
        for k, (raw, seed) in enumerate(zip(items, seeds)):
            reason = degenerate_reason(self.modality, raw)
            if reason is None:
                reason = self._item_flag(output, k)
            if reason is not None:
                results.append(DecodeError(seed, reason))
                continue
            medium = self._to_medium(raw, seed, options)
            reason = degenerate_reason(self.modality, raw, medium.data)
            results.append(DecodeError(seed, reason) if reason else medium)
        return results

    def save_pretrained(self, path: str | Path) -> None:
        """Write the pipeline in the diffusers on-disk layout (model_index.json + component folders)."""
        self.pipeline.save_pretrained(str(path), safe_serialization=True)

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
