"""Strict loading of transformers models for the skills (a folder or a hub id), shared by the speech backends.

Like the decoders and encoders: a folder with missing, unexpected or mismatched weights is an error
(:class:`skills.base.SkillLoadError`), never a half-random model; a path that is neither a folder nor a hub id is
never sent to the hub.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from skills.base import SkillLoadError


def read_model_type(path: str, what: str, *, example: str) -> str | None:
    """The ``model_type`` of the model at ``path`` (a folder's ``config.json``, or the hub's config).

    Args:
        what: the component, for messages (``"ASR"``, ``"TTS"``). example: a hub id to show in messages.

    Raises:
        SkillLoadError: a folder without ``config.json``; a path that is no folder and no hub id; a hub id that
            cannot be fetched.
    """
    import transformers

    folder = Path(path).expanduser()
    if folder.is_dir():
        cfg_file = folder / "config.json"
        if not cfg_file.is_file():
            raise SkillLoadError(f"{what}: {cfg_file} is missing; not a transformers model folder")
        return json.loads(cfg_file.read_text()).get("model_type")
    if path.startswith((".", "/", "~")) or path.count("/") != 1:  # not a hub id: never ask the hub
        raise SkillLoadError(f"{what}: folder {str(folder)!r} does not exist and {path!r} is not a local folder nor "
                             f"a hub id such as {example!r}")
    try:
        return transformers.AutoConfig.from_pretrained(path).model_type
    except (OSError, ValueError) as e:
        raise SkillLoadError(f"{what}: {path!r} is not a local folder and could not be fetched from the hub "
                             f"({type(e).__name__}: {e}); download it where the hub is reachable and pass the "
                             "folder") from e


def torch_dtype(device: str, dtype: str):
    """float32 on CPU or when asked; else ``bfloat16`` / ``float16`` (``auto``)."""
    import torch

    if device == "cpu" or dtype == "float32":
        return torch.float32
    return torch.bfloat16 if dtype == "bfloat16" else torch.float16


def load_strict(model_class: str, path: str, *, device: str = "cpu", dtype: str = "auto", what: str = "model",
                **kwargs: Any):
    """``transformers.<model_class>.from_pretrained(path)`` on ``device`` in eval mode, refusing partial loads.

    Raises:
        SkillLoadError: the load fails, or any weight is missing, unexpected or mismatched.
    """
    import transformers
    from packaging.version import Version

    cls = getattr(transformers, model_class)
    dtype_kwarg = "dtype" if Version(transformers.__version__) >= Version("4.56") else "torch_dtype"
    # the checks below replace transformers' own load report (and transformers 5's tensor-parallel note)
    quiet = [logging.getLogger(f"transformers.{n}") for n in ("modeling_utils", "distributed.tensor_parallel")]
    levels = [q.level for q in quiet]
    for q in quiet:
        q.setLevel(logging.ERROR)
    try:
        model, info = cls.from_pretrained(path, output_loading_info=True,
                                          **{dtype_kwarg: torch_dtype(device, dtype)}, **kwargs)
    except (OSError, ValueError, KeyError) as e:
        raise SkillLoadError(f"{what}: cannot load {model_class} from {path!r}: {e}") from e
    finally:
        for q, lv in zip(quiet, levels):
            q.setLevel(lv)
    missing = sorted(info.get("missing_keys") or [])
    unexpected = sorted(info.get("unexpected_keys") or [])
    mismatched = sorted(str(k) for k in (info.get("mismatched_keys") or []))
    if missing or unexpected or mismatched:
        raise SkillLoadError(f"{what}: {model_class} from {path!r}: missing weights {missing[:5]}, unexpected "
                             f"{unexpected[:5]}, mismatched {mismatched[:5]} (refusing to run with partly random "
                             "weights)")
    return model.to(device).eval()
