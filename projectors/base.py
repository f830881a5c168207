"""Base classes shared by every projector: constructor bookkeeping, option parsing, shape checks.

A projector records the keyword arguments it was built with (:meth:`Projector.init_kwargs`), so a
checkpoint can rebuild it exactly (:func:`projectors.save_projector` / :func:`projectors.load_projector`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import nn

Role = Literal["input", "output"]

# An option spec: name -> (type, default). Types are int, float, str or bool.
OptionSpec = Mapping[str, tuple[type, Any]]


def check_positive_int(name: str, value: Any) -> int:
    """Return ``value`` if it is an int >= 1, else raise ValueError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


def _coerce_option(kind: str, name: str, value: Any, typ: type) -> Any:
    bad = ValueError(f"option {name!r} of the {kind!r} projector must be {typ.__name__}, got {value!r}")
    if typ is bool:
        if not isinstance(value, bool):
            raise bad
        return value
    if isinstance(value, bool):
        raise bad
    if typ is int:
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if not isinstance(value, int):
            raise bad
        return value
    if typ is float:
        if not isinstance(value, (int, float)):
            raise bad
        return float(value)
    if not isinstance(value, typ):
        raise bad
    return value


class Projector(nn.Module):
    """A registered projector. Subclasses set ``registry_key``, ``role`` and ``OPTIONS``.

    ``OPTIONS`` lists the keys accepted from ``ProjectorConfig.options`` with their types and defaults.
    """

    registry_key: ClassVar[str]
    role: ClassVar[Role]
    OPTIONS: ClassVar[OptionSpec] = {}
    USES_HIDDEN_DIM: ClassVar[bool] = False  # whether ``ProjectorConfig.hidden_dim`` is a constructor argument

    def __init__(self, **init_kwargs: Any) -> None:
        super().__init__()
        self._init_kwargs = dict(init_kwargs)

    def init_kwargs(self) -> dict[str, Any]:
        """The keyword arguments that rebuild this projector (JSON-serialisable)."""
        return dict(self._init_kwargs)

    def shape_metadata(self) -> dict[str, int]:
        """The sizes recorded at the top level of a checkpoint's metadata."""
        raise NotImplementedError

    @classmethod
    def parse_options(cls, options: Mapping[str, Any]) -> dict[str, Any]:
        """Validate ``ProjectorConfig.options`` against ``OPTIONS`` and fill defaults.

        Raises:
            ValueError: an unknown option (naming the accepted ones) or a value of the wrong type.
        """
        unknown = sorted(set(options) - set(cls.OPTIONS))
        if unknown:
            accepted = ", ".join(sorted(cls.OPTIONS)) or "(none)"
            raise ValueError(
                f"unknown option(s) {', '.join(map(repr, unknown))} for the {cls.registry_key!r} "
                f"{cls.role} projector; accepted: {accepted}"
            )
        return {
            name: _coerce_option(cls.registry_key, name, options.get(name, default), typ)
            for name, (typ, default) in cls.OPTIONS.items()
        }

    def _param_dtype(self) -> torch.dtype:
        for p in self.parameters():
            return p.dtype
        return torch.get_default_dtype()


