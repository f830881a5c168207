"""The ``polymodal`` command line (the composition root: the only module of ``polymodal/`` that reaches
``services/``, ``mosit/`` or the offline wing ``training/``, each inside the command that needs it; the import
contracts in pyproject's ``[tool.importlinter]`` name these edges)."""

from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Annotated, Optional

import typer

app = typer.Typer(
    name="polymodal",
    help="Any-to-any generation in the NExT-GPT style: text, images, audio and video in and out.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

PresetOpt = Annotated[str, typer.Option("--preset", "-p", help="preset name (toy, tiny, smol, nextgpt-7b, ...; "
                                        "`polymodal presets` lists them) or a preset YAML file")]


def _fail(msg: str, code: int = 2) -> None:
    typer.secho(f"error: {msg}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code)


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")


def atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file and ``os.replace`` (never half-written)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _use_cache(cache: Path | None) -> None:
    """``--cache``: the cache folder for this process and what it starts (``POLYMODAL_CACHE``)."""
    if cache is not None:
        os.environ["POLYMODAL_CACHE"] = str(cache.expanduser())


# ------------------------------------------------------------------------------------------------
# conversation files


def _load_media_file(modality, path: Path):
    """A media file -> :class:`polymodal.types.MediaPart` (audio at 16 kHz, video 8 frames; named by its path).

    Raises:
        ValueError: the file is missing, or :class:`polymodal.media_io.MediaError` (a ``ValueError``).
    """
    from polymodal import media_io

    if not path.is_file():
        raise ValueError(f"{modality.value} file not found: {path}")
    return media_io.decode_media(modality, path.read_bytes(), sample_rate_hz=16000, name=str(path))


def load_history(path: Path) -> list:
    """Read a conversation file: a JSON list of ``{"role": "user"|"assistant", "content": str | [parts]}``
    where a part is ``{"type": "text", "text": ...}`` or ``{"type": "image"|"audio"|"video", "path": ...}``
    (paths relative to the file). ``polymodal generate`` writes one as ``conversation.json``.

    Raises:
        ValueError: malformed file, unknown role or part type, missing media file.
    """
    from polymodal.modality import Modality
    from polymodal.types import TextPart, Turn

    try:
        msgs = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot read conversation {path}: {e}") from e
    if not isinstance(msgs, list):
        raise ValueError(f"conversation {path} must be a JSON list of messages")
    turns = []
    for i, msg in enumerate(msgs):
        if not isinstance(msg, dict) or msg.get("role") not in ("user", "assistant"):
            raise ValueError(f"message {i} of {path}: role must be 'user' or 'assistant'")
        content = msg.get("content", "")
        items = [{"type": "text", "text": content}] if isinstance(content, str) else content
        parts = []
        for part in items:
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text":
                parts.append(TextPart(str(part.get("text", ""))))
            elif isinstance(kind, str) and kind in Modality:
                parts.append(_load_media_file(Modality(kind), (path.parent / part["path"]).resolve()))
            else:
                choices = ", ".join(["text", *(m.value for m in Modality)])
                raise ValueError(f"message {i} of {path}: unknown part type {kind!r} ({choices})")
        turns.append(Turn(msg["role"], tuple(parts)))
    return turns


# ------------------------------------------------------------------------------------------------


@app.command()
def generate(
    prompt: Annotated[str, typer.Argument(help="the user's message")],
    preset: PresetOpt = "toy",
    modalities: Annotated[str, typer.Option(help="media the answer must contain, e.g. image,audio,video")] = "",
    out: Annotated[Path, typer.Option(help="output folder (text, media files, manifest.json)")] = Path("out"),
    image: Annotated[Optional[list[Path]], typer.Option(help="input image file (repeatable)")] = None,
    audio: Annotated[Optional[list[Path]], typer.Option(help="input audio file: WAV/FLAC/OGG (repeatable)")] = None,
    video: Annotated[Optional[list[Path]], typer.Option(help="input video file: MP4/WebM (repeatable)")] = None,
    history: Annotated[Optional[Path], typer.Option(help="earlier conversation (JSON) to continue")] = None,
    seed: Annotated[Optional[int], typer.Option(help="base seed (medium k uses seed+k); random if unset")] = None,
    max_new_tokens: Annotated[Optional[int], typer.Option(min=1, max=4096)] = None,
    temperature: Annotated[Optional[float], typer.Option(min=0.0, max=2.0)] = None,
    steps: Annotated[Optional[int], typer.Option(help="num_inference_steps of every decoder", min=1, max=200)] = None,
    guidance_scale: Annotated[Optional[float], typer.Option(min=0.0, max=30.0)] = None,
    crf: Annotated[Optional[int], typer.Option(help="video: libx264 constant rate factor of the MP4 (lower keeps "
                                                    "the decoder's frames closer; default: the preset's)",
                                               min=0, max=51)] = None,
    projectors: Annotated[Optional[Path], typer.Option(help="export folder of trained parts (projectors, token rows, LoRA)")] = None,
    task: Annotated[Optional[str], typer.Option(help="grounding task of the preset, e.g. grounding, refer "
                                                     "(its identifier goes before your message)")] = None,
    box_overlay: Annotated[bool, typer.Option("--box-overlay", help="also write overlay.png: the answer's boxes "
                                                                    "drawn on the input image they refer to")] = False,
    device: Annotated[Optional[str], typer.Option(help="cpu, cuda, cuda:1 (default: cuda if available)")] = None,
    cache: Annotated[Optional[Path], typer.Option(help="cache folder (converted GGUF models, ...); default "
                                                       "$POLYMODAL_CACHE or ~/.cache/polymodal")] = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    """Answer one message (with optional media and history); write the text, each medium and a manifest.

    Files in OUT: answer.txt, NN_<modality>.<png|wav|mp4>, manifest.json (parts in output order, seeds,
    shapes, init state of each part, timings; with a grounding preset the boxes, in pixels of the input
    image) and conversation.json (pass it to --history to continue); overlay.png with --box-overlay.

    --modalities is the floor and the ceiling of the answer's media ("text" alone: none); without it the
    model decides (the preset's policy).
    """
    _setup_logging(verbose)
    _use_cache(cache)
    from polymodal.config import DecoderDefaults
    from polymodal.llm import LLMLoadError
    from polymodal.modality import Modality
    from polymodal.types import TextPart, Turn, input_images

    try:
        wanted = Modality.parse_list([m for m in modalities.split(",") if m.strip().lower() != "text"])
        turns = load_history(history) if history else []
        parts: list = []
        for mod, files in ((Modality.IMAGE, image), (Modality.AUDIO, audio), (Modality.VIDEO, video)):
            parts.extend(_load_media_file(mod, f) for f in files or [])
        parts.append(TextPart(prompt))
        turns.append(Turn("user", tuple(parts)))
        if box_overlay and not input_images(turns):
            raise ValueError("--box-overlay: there is no input image to draw the boxes on (pass --image)")
    except ValueError as e:
        _fail(str(e))

    from polymodal.pipeline import AnyToAnyPipeline
    from polymodal.preflight import check_start

    try:
        check_start(preset, export_dir=projectors)
    except ValueError as e:
        _fail(str(e))
    try:
        typer.echo(f"loading preset {preset} ...", err=True)
        pipe = AnyToAnyPipeline.from_preset(preset, device=device, export_dir=str(projectors) if projectors else None)
    except (ValueError, LLMLoadError, RuntimeError, OSError) as e:
        _fail(str(e))
    if box_overlay and pipe.preset.grounding is None:
        _fail(f"--box-overlay: preset {pipe.preset.name!r} has no grounding (no boxes to draw)")
    options = {}
    for m, stage in pipe.decoder_stages.items():
        upd = {k: v for k, v in (("num_inference_steps", steps), ("guidance_scale", guidance_scale)) if v is not None}
        if crf is not None and "crf" in m.spec.option_fields:
            upd["crf"] = crf
        options[m] = DecoderDefaults(**{**stage.defaults.model_dump(), **upd})
    try:
        ceiling = wanted if modalities.strip() else None  # --modalities: floor and ceiling
        answer = pipe.generate(turns, modalities=wanted, seed=seed, options=options, allowed_modalities=ceiling,
                               max_new_tokens=max_new_tokens, temperature=temperature, task=task)
    except ValueError as e:
        _fail(str(e))
    write_answer(answer, out, turns, pipe.preset.name, box_overlay=box_overlay)
    typer.echo(answer.text)
    failed = [p for p in answer.media if isinstance(p, Exception)]
    for p in answer.media:
        if not isinstance(p, Exception):
            typer.echo(f"[{p.modality.value}] seed {p.seed}", err=True)
    for f in failed:
        typer.secho(f"[medium failed] {f}", fg=typer.colors.YELLOW, err=True)
    typer.echo(f"wrote {out}/manifest.json", err=True)
    if failed:
        raise typer.Exit(1)


def write_answer(answer, out: Path, turns: list, preset_name: str, *, box_overlay: bool = False) -> dict:
    """Write answer.txt, the media, manifest.json and conversation.json into ``out``; with ``box_overlay``
    also overlay.png (the answer's boxes on the input image they refer to, when there are boxes).

    Writing into a folder of an earlier answer: the files its manifest named (media, overlay) that this answer
    does not write again are removed once the new manifest is in place; nothing else in the folder is touched.
    """
    from polymodal.types import MediaPart, TextPart, input_images

    out.mkdir(parents=True, exist_ok=True)
    try:
        earlier = _manifest_files(json.loads((out / "manifest.json").read_text()))
    except (OSError, ValueError):
        earlier = set()
    manifest_parts = []
    convo_parts = []
    k = 0
    for part in answer.parts:
        if isinstance(part, TextPart):
            manifest_parts.append({"type": "text", "text": part.text})
            convo_parts.append({"type": "text", "text": part.text})
            continue
        if isinstance(part, Exception):
            manifest_parts.append({"type": "error", "error": str(part), "seed": getattr(part, "seed", None)})
            k += 1
            continue
        data, mime, ext = part.encode()
        name = f"{k:02d}_{part.modality.value}.{ext.lstrip('.')}"
        atomic_write(out / name, data)
        entry = {"type": part.modality.value, "file": name, "mime": mime, "seed": part.seed,
                 "shape": list(part.data.shape)}
        if part.sample_rate_hz:
            entry["sample_rate_hz"] = part.sample_rate_hz
        if part.fps:
            entry["fps"] = part.fps
        manifest_parts.append(entry)
        convo_parts.append({"type": part.modality.value, "path": name})
        k += 1
    atomic_write(out / "answer.txt", (answer.text + "\n").encode())
    # conversation.json: earlier turns (media re-referenced by their original paths) + this answer
    history = []
    for t in turns:
        items = []
        for p in t.parts:
            if isinstance(p, TextPart):
                items.append({"type": "text", "text": p.text})
            elif isinstance(p, MediaPart) and p.name:
                items.append({"type": p.modality.value, "path": os.path.relpath(Path(p.name).resolve(), out.resolve())})
        history.append({"role": t.role, "content": items})
    history.append({"role": "assistant", "content": convo_parts})
    atomic_write(out / "conversation.json", json.dumps(history, indent=2).encode())
    images = input_images(turns)
    boxes = [{"phrase": b.phrase, "box_px": [round(v, 2) for v in b.box_px], "image_index": b.image_index}
             for b in answer.boxes]
    overlay = None
    if box_overlay and answer.boxes and images:
        from polymodal.grounding.overlay import overlay_png

        k = answer.boxes[0].image_index
        overlay = "overlay.png"
        atomic_write(out / overlay, overlay_png(images[k].data, [b for b in answer.boxes if b.image_index == k]))
    manifest = {
        "preset": preset_name,
        "parts": manifest_parts,
        "finish_reason": answer.llm.finish_reason,
        "notes": list(answer.llm.notes),
        "usage": {"prompt_tokens": answer.llm.prompt_tokens, "completion_tokens": answer.llm.completion_tokens},
        "seeds": {str(k): v for k, v in answer.seeds.items()},
        "timings_s": {k: round(v, 4) for k, v in answer.timings_s.items()},
        "model": answer.describe,
    }
    if boxes or box_overlay:
        manifest["boxes"] = boxes
        manifest["overlay"] = overlay
    atomic_write(out / "manifest.json", json.dumps(manifest, indent=2).encode())
    for name in earlier - _manifest_files(manifest):
        (out / name).unlink(missing_ok=True)
    return manifest


def _manifest_files(manifest) -> set[str]:
    """The files an answer's manifest names (plain names inside its folder); empty for anything else."""
    if not isinstance(manifest, dict):
        return set()
    parts = manifest.get("parts")
    names = [p.get("file") for p in parts if isinstance(p, dict)] if isinstance(parts, list) else []
    names.append(manifest.get("overlay"))
    return {n for n in names if isinstance(n, str) and n and Path(n).name == n}


@app.command("presets")
def presets_cmd(
    name: Annotated[Optional[str], typer.Argument(help="show this preset as YAML")] = None,
) -> None:
    """List the presets, or print one as YAML (edit it and pass the file as --preset)."""
    from polymodal.presets import PRESETS, get_preset

    if name is None:
        for n, fn in PRESETS.items():
            try:
                desc = fn().description
            except FileNotFoundError as e:  # a preset whose files are not here (the toy build)
                desc = f"(not available: {e})"
            typer.echo(f"{n:20s} {desc}")
        return
    try:
        typer.echo(get_preset(name).to_yaml())
    except (ValueError, FileNotFoundError) as e:
        _fail(str(e))


@app.command()
def serve(
    preset: PresetOpt = "toy",
    host: Annotated[str, typer.Option(help="bind address")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="HTTP port", min=1, max=65535)] = 8000,
    address: Annotated[Optional[str], typer.Option(help="attach to this Ray cluster instead of starting one")] = None,
    no_ray: Annotated[bool, typer.Option("--no-ray", help="one process under uvicorn (laptops, API tests)")] = False,
    api_key: Annotated[Optional[list[str]], typer.Option(help="accepted API key (repeatable; env POLYMODAL_API_KEYS)")] = None,
    projectors: Annotated[Optional[Path], typer.Option(help="export folder of trained parts (projectors, token rows, LoRA)")] = None,
    device: Annotated[Optional[str], typer.Option(help="cpu or cuda (default: cuda if available)")] = None,
    cache: Annotated[Optional[Path], typer.Option(help="cache folder (converted GGUF models, ...); default "
                                                       "$POLYMODAL_CACHE or ~/.cache/polymodal")] = None,
    request_timeout_s: Annotated[Optional[float], typer.Option(
        "--request-timeout-s", min=1, max=3600,
        help="a request still running after this is cancelled (504); requests that would not finish in it are "
             "refused up front (503 + Retry-After). Default: 120, as in deploy/*.yaml")] = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    """Serve the model behind OpenAI-compatible REST endpoints (Ray Serve graph, or one process with --no-ray).

    Every path given (preset file, --projectors, --cache, the preset's weights) is checked before anything starts.
    """
    _setup_logging(verbose)
    _use_cache(cache)
    from services.run import serve_main

    try:
        from polymodal.devices import resolve_device

        resolve_device(device)
    except ValueError as e:
        _fail(str(e))
    keys = list(api_key or []) + [k for k in os.environ.get("POLYMODAL_API_KEYS", "").split(",") if k]
    try:
        serve_main(preset, host=host, port=port, address=address, no_ray=no_ray, api_keys=keys or None,
                   export_dir=str(projectors) if projectors else None, device=device,
                   request_timeout_s=request_timeout_s)
    except (ValueError, RuntimeError) as e:
        _fail(str(e))


@app.command("skill")
def skill_cmd(
    name: Annotated[Optional[str], typer.Argument(help="the skill (detect, ocr, segment, generate_image, ...); "
                                                     "none with --list")] = None,
    image: Annotated[Optional[list[Path]], typer.Option("--image", "-i", help="an input image (repeatable; "
                                                         "image_index counts them in order)")] = None,
    args: Annotated[str, typer.Option("--args", "-a", help="the skill's arguments as a JSON object, e.g. "
                                      "'{\"target\": \"face\"}'")] = "{}",
    preset: PresetOpt = "tiny",
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="folder for the media the skill makes "
                                                "(and mask PNGs)")] = None,
    object_detector: Annotated[Optional[str], typer.Option(help="OWL-ViT folder or hub id (detect_objects)")] = None,
    list_: Annotated[bool, typer.Option("--list", help="list the skills with their JSON schemas")] = False,
) -> None:
    """Run one skill in this process on local files and print its result as JSON (``POST /v1/skills/NAME`` without
    a server). Exit status: 0 on success, 1 when the skill returns an error result, 2 for a bad command line
    (unknown skill, arguments that do not validate, an image that cannot be read)."""
    from skills import get_skill, skill_specs

    if list_:
        typer.echo(json.dumps([s.to_dict() for s in skill_specs()], indent=2))
        return
    if name is None:
        _fail("name a skill (or --list)")
    try:
        cls = get_skill(name)
        cls.parse(args)
    except ValueError as e:
        _fail(str(e))
    from polymodal.modality import Modality

    media = []
    for path in image or []:
        try:
            media.append(_load_media_file(Modality.IMAGE, path))
        except ValueError as e:
            _fail(f"--image {path}: {e}")
    from services.skill_host import SkillHost

    try:
        host = SkillHost.build([name], preset, object_detector_path=object_detector)
    except (ValueError, RuntimeError, FileNotFoundError) as e:
        _fail(str(e))
    result = host.skills[name].run(args, media)
    summary = result.to_dict()
    if out is not None:
        files = []
        for k, m in enumerate(result.media):
            data, _, ext = m.encode()
            path = out / f"{name}-{k}.{ext}"
            atomic_write(path, data)
            files.append(str(path))
        for k, m in enumerate(result.masks):
            path = out / f"{name}-mask-{k}.png"
            atomic_write(path, m.png())
            files.append(str(path))
        summary["files"] = files
    typer.echo(json.dumps(summary, indent=2))
    if not result.ok:
        typer.secho(f"error: {name}: {result.error}", fg=typer.colors.RED, err=True)
        raise typer.Exit(1)


# ------------------------------------------------------------------------------------------------
# sub-commands owned by other packages: each is imported inside its command (nothing else of polymodal reaches
# mosit/ or training/), and gets the rest of the command line


_PASS_THROUGH = dict(
    context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
    add_help_option=False,  # --help goes to the sub-command
)


def _mosit_app() -> typer.Typer:
    from mosit.cli import app as sub

    return sub


def _train_app() -> typer.Typer:
    from training.align.cli import app as sub

    return sub


def _convert_app() -> typer.Typer:
    from training.convert.cli import app as sub

    return sub


def _toyworld_app() -> typer.Typer:
    from training.toyworld.cli import app as sub

    return sub


# name -> (the loader importing its Typer app, the package that owns it, help)
_SUBCOMMANDS = {
    "mosit": (_mosit_app, "mosit", "Build MosIT-style multimodal instruction data."),
    "train": (_train_app, "training", "Alignment training: encode | decode | instruct stages."),
    "convert": (_convert_app, "training", "Convert released checkpoints (NExT-GPT) into polymodal exports."),
    "toyworld": (_toyworld_app, "training", "Toy world: procedural data, toy decoders, checkers."),
}


def _subcommand(ctx: typer.Context) -> None:
    """Run the sub-command ``ctx.info_name``'s Typer app on the arguments that follow its name (its package is
    imported only now); a package missing from this install fails with that message."""
    load, package, _ = _SUBCOMMANDS[ctx.info_name]
    try:
        sub = load()
    except ModuleNotFoundError as e:
        if e.name != package:
            raise
        _fail(f"`polymodal {ctx.info_name}` needs the {package!r} package, which this install lacks")
    sub(args=list(ctx.args), prog_name=f"{ctx.find_root().info_name} {ctx.info_name}")


for _name, (_, _, _help) in _SUBCOMMANDS.items():
    app.command(_name, help=_help, **_PASS_THROUGH)(_subcommand)


def main() -> None:
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
