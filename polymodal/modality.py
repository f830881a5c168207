"""The shared vocabulary: media modalities."""

from __future__ import annotations

from enum import Enum


class Modality(str, Enum):
    """A non-text medium the model reads or produces.

    Per-modality parts of the system live in ``dict[Modality, ...]``; never three copied blocks.
    """

    IMAGE = "image"
    AUDIO = "audio"
    VIDEO = "video"

    @classmethod
    def parse(cls, value: str | "Modality") -> "Modality":
        """Parse ``"image"`` / ``"audio"`` / ``"video"`` (case-insensitive).

        Raises:
            ValueError: naming the valid choices.
        """
        if isinstance(value, Modality):
            return value
        try:
            return cls(str(value).strip().lower())
        except ValueError:
            choices = ", ".join(m.value for m in cls)
            raise ValueError(f"unknown modality {value!r}; choose from: {choices}") from None

    @classmethod
    def parse_list(cls, value: str | list[str] | None) -> list["Modality"]:
        """Parse a comma-separated string or list, keeping order and dropping duplicates."""
        if value is None:
            return []
        items = value.split(",") if isinstance(value, str) else list(value)
        out: list[Modality] = []
        for item in items:
            if isinstance(item, str) and not item.strip():
                continue
            m = cls.parse(item)
            if m not in out:
                out.append(m)
        return out