class OutputProjector(Projector):
    """Maps signal-token states of one group into a diffusion decoder's conditioning space.

    ``forward(hidden_states (B, N, D_llm), token_embeds (B, N, D_llm)) -> (B, Q, D_cond)``. The input
    is ``hidden_states + token_embeds`` (NExT-GPT: last-layer hidden state at each signal token plus
    that token's input embedding). With ``normalize=True`` the output is L2-normalised over D_cond
    (AudioLDM's CLAP space), inside the projector so that training and inference agree.
    Inputs are cast to the projector's parameter dtype; the output has that dtype.

    Subclasses implement ``_project(x (B, N, D_llm)) -> (B, Q, D_cond)``.
    """

    role: ClassVar[Role] = "output"

    def __init__(
        self, *, d_llm: int, num_signal_tokens: int, num_queries: int, cond_dim: int, normalize: bool,
        **options: Any,
    ) -> None:
        check_positive_int("d_llm", d_llm)
        check_positive_int("num_signal_tokens (N)", num_signal_tokens)
        check_positive_int("num_queries (Q)", num_queries)
        check_positive_int("cond_dim (D_cond)", cond_dim)
        if not isinstance(normalize, bool):
            raise ValueError(f"normalize must be a bool, got {normalize!r}")
        super().__init__(
            d_llm=d_llm, num_signal_tokens=num_signal_tokens, num_queries=num_queries, cond_dim=cond_dim,
            normalize=normalize, **options,
        )
        self.d_llm = d_llm
        self.num_signal_tokens = num_signal_tokens
        self.num_queries = num_queries
        self.cond_dim = cond_dim
        self.normalize = normalize

    def shape_metadata(self) -> dict[str, int]:
        return {"d_llm": self.d_llm, "N": self.num_signal_tokens, "Q": self.num_queries, "D_cond": self.cond_dim}

    def forward(self, hidden_states: torch.Tensor, token_embeds: torch.Tensor) -> torch.Tensor:
        """Project one signal group per batch item.

        Args:
            hidden_states: (B, N, D_llm) last-layer hidden states (after the final norm) at the signal tokens.
            token_embeds: (B, N, D_llm) the input embeddings of those signal tokens.

        Returns:
            (B, Q, D_cond) conditioning embeddings (unit L2 norm over D_cond when ``normalize``).

        Raises:
            ValueError: a shape other than (B, N, D_llm) for either input.
        """
        expected = (self.num_signal_tokens, self.d_llm)
        for name, t in (("hidden_states", hidden_states), ("token_embeds", token_embeds)):
            if t.dim() != 3 or tuple(t.shape[1:]) != expected:
                raise ValueError(
                    f"{name} must have shape (B, N={expected[0]}, D_llm={expected[1]}), got {tuple(t.shape)}"
                )
        if hidden_states.shape[0] != token_embeds.shape[0]:
            raise ValueError(
                f"hidden_states and token_embeds differ in batch size: "
                f"{hidden_states.shape[0]} != {token_embeds.shape[0]}"
            )
        x = (hidden_states + token_embeds).to(self._param_dtype())
        out = self._project(x)
        if self.normalize:
            out = F.normalize(out.float(), p=2.0, dim=-1).to(out.dtype)
        return out

    def _project(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError


class InputProjector(Projector):
    """Maps each encoder token of a medium into k LLM input embeddings.

    ``forward(media_embeds (B, N, D_enc)) -> (B, N * k, D_llm)``: every one of the N encoder tokens (N = 1 for a
    pooled embedding, 1 + P for patch tokens, see :mod:`polymodal.encoders`) is projected alone, in order, by the
    same weights (LLaVA's projector on CLIP patches). Inputs are cast to the parameter dtype. Subclasses
    implement ``_project(x (M, D_enc)) -> (M, k, D_llm)``.
    """

    role: ClassVar[Role] = "input"

    def __init__(self, *, d_enc: int, d_llm: int, num_tokens: int, **options: Any) -> None:
        check_positive_int("d_enc", d_enc)
        check_positive_int("d_llm", d_llm)
        check_positive_int("num_tokens (k)", num_tokens)
        super().__init__(d_enc=d_enc, d_llm=d_llm, num_tokens=num_tokens, **options)
        self.d_enc = d_enc
        self.d_llm = d_llm
        self.num_tokens = num_tokens

    def shape_metadata(self) -> dict[str, int]:
        return {"d_enc": self.d_enc, "d_llm": self.d_llm, "k": self.num_tokens}

    def prompt_tokens(self, encoder_tokens: int = 1) -> int:
        """Prompt embeddings per medium: N * k for N encoder tokens."""
        return encoder_tokens * self.num_tokens

    def forward(self, media_embeds: torch.Tensor) -> torch.Tensor:
        """Project media embeddings.

        Args:
            media_embeds: (B, N, D_enc) encoder tokens per medium (``Encoder.encode_tokens``), or (B, D_enc) for
                one pooled embedding per medium (N = 1).

        Returns:
            (B, N * k, D_llm) prompt embeddings for the medium: tokens of encoder token 0 first.

        Raises:
            ValueError: a shape other than (B, N, D_enc) or (B, D_enc).
        """
        x = media_embeds[:, None] if media_embeds.dim() == 2 else media_embeds
        if x.dim() != 3 or x.shape[2] != self.d_enc:
            raise ValueError(f"media_embeds must have shape (B, N, D_enc={self.d_enc}) or (B, D_enc), got "
                             f"{tuple(media_embeds.shape)}")
        b, n = x.shape[:2]
        out = self._project(x.reshape(b * n, self.d_enc).to(self._param_dtype()))  # (B * N, k, D_llm)
        return out.reshape(b, n * self.num_tokens, self.d_llm)

    def _project(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError
