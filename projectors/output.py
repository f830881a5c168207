"""Output projectors: signal-token states (B, N, D_llm) -> decoder conditioning (B, Q, D_cond).

Registry :data:`OUTPUT_PROJECTORS`:

- ``transformer``: NExT-GPT's layout (paper arXiv 2309.05519; ``TextFcLayer`` in "transformer" mode of
  its ``code/model/layers.py``), required by the ``nextgpt-7b`` preset.
- ``linear``: per-token Linear(D_llm -> D_cond), then token mixing N -> Q.
- ``mlp``: per-token Linear -> GELU -> Linear, then the same token mixing.
"""

from __future__ import annotations

import warnings
from typing import ClassVar

import torch
from torch import nn

from projectors.base import OptionSpec, OutputProjector, check_positive_int

MIXING_CHOICES = ("learned", "mean")

# NExT-GPT's released key names (per modality, below a prefix such as ``gen_text_hidden_fcs.0.``) ->
# the names of :class:`TransformerOutputProjector`. The submodules below ``tfm.`` / ``transformer.`` are
# torch's own ``nn.Transformer`` names and stay the same.
NEXTGPT_TRANSFORMER_KEY_MAP: dict[str, str] = {
    "fc.": "fc.",
    "tfm.": "transformer.",
    "query_embs": "query_embs",
    "model.": "out_fc.",
}


class TransformerOutputProjector(OutputProjector):
    """NExT-GPT's output projector ("transformer" mode of its ``TextFcLayer``).

    Layout::

        x = hidden_states + token_embeds                      (B, N, D_llm)
        fc:          Linear(D_llm -> d_model)                 (B, N, d_model)
        transformer: nn.Transformer(d_model, num_heads, num_layers encoder + num_layers decoder layers,
                     ff_dim, dropout, batch_first=True, norm_first=True)
                     src = fc(x); tgt = query_embs expanded   (B, Q, d_model)
        out_fc:      Linear(d_model -> D_cond)                (B, Q, D_cond)

    NExT-GPT sizes: d_model (``hidden_dim``) 512, 4 heads, 4 + 4 layers, ff 2048, dropout 0; Q 77 and
    D_cond 768 (SD v1.5) or 1024 (zeroscope), Q 1 and D_cond 512 for AudioLDM (normalised).

    Parameter names (stable; the NExT-GPT checkpoint converter maps onto them, see
    :data:`NEXTGPT_TRANSFORMER_KEY_MAP`):

    - ``fc.weight`` (d_model, D_llm), ``fc.bias`` (d_model,)            <- NExT-GPT ``fc.*``
    - ``transformer.encoder.layers.{i}.*``, ``transformer.encoder.norm.*``,
      ``transformer.decoder.layers.{i}.*``, ``transformer.decoder.norm.*`` (torch ``nn.Transformer``
      names)                                                           <- NExT-GPT ``tfm.*``
    - ``query_embs`` (1, Q, d_model)                                   <- NExT-GPT ``query_embs``
    - ``out_fc.weight`` (D_cond, d_model), ``out_fc.bias`` (D_cond,)    <- NExT-GPT ``model.*``

    Raises:
        ValueError: a non-positive size, ``num_heads`` not dividing ``hidden_dim``, dropout outside [0, 1).
    """

    registry_key: ClassVar[str] = "transformer"
    USES_HIDDEN_DIM: ClassVar[bool] = True
    OPTIONS: ClassVar[OptionSpec] = {
        "num_layers": (int, 4),
        "num_heads": (int, 4),
        "ff_dim": (int, 2048),
        "dropout": (float, 0.0),
    }

    def __init__(
        self, *, d_llm: int, num_signal_tokens: int, num_queries: int, cond_dim: int, normalize: bool = False,
        hidden_dim: int = 512, num_layers: int = 4, num_heads: int = 4, ff_dim: int = 2048, dropout: float = 0.0,
    ) -> None:
        check_positive_int("hidden_dim (d_model)", hidden_dim)
        check_positive_int("num_layers", num_layers)
        check_positive_int("num_heads", num_heads)
        check_positive_int("ff_dim", ff_dim)
        if hidden_dim % num_heads:
            raise ValueError(f"num_heads ({num_heads}) must divide hidden_dim ({hidden_dim})")
        if not 0.0 <= float(dropout) < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
        super().__init__(
            d_llm=d_llm, num_signal_tokens=num_signal_tokens, num_queries=num_queries, cond_dim=cond_dim,
            normalize=normalize, hidden_dim=hidden_dim, num_layers=num_layers, num_heads=num_heads,
            ff_dim=ff_dim, dropout=float(dropout),
        )
        self.hidden_dim = hidden_dim
        self.fc = nn.Linear(d_llm, hidden_dim)
        with warnings.catch_warnings():
            # torch notes that its nested-tensor fast path is off with norm_first; that is expected here.
            warnings.filterwarnings("ignore", message="enable_nested_tensor is True")
            self.transformer = nn.Transformer(
                d_model=hidden_dim, nhead=num_heads, num_encoder_layers=num_layers,
                num_decoder_layers=num_layers, dim_feedforward=ff_dim, dropout=float(dropout),
                batch_first=True, norm_first=True,
            )
        self.query_embs = nn.Parameter(torch.randn(1, num_queries, hidden_dim))
        self.out_fc = nn.Linear(hidden_dim, cond_dim)

    def _project(self, x: torch.Tensor) -> torch.Tensor:
        src = self.fc(x)  # (B, N, d_model)
        tgt = self.query_embs.expand(x.shape[0], -1, -1)  # (B, Q, d_model)
        return self.out_fc(self.transformer(src, tgt))  # (B, Q, D_cond)


