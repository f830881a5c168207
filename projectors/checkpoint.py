"""Projector checkpoints: one safetensors file whose metadata rebuilds the module.

Metadata (all strings, as safetensors requires):

- ``format`` = ``"polymodal.projector"``, ``format_version`` = ``"1"``
- ``type``: the registry key (``transformer``, ``linear``, ``mlp``); ``role``: ``input`` or ``output``
- output projectors: ``d_llm``, ``N`` (signal tokens), ``Q`` (queries), ``D_cond``
- input projectors: ``d_enc``, ``d_llm``, ``k`` (tokens per medium)
- ``options``: JSON of every constructor argument (sizes, ``normalize``, ``hidden_dim``, layer options)
- any ``extra_metadata`` given to :func:`save_projector` (e.g. the preset or training step)

Loading is strict by default: a missing or unexpected key, a shape mismatch or a metadata field that
differs from ``expected`` raises :class:`ProjectorLoadError` naming exactly what differs.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from projectors.base import InputProjector, OutputProjector, Projector
from projectors.input import INPUT_PROJECTORS
from projectors.output import OUTPUT_PROJECTORS

logger = logging.getLogger(__name__)

FORMAT = "polymodal.projector"
FORMAT_VERSION = "1"
REGISTRIES: dict[str, Mapping[str, type[Projector]]] = {"output": OUTPUT_PROJECTORS, "input": INPUT_PROJECTORS}
SHAPE_FIELDS: dict[str, tuple[str, ...]] = {"output": ("d_llm", "N", "Q", "D_cond"), "input": ("d_enc", "d_llm", "k")}
RESERVED_METADATA = frozenset({"format", "format_version", "type", "role", "options", "d_llm", "N", "Q", "D_cond",
                               "d_enc", "k"})
_MAX_LISTED = 20


class ProjectorLoadError(ValueError):
    """A projector checkpoint that cannot be loaded as asked: missing file, foreign file, missing or
    unexpected keys, shape mismatch, or metadata that differs from what the caller expects."""


def projector_metadata(module: Projector) -> dict[str, str]:
    """The safetensors metadata that :func:`save_projector` writes for ``module``."""
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "type": module.registry_key,
        "role": module.role,
        **{k: str(v) for k, v in module.shape_metadata().items()},
        "options": json.dumps(module.init_kwargs(), sort_keys=True),
    }
    return meta


def save_projector(module: Projector, path: str | os.PathLike[str], *,
                   extra_metadata: dict[str, str] | None = None) -> None:
    """Write ``module``'s weights and rebuild metadata to one safetensors file, atomically.

    The file is written next to ``path`` under a temporary name and moved into place with
    ``os.replace``, so a reader never sees a half-written checkpoint. Parent folders are created.
    Tensors are saved in the module's dtype, on CPU.

    Raises:
        TypeError: ``module`` is not a registered projector.
        ValueError: ``extra_metadata`` uses a reserved key or a non-string value.
    """
    registry = REGISTRIES.get(getattr(module, "role", ""), {})
    if not isinstance(module, (InputProjector, OutputProjector)) or registry.get(module.registry_key) is not type(module):
        raise TypeError(f"save_projector takes a registered projector, got {type(module).__name__}")
    meta = projector_metadata(module)
    for key, value in (extra_metadata or {}).items():
        if key in RESERVED_METADATA:
            raise ValueError(f"extra_metadata key {key!r} is reserved; reserved keys: {', '.join(sorted(RESERVED_METADATA))}")
        if not isinstance(key, str) or not isinstance(value, str):
            raise ValueError(f"extra_metadata must map str to str, got {key!r}: {value!r}")
        meta[key] = value
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in module.state_dict().items()}

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=meta)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_projector_metadata(path: str | os.PathLike[str]) -> dict[str, str]:
    """Read and check a projector checkpoint's metadata without loading its tensors.

    Raises:
        ProjectorLoadError: a missing file, a file that is not safetensors, or no projector metadata.
    """
    path = Path(path)
    if not path.is_file():
        raise ProjectorLoadError(f"projector checkpoint not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = dict(f.metadata() or {})
    except (SafetensorError, OSError, ValueError) as e:
        raise ProjectorLoadError(f"{path} is not a readable safetensors file: {e}") from e
    if meta.get("format") != FORMAT:
        raise ProjectorLoadError(
            f"{path} has no polymodal projector metadata (format {meta.get('format')!r}, expected {FORMAT!r}); "
            "write projector checkpoints with projectors.save_projector"
        )
    if meta.get("format_version") != FORMAT_VERSION:
        raise ProjectorLoadError(
            f"{path}: unsupported projector format_version {meta.get('format_version')!r} (expected {FORMAT_VERSION!r})"
        )
    role = meta.get("role")
    if role not in REGISTRIES:
        raise ProjectorLoadError(f"{path}: metadata role {role!r} is not one of: {', '.join(REGISTRIES)}")
    missing = [k for k in ("type", "options", *SHAPE_FIELDS[role]) if k not in meta]
    if missing:
        raise ProjectorLoadError(f"{path}: metadata lacks field(s): {', '.join(missing)}")
    return meta


def _options(path: Path, meta: Mapping[str, str]) -> dict[str, Any]:
    try:
        options = json.loads(meta["options"])
    except json.JSONDecodeError as e:
        raise ProjectorLoadError(f"{path}: metadata 'options' is not valid JSON: {e}") from e
    if not isinstance(options, dict):
        raise ProjectorLoadError(f"{path}: metadata 'options' must be a JSON object, got {options!r}")
    return options


def _same(recorded: Any, wanted: Any) -> bool:
    if isinstance(recorded, str) and not isinstance(wanted, str):
        return recorded == str(wanted) or recorded == json.dumps(wanted)
    try:
        return recorded == json.loads(json.dumps(wanted))
    except (TypeError, ValueError):
        return recorded == wanted


def _listed(items: list[str]) -> str:
    shown = ", ".join(items[:_MAX_LISTED])
    return shown + (f" and {len(items) - _MAX_LISTED} more" if len(items) > _MAX_LISTED else "")


def load_projector(
    path: str | os.PathLike[str], *, expected: Mapping[str, Any] | None = None, strict: bool = True,
    device: str | torch.device = "cpu",
) -> Projector:
    """Rebuild a projector from a checkpoint written by :func:`save_projector`; returned in eval mode.

    Args:
        path: the safetensors file.
        expected: fields the checkpoint must have, e.g. ``{"type": "transformer", "d_llm": 4096, "Q": 77}``.
            Keys are top-level metadata fields (``type``, ``role``, ``d_llm``, ``N``, ``Q``, ``D_cond``,
            ``d_enc``, ``k``, extra metadata) or constructor options (``hidden_dim``, ``num_layers``, ...).
        strict: missing or unexpected keys and shape mismatches are errors. With ``strict=False`` the
            matching tensors are loaded, the rest keep their random initialisation, and a warning is logged.
            ``expected`` is checked either way.
        device: where the module's parameters live.

    Raises:
        ProjectorLoadError: the file is missing or foreign; an ``expected`` field differs or is not
            recorded (naming the field, both values); the metadata names an unknown type (listing the
            choices); strict and the tensors differ (naming the missing / unexpected keys and shapes).
    """
    path = Path(path)
    meta = read_projector_metadata(path)
    role, kind = meta["role"], meta["type"]
    options = _options(path, meta)

    problems: list[str] = []
    for name, wanted in (expected or {}).items():
        if name in meta and name != "options":
            recorded: Any = meta[name]
        elif name in options:
            recorded = options[name]
        else:
            problems.append(f"{name}: not recorded in the checkpoint (recorded: "
                            f"{', '.join(sorted(set(meta) - {'options'} | set(options)))})")
            continue
        if not _same(recorded, wanted):
            problems.append(f"{name}: checkpoint has {recorded!r}, expected {wanted!r}")
    if problems:
        raise ProjectorLoadError(f"projector checkpoint {path} does not match: " + "; ".join(problems))

    registry = REGISTRIES[role]
    cls = registry.get(kind)
    if cls is None:
        raise ProjectorLoadError(f"{path}: unknown {role} projector type {kind!r}; choose from: {', '.join(registry)}")
    try:
        module = cls(**options)
    except (TypeError, ValueError) as e:
        raise ProjectorLoadError(f"{path}: cannot rebuild the {kind!r} {role} projector from its options: {e}") from e
    inconsistent = [f"{k}: metadata {meta[k]!r}, options give {v}" for k, v in module.shape_metadata().items()
                    if meta[k] != str(v)]
    if inconsistent:
        raise ProjectorLoadError(f"{path}: metadata disagrees with its own options: {'; '.join(inconsistent)}")

    with safe_open(str(path), framework="pt", device="cpu") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    own = module.state_dict()
    missing = sorted(set(own) - set(tensors))
    unexpected = sorted(set(tensors) - set(own))
    mismatched = sorted(k for k in set(own) & set(tensors) if own[k].shape != tensors[k].shape)
    details: list[str] = []
    if missing:
        details.append(f"missing key(s): {_listed(missing)}")
    if unexpected:
        details.append(f"unexpected key(s): {_listed(unexpected)}")
    if mismatched:
        details.append("shape mismatch: " + _listed(
            [f"{k} checkpoint {tuple(tensors[k].shape)} vs model {tuple(own[k].shape)}" for k in mismatched]))
    if details:
        message = f"{kind!r} {role} projector checkpoint {path}: " + "; ".join(details)
        if strict:
            raise ProjectorLoadError(message)
        logger.warning("%s (strict=False: those tensors keep their random initialisation)", message)
    usable = {k: v for k, v in tensors.items() if k in own and own[k].shape == v.shape}
    module.load_state_dict(usable, strict=False)
    return module.to(device).eval()
