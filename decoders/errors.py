"""Errors of the decoders: per-item generation failures and refused loads."""

from __future__ import annotations


class DecodeError(Exception):
    """One item of a generation failed; returned in place of its :class:`decoders.media.Medium`.

    Attributes:
        seed: the item's seed.
        reason: ``"cancelled"``, ``"degenerate output: NaN or inf values"``, ``"degenerate output: all
            black"``, ``"degenerate output: silent audio"``, ...
    """

    CANCELLED = "cancelled"

    def __init__(self, seed: int, reason: str):
        super().__init__(seed, reason)
        self.seed = int(seed)
        self.reason = str(reason)

    def __str__(self) -> str:
        return f"decoding failed for seed {self.seed}: {self.reason}"

    @property
    def cancelled(self) -> bool:
        return self.reason == self.CANCELLED


class DecoderLoadError(RuntimeError):
    """A decoder's weights could not be loaded (missing folder or component, missing or unexpected keys,
    conditioning shape unlike the config); the decoder refuses to run. The message says what is missing
    and how to fix it."""