class TokenMixer(nn.Module):
    """Mixes N token vectors into Q: (B, N, D) -> (B, Q, D).

    ``mixing="learned"``: ``weight`` (Q, N) and ``bias`` (Q,) of an ``nn.Linear(N, Q)`` applied along the
    token axis, initialised to mean pooling (every weight 1/N, bias 0).
    ``mixing="mean"``: parameter-free mean over N; only for Q = 1.
    """

    def __init__(self, num_signal_tokens: int, num_queries: int, mixing: str) -> None:
        super().__init__()
        if mixing not in MIXING_CHOICES:
            raise ValueError(f"unknown mixing {mixing!r}; choose from: {', '.join(MIXING_CHOICES)}")
        if mixing == "mean" and num_queries != 1:
            raise ValueError(f"mixing='mean' gives one token; it needs Q = 1, got Q = {num_queries}")
        self.mixing = mixing
        self.mix = None
        if mixing == "learned":
            self.mix = nn.Linear(num_signal_tokens, num_queries)
            with torch.no_grad():
                self.mix.weight.fill_(1.0 / num_signal_tokens)
                self.mix.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mix is None:
            return x.mean(dim=1, keepdim=True)
        return self.mix(x.transpose(1, 2)).transpose(1, 2)


class LinearOutputProjector(OutputProjector):
    """Per-token ``Linear(D_llm -> D_cond)``, then token mixing N -> Q (:class:`TokenMixer`).

    Parameter names: ``fc.weight`` (D_cond, D_llm), ``fc.bias``; ``mixer.mix.weight`` (Q, N) and
    ``mixer.mix.bias`` (Q,) with ``mixing="learned"`` (the default; none with ``"mean"``).
    ``hidden_dim`` of the config is not used.
    """

    registry_key: ClassVar[str] = "linear"
    OPTIONS: ClassVar[OptionSpec] = {"mixing": (str, "learned")}

    def __init__(
        self, *, d_llm: int, num_signal_tokens: int, num_queries: int, cond_dim: int, normalize: bool = False,
        mixing: str = "learned",
    ) -> None:
        super().__init__(
            d_llm=d_llm, num_signal_tokens=num_signal_tokens, num_queries=num_queries, cond_dim=cond_dim,
            normalize=normalize, mixing=mixing,
        )
        self.fc = nn.Linear(d_llm, cond_dim)
        self.mixer = TokenMixer(num_signal_tokens, num_queries, mixing)

    def _project(self, x: torch.Tensor) -> torch.Tensor:
        return self.mixer(self.fc(x))


class MLPOutputProjector(OutputProjector):
    """Per-token ``Linear(D_llm -> hidden_dim) -> GELU -> Linear(hidden_dim -> D_cond)``, then mixing N -> Q.

    Parameter names: ``fc1.*``, ``fc2.*``, and ``mixer.mix.*`` as in :class:`LinearOutputProjector`.
    """

    registry_key: ClassVar[str] = "mlp"
    USES_HIDDEN_DIM: ClassVar[bool] = True
    OPTIONS: ClassVar[OptionSpec] = {"mixing": (str, "learned")}

    def __init__(
        self, *, d_llm: int, num_signal_tokens: int, num_queries: int, cond_dim: int, normalize: bool = False,
        hidden_dim: int = 512, mixing: str = "learned",
    ) -> None:
        check_positive_int("hidden_dim", hidden_dim)
        super().__init__(
            d_llm=d_llm, num_signal_tokens=num_signal_tokens, num_queries=num_queries, cond_dim=cond_dim,
            normalize=normalize, hidden_dim=hidden_dim, mixing=mixing,
        )
        self.hidden_dim = hidden_dim
        self.fc1 = nn.Linear(d_llm, hidden_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_dim, cond_dim)
        self.mixer = TokenMixer(num_signal_tokens, num_queries, mixing)

    def _project(self, x: torch.Tensor) -> torch.Tensor:
        return self.mixer(self.fc2(self.act(self.fc1(x))))


OUTPUT_PROJECTORS: dict[str, type[OutputProjector]] = {
    cls.registry_key: cls for cls in (TransformerOutputProjector, LinearOutputProjector, MLPOutputProjector)
}

