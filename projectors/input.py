"""Input projectors: each encoder token (B, N, D_enc) -> k LLM input embeddings, (B, N * k, D_llm).

Registry :data:`INPUT_PROJECTORS`:

- ``linear``: NExT-GPT's ``Linear(1024, D_llm)`` on the ImageBind embedding, one token per input (k = 1).
- ``mlp``: ``Linear(D_enc -> hidden_dim) -> GELU -> Linear(hidden_dim -> k * D_llm)``, k tokens.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from projectors.base import InputProjector, OptionSpec, check_positive_int


class LinearInputProjector(InputProjector):
    """``Linear(D_enc -> D_llm)``, one token per medium (NExT-GPT's input projection, k = 1).

    Parameter names: ``fc.weight`` (D_llm, D_enc), ``fc.bias`` (D_llm,) (NExT-GPT: ``llama_proj.*``).

    Raises:
        ValueError: ``num_tokens`` other than 1 (use ``mlp`` for several tokens).
    """

    registry_key: ClassVar[str] = "linear"
    OPTIONS: ClassVar[OptionSpec] = {}

    def __init__(self, *, d_enc: int, d_llm: int, num_tokens: int = 1) -> None:
        if num_tokens != 1:
            raise ValueError(
                f"the 'linear' input projector gives one token per medium (k = 1), got k = {num_tokens}; "
                "use kind 'mlp' for several tokens"
            )
        super().__init__(d_enc=d_enc, d_llm=d_llm, num_tokens=num_tokens)
        self.fc = nn.Linear(d_enc, d_llm)

    def _project(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x).unsqueeze(1)  # (B, 1, D_llm)


class MLPInputProjector(InputProjector):
    """``Linear(D_enc -> hidden_dim) -> GELU -> Linear(hidden_dim -> k * D_llm)``, reshaped to (B, k, D_llm).

    Parameter names: ``fc1.weight`` (hidden_dim, D_enc), ``fc1.bias``, ``fc2.weight`` (k * D_llm, hidden_dim),
    ``fc2.bias``; rows ``t * D_llm : (t + 1) * D_llm`` of ``fc2`` produce token t.
    """

    registry_key: ClassVar[str] = "mlp"
    USES_HIDDEN_DIM: ClassVar[bool] = True
    OPTIONS: ClassVar[OptionSpec] = {}

    def __init__(self, *, d_enc: int, d_llm: int, num_tokens: int = 1, hidden_dim: int = 512) -> None:
        check_positive_int("hidden_dim", hidden_dim)
        super().__init__(d_enc=d_enc, d_llm=d_llm, num_tokens=num_tokens, hidden_dim=hidden_dim)
        self.hidden_dim = hidden_dim
        self.fc1 = nn.Linear(d_enc, hidden_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_dim, num_tokens * d_llm)

    def _project(self, x: torch.Tensor) -> torch.Tensor:
        out = self.fc2(self.act(self.fc1(x)))  # (B, k * D_llm)
        return out.view(x.shape[0], self.num_tokens, self.d_llm)


INPUT_PROJECTORS: dict[str, type[InputProjector]] = {
    cls.registry_key: cls for cls in (LinearInputProjector, MLPInputProjector)
}
