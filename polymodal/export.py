"""Exports of trained parts (training and the NExT-GPT converter write them; generate/serve load them).

Layout of an export folder::

    export.json                      {"format": "polymodal-export", "version": 1, "preset": ..., "parts": [...]}
    input_{modality}.safetensors     input projector  (projectors.save_projector)
    output_{modality}.safetensors    output projector (projectors.save_projector)
    token_rows.safetensors           new token rows: "input_embeddings" (T_new, D_llm) and optionally
                                     "output_embeddings" (T_new, D_llm); metadata "tokens": JSON list of
                                     the token strings, row order
    lora/                            a peft LoRA adapter folder (adapter_config.json, adapter_model.safetensors)

Every part is optional, but a folder given as an export must hold at least one, and every part its
``export.json`` lists must be there (:func:`export_problems`, checked at start-up and before a stage loads);
what is present is loaded strictly (a token the tokenizer lacks, a row of the wrong width, a LoRA for other
modules: an error naming it).
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

EXPORT_FORMAT = "polymodal-export"
EXPORT_VERSION = 1


class ExportError(ValueError):
    """An export folder is malformed or does not fit the model it is applied to."""


def _atomic_save(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, tmp, metadata=metadata)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_token_rows(path: str | Path, tokens: list[str], input_rows: torch.Tensor,
                    output_rows: torch.Tensor | None = None) -> None:
    """Write new token rows: ``input_rows`` (T_new, D_llm), optional ``output_rows`` (T_new, D_llm).

    Raises:
        ExportError: row count differs from ``len(tokens)``.
    """
    if input_rows.shape[0] != len(tokens) or (output_rows is not None and output_rows.shape[0] != len(tokens)):
        raise ExportError(f"{len(tokens)} tokens but {input_rows.shape[0]} rows")
    tensors = {"input_embeddings": input_rows.float()}
    if output_rows is not None:
        tensors["output_embeddings"] = output_rows.float()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _atomic_save(tensors, path, {"format": EXPORT_FORMAT, "tokens": json.dumps(tokens)})


def write_manifest(directory: str | Path, preset: str, parts: list[str], extra: dict[str, Any] | None = None) -> None:
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    body = {"format": EXPORT_FORMAT, "version": EXPORT_VERSION, "preset": preset, "parts": sorted(parts), **(extra or {})}
    fd, tmp = tempfile.mkstemp(dir=d, prefix=".export.json.", suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(body, f, indent=2)
    os.replace(tmp, d / "export.json")


def read_manifest(directory: str | Path) -> dict[str, Any]:
    """Read ``export.json``.

    Raises:
        ExportError: missing folder or manifest, or another format/version.
    """
    p = Path(directory) / "export.json"
    if not p.is_file():
        raise ExportError(f"{directory} is not a polymodal export (no export.json)")
    body = json.loads(p.read_text())
    if body.get("format") != EXPORT_FORMAT or body.get("version") != EXPORT_VERSION:
        raise ExportError(f"{p}: format {body.get('format')!r} v{body.get('version')!r}, "
                          f"expected {EXPORT_FORMAT!r} v{EXPORT_VERSION}")
    return body


PROJECTOR_ROLES = ("input", "output")


def part_files(part: str) -> tuple[str, ...]:
    """The files (relative to the export folder) of a part named in ``export.json``: ``input_image`` ->
    ``input_image.safetensors``, ``token_rows`` -> ``token_rows.safetensors``, ``lora`` -> the adapter's config
    and weights.

    Raises:
        ExportError: a part name of no known kind.
    """
    if part == "lora":
        return ("lora/adapter_config.json", "lora/adapter_model.safetensors")
    if part == "token_rows" or part.split("_", 1)[0] in PROJECTOR_ROLES:
        return (f"{part}.safetensors",)
    raise ExportError(f"unknown export part {part!r}; parts are input_<modality>, output_<modality>, "
                      "token_rows, lora")


def _present_parts(d: Path) -> list[str]:
    found = sorted(p.stem for p in d.glob("*.safetensors")
                   if p.stem == "token_rows" or p.stem.split("_", 1)[0] in PROJECTOR_ROLES)
    if (d / "lora" / "adapter_config.json").is_file():
        found.append("lora")
    return found


def export_problems(directory: str | Path) -> list[str]:
    """What keeps ``directory`` from loading as an export (empty: nothing); file checks only, no tensors read.

    - the folder exists, is a folder and can be read;
    - it holds at least one part (``input_*`` / ``output_*`` / ``token_rows`` ``.safetensors``, ``lora/``);
    - with an ``export.json``: it is ours (format, version) and every part it lists is there;
    - every ``.safetensors`` part has a readable header (a truncated or foreign file is named here, not when a
      replica loads it).
    """
    d = Path(directory).expanduser()
    if not d.exists():
        return [f"projectors folder {d}: no such folder"]
    if not d.is_dir():
        return [f"projectors folder {d}: not a folder"]
    if not os.access(d, os.R_OK | os.X_OK):
        return [f"projectors folder {d}: cannot be read (permissions)"]
    problems: list[str] = []
    present = _present_parts(d)
    listed: list[str] = []
    if (d / "export.json").exists():
        try:
            listed = list(read_manifest(d).get("parts", []))
        except (ExportError, OSError, ValueError) as e:
            problems.append(f"projectors folder {d}: {e}")
        for part in listed:
            try:
                files = part_files(part)
            except ExportError as e:
                problems.append(f"{d / 'export.json'}: {e}")
                continue
            missing = [f for f in files if not (d / f).is_file()]
            if missing:
                problems.append(f"projectors folder {d}: export.json lists {part!r} but {', '.join(missing)} "
                                "is missing")
    elif not present:
        problems.append(f"projectors folder {d} holds none of the parts of an export (export.json, "
                        "input_<modality>.safetensors, output_<modality>.safetensors, token_rows.safetensors, "
                        "lora/); point --projectors at the folder `polymodal train` or `polymodal convert` wrote")
    for part in present:
        for f in part_files(part):
            if f.endswith(".safetensors") and (d / f).is_file():
                try:
                    with safe_open(str(d / f), "np"):
                        pass
                except Exception as e:  # noqa: BLE001 - any unreadable header is named
                    problems.append(f"{d / f}: not a readable safetensors file ({type(e).__name__}: {e})")
    return problems


def check_export(directory: str | Path) -> None:
    """Raises:
        ExportError: :func:`export_problems` found any (all of them in the message)."""
    problems = export_problems(directory)
    if problems:
        raise ExportError("; ".join(problems))


@torch.no_grad()
def apply_llm_export(engine, directory: str | Path) -> list[str]:
    """Load ``token_rows.safetensors`` and ``lora/`` of an export into an :class:`polymodal.llm.LLMEngine`.

    The LoRA is merged into the weights (``merge_and_unload``) so decoding runs at base-model speed.
    Returns the names of the parts applied.

    Raises:
        ExportError: a token unknown to the tokenizer, rows of the wrong width, an unreadable LoRA.
    """
    d = Path(directory)
    applied: list[str] = []
    rows = d / "token_rows.safetensors"
    if rows.is_file():
        with safe_open(str(rows), "pt") as f:
            tokens = json.loads((f.metadata() or {}).get("tokens", "[]"))
            inp = f.get_tensor("input_embeddings")
            out = f.get_tensor("output_embeddings") if "output_embeddings" in f.keys() else None
        ids = []
        vocab = engine.tokenizer.get_vocab()
        for t in tokens:
            if t not in vocab:
                raise ExportError(f"{rows}: token {t!r} is not in the model's vocabulary")
            ids.append(vocab[t])
        emb = engine.model.get_input_embeddings().weight
        if inp.shape[1] != emb.shape[1]:
            raise ExportError(f"{rows}: rows are {inp.shape[1]} wide, the model's embeddings {emb.shape[1]}")
        idx = torch.tensor(ids, dtype=torch.long, device=emb.device)
        emb[idx] = inp.to(emb.device, emb.dtype)
        head = engine.model.get_output_embeddings()
        if out is not None and head is not None and head.weight is not emb:
            head.weight[idx] = out.to(head.weight.device, head.weight.dtype)
        applied.append("token_rows")
    lora = d / "lora"
    if (lora / "adapter_config.json").is_file():
        from peft import PeftModel

        try:
            merged = PeftModel.from_pretrained(engine.model, str(lora)).merge_and_unload()
        except (ValueError, KeyError, RuntimeError, OSError) as e:
            raise ExportError(f"{lora}: cannot apply the LoRA adapter: {e}") from e
        engine.model = merged.eval()
        applied.append("lora")
    return applied
