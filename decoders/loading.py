"""Strict loading of a stock diffusers pipeline from a diffusers model folder or hub id.

Follows the diffusers on-disk layout (``model_index.json`` naming each component's library and class, one
sub-folder per component). Every weight-bearing component is loaded with the library's own
``from_pretrained(..., output_loading_info=True)`` so that the library's key conversions and ignore lists
apply, and any missing, unexpected or mismatched key is an error (diffusers and transformers only warn).
The loaded components are then handed to the stock ``Pipeline.from_pretrained`` (which loads the rest:
tokenizer, scheduler, feature extractor).
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import torch

from decoders.errors import DecoderLoadError

_SHOW_KEYS = 5


def _dtype_kwarg(cls: type) -> str:
    """``dtype`` where the installed library takes it (transformers >= 4.56, diffusers with
    ``_resolve_dtype``), else the older ``torch_dtype``."""
    if cls.__module__.startswith("transformers"):
        import transformers
        from packaging.version import Version

        return "dtype" if Version(transformers.__version__) >= Version("4.56") else "torch_dtype"
    try:
        from diffusers.utils.deprecation_utils import _resolve_dtype  # noqa: F401
    except ImportError:
        return "torch_dtype"
    return "dtype"


def resolve_folder(path: str | None, *, what: str) -> Path:
    """A local diffusers folder, or the cached snapshot of a hub id (downloaded if the hub is reachable).

    Raises:
        DecoderLoadError: no path, or neither a folder nor a hub id that can be fetched.
    """
    if not path:
        raise DecoderLoadError(f"{what}: source='pretrained' needs `path` (a hub id or a local diffusers folder)")
    p = Path(path).expanduser()
    if p.is_dir():
        return p
    looks_local = path.startswith((".", "/", "~")) or path.count("/") != 1
    if looks_local:
        raise DecoderLoadError(
            f"{what}: folder {str(p)!r} does not exist; point `path` at a diffusers model folder "
            "(with model_index.json) or at a hub id such as 'stable-diffusion-v1-5/stable-diffusion-v1-5'"
        )
    from diffusers import DiffusionPipeline

    try:
        return Path(DiffusionPipeline.download(path))
    except Exception as exc:  # network, auth, missing repo: all make the decoder refuse
        raise DecoderLoadError(
            f"{what}: {path!r} is not a local folder and could not be fetched from the hub ({type(exc).__name__}: "
            f"{exc}). Download it where the hub is reachable (`hf download {path} --local-dir DIR`) and set "
            "`path` to DIR"
        ) from exc


def _resolve_class(library: str, class_name: str, *, what: str) -> type:
    candidates = [library] if library in ("diffusers", "transformers") else [f"diffusers.pipelines.{library}", library]
    for module_name in candidates:
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            continue
        if hasattr(module, class_name):
            return getattr(module, class_name)
    raise DecoderLoadError(f"{what}: class {class_name!r} of library {library!r} is not available")


def _keys(keys) -> str:
    keys = sorted(keys)
    more = f" (+{len(keys) - _SHOW_KEYS} more)" if len(keys) > _SHOW_KEYS else ""
    return ", ".join(keys[:_SHOW_KEYS]) + more


def load_pipeline_strict(pipeline_classes: tuple[type, ...], path: str | None, *, torch_dtype: torch.dtype):
    """Load a pipeline from ``path`` (hub id or local diffusers folder), refusing anything partial.

    Args:
        pipeline_classes: the accepted pipeline classes; the folder's ``model_index.json`` (``_class_name``)
            says which one it holds, and any other class is refused.

    Raises:
        DecoderLoadError: missing folder, missing ``model_index.json``, a pipeline of another class, a
            required component absent from the index or its folder missing, a component that fails to
            load, or missing / unexpected / mismatched weight keys. The message names the component.
    """
    accepted = tuple(pipeline_classes)
    names = " or ".join(c.__name__ for c in accepted)
    what = f"{names} at {path!r}"
    folder = resolve_folder(path, what=what)
    index_file = folder / "model_index.json"
    if not index_file.is_file():
        raise DecoderLoadError(
            f"{what}: {index_file} is missing; this is not a diffusers pipeline folder "
            f"(save one with `{accepted[0].__name__}.save_pretrained(DIR)`)"
        )
    try:
        index = json.loads(index_file.read_text())
    except json.JSONDecodeError as exc:
        raise DecoderLoadError(f"{what}: {index_file} is not valid JSON ({exc})") from exc
    class_name = index.get("_class_name")
    by_name = {c.__name__: c for c in accepted}
    if class_name not in by_name:
        raise DecoderLoadError(f"{what}: model_index.json declares pipeline {class_name!r}, expected {names}")
    pipeline_class = by_name[class_name]
    what = f"{class_name} at {path!r}"

    expected, _ = pipeline_class._get_signature_keys(pipeline_class)
    optional = set(getattr(pipeline_class, "_optional_components", []) or [])
    modules: dict[str, object] = {}
    for name in expected:
        entry = index.get(name)
        if entry is None or entry == [None, None] or (isinstance(entry, list) and entry[0] is None):
            if name in optional:
                modules[name] = None
                continue
            raise DecoderLoadError(f"{what}: required component {name!r} is missing from model_index.json")
        library, cls_name = entry
        sub = folder / name
        if not sub.is_dir():
            raise DecoderLoadError(f"{what}: component folder {str(sub)!r} ({cls_name}) is missing")
        cls = _resolve_class(library, cls_name, what=f"{what}, component {name!r}")
        if not (isinstance(cls, type) and issubclass(cls, torch.nn.Module)):
            continue  # tokenizer / scheduler / processor: loaded by the stock pipeline below
        try:
            model, info = cls.from_pretrained(
                str(sub), output_loading_info=True, **{_dtype_kwarg(cls): torch_dtype}
            )
        except Exception as exc:
            raise DecoderLoadError(
                f"{what}: component {name!r} ({cls_name}) failed to load from {sub}: {type(exc).__name__}: {exc}"
            ) from exc
        problems = []
        for kind in ("missing_keys", "unexpected_keys", "mismatched_keys"):
            keys = info.get(kind) or []
            if kind == "mismatched_keys":
                keys = [k[0] if isinstance(k, (tuple, list)) else k for k in keys]
            if keys:
                problems.append(f"{len(keys)} {kind.replace('_', ' ')}: {_keys(keys)}")
        if info.get("error_msgs"):
            problems.append("errors: " + "; ".join(map(str, info["error_msgs"]))[:500])
        if problems:
            raise DecoderLoadError(
                f"{what}: weights of component {name!r} ({cls_name}) in {sub} do not match its config: "
                + "; ".join(problems)
                + ". The folder is incomplete or from another model; re-download or re-save it"
            )
        modules[name] = model
    try:
        pipe = pipeline_class.from_pretrained(str(folder), **{_dtype_kwarg(pipeline_class): torch_dtype}, **modules)
    except Exception as exc:
        raise DecoderLoadError(f"{what}: the pipeline failed to load: {type(exc).__name__}: {exc}") from exc
    return pipe
