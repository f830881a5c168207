"""Builders: a :class:`polymodal.config.ProjectorConfig` plus the sizes around it -> a projector module."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from typing import Any

import torch

from polymodal.config import ProjectorConfig
from projectors.base import InputProjector, OutputProjector, Projector, check_positive_int
from projectors.checkpoint import load_projector
from projectors.input import INPUT_PROJECTORS
from projectors.output import OUTPUT_PROJECTORS


@contextlib.contextmanager
def _seeded(seed: int | None) -> Iterator[None]:
    if seed is None:
        yield
        return
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def _lookup(registry: Mapping[str, type[Projector]], kind: str, role: str) -> type[Projector]:
    cls = registry.get(kind)
    if cls is None:
        raise ValueError(f"unknown {role} projector kind {kind!r}; choose from: {', '.join(registry)}")
    return cls


def _build(cls: type[Projector], config: ProjectorConfig, kwargs: dict[str, Any], seed: int | None) -> Projector:
    kwargs = {**kwargs, **cls.parse_options(config.options)}
    if cls.USES_HIDDEN_DIM:
        kwargs["hidden_dim"] = config.hidden_dim
    if config.checkpoint is not None:
        return load_projector(config.checkpoint, expected={"type": config.kind, "role": cls.role, **kwargs})
    with _seeded(seed):
        return cls(**kwargs)


def build_output_projector(
    config: ProjectorConfig, *, d_llm: int, num_signal_tokens: int, cond_shape: tuple[int, int],
    normalize: bool = False, seed: int | None = None,
) -> OutputProjector:
    """Build the output projector of one modality: (B, N, D_llm) x2 -> (B, Q, D_cond).

    Args:
        config: ``kind`` (a key of ``OUTPUT_PROJECTORS``), ``hidden_dim`` (d_model of ``transformer``,
            hidden size of ``mlp``), ``options`` (per kind, see each class's ``OPTIONS``), ``checkpoint``.
        d_llm: D_llm, the LLM's hidden size.
        num_signal_tokens: N, the modality's signal-token count.
        cond_shape: (Q, D_cond), the decoder's ``prompt_embeds`` shape (Q = 1 for AudioLDM).
        normalize: L2-normalise the output over D_cond (AudioLDM's CLAP space).
        seed: seed of the random initialisation (``None``: torch's global generator); the global RNG
            state is left untouched when given.

    With ``config.checkpoint`` the module is loaded strictly from that file, which must record the same
    type, sizes and options. ``config.num_queries``, when set (not ``None``), must equal Q.

    Raises:
        ValueError: an unknown kind (listing the choices), an unknown or ill-typed option, Q disagreeing
            with an explicit ``config.num_queries``, invalid sizes.
        ProjectorLoadError: the checkpoint is missing or differs from the config.
    """
    cls = _lookup(OUTPUT_PROJECTORS, config.kind, "output")
    if len(cond_shape) != 2:
        raise ValueError(f"cond_shape must be (Q, D_cond), got {cond_shape!r}")
    num_queries, cond_dim = (check_positive_int("Q", cond_shape[0]), check_positive_int("D_cond", cond_shape[1]))
    if config.num_queries is not None and config.num_queries != num_queries:
        raise ValueError(
            f"config.num_queries ({config.num_queries}) disagrees with the decoder's Q ({num_queries}) "
            f"of cond_shape {tuple(cond_shape)}"
        )
    kwargs = dict(d_llm=d_llm, num_signal_tokens=num_signal_tokens, num_queries=num_queries, cond_dim=cond_dim,
                  normalize=normalize)
    return _build(cls, config, kwargs, seed)  # type: ignore[return-value]


def build_input_projector(
    config: ProjectorConfig, *, d_enc: int, d_llm: int, seed: int | None = None,
) -> InputProjector:
    """Build the input projector of one modality: (B, N, D_enc) -> (B, N * k, D_llm), k = ``config.num_queries``.

    ``linear`` (NExT-GPT: ``Linear(1024, D_llm)``) needs k = 1; ``mlp`` gives k tokens. ``seed`` and
    ``config.checkpoint`` as in :func:`build_output_projector`.

    Raises:
        ValueError: an unknown kind (listing the choices), an unknown option, k != 1 for ``linear``.
        ProjectorLoadError: the checkpoint is missing or differs from the config.
    """
    cls = _lookup(INPUT_PROJECTORS, config.kind, "input")
    kwargs = dict(d_enc=d_enc, d_llm=d_llm, num_tokens=config.num_queries or 1)
    return _build(cls, config, kwargs, seed)  # type: ignore[return-value]
