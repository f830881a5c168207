"""``polymodal toyworld``: procedural toy data, toy decoders trained from scratch, checkers."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

app = typer.Typer(
    name="toyworld",
    help="A toy world whose media can be checked: procedural data, toy decoders, checkers.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _fail(msg: str) -> None:
    typer.secho(f"error: {msg}", fg=typer.colors.RED, err=True)
    raise typer.Exit(2)


def _modalities(value: Optional[str]):
    from polymodal.modality import Modality
    from training.toyworld.data import MAKERS

    try:
        return Modality.parse_list(value) if value else list(MAKERS)
    except ValueError as e:
        _fail(str(e))


@app.command()
def data(
    out: Annotated[Path, typer.Option("--out", help="folder to write media and catalog.jsonl into")],
    seed: Annotated[int, typer.Option(help="dataset seed (item i depends on seed and i only)", min=0)] = 0,
    count: Annotated[int, typer.Option(help="items per modality", min=1, max=1_000_000)] = 300,
    modalities: Annotated[Optional[str], typer.Option(help="comma-separated (default: image,audio,video)")] = None,
    size_px: Annotated[int, typer.Option("--size-px", help="image and video side: 32 or 64")] = 64,
    num_frames: Annotated[int, typer.Option(help="video frames (8..16)", min=8, max=16)] = 8,
    layout: Annotated[str, typer.Option(help="random (any grey, size, position) or canonical (mid-grey, "
                                        "centred: what the toy decoders train on)")] = "random",
) -> None:
    """Write seeded procedural images, tones and moving-shape videos with captions + catalog.jsonl."""
    from training.toyworld.data import write_dataset

    try:
        catalog = write_dataset(out, count=count, seed=seed, modalities=_modalities(modalities), size_px=size_px,
                                num_frames=num_frames, layout=layout, progress=True)
    except ValueError as e:
        _fail(str(e))
    typer.echo(str(catalog))


@app.command("train-decoders")
def train_decoders(
    data: Annotated[Path, typer.Option("--data", help="folder written by `toyworld data`")],
    out: Annotated[Path, typer.Option("--out", help="folder for the decoders and toyworld-decoders.json")],
    modalities: Annotated[Optional[str], typer.Option(help="comma-separated (default: every trainable one)")] = None,
    step_scale: Annotated[float, typer.Option(help="multiply every step count (quick trials)", min=1e-6, max=100)] = 1.0,
    force: Annotated[bool, typer.Option("--force", help="retrain even if the config hash matches")] = False,
) -> None:
    """Train the toy decoders from scratch (deterministic; skipped when the output's config hash matches)."""
    from training.toyworld.train import train_decoders as run

    try:
        manifest = run(data, out, modalities=_modalities(modalities) if modalities else None, step_scale=step_scale,
                       force=force, progress=True)
    except (ValueError, FileNotFoundError) as e:
        _fail(str(e))
    for name, entry in manifest["decoders"].items():
        typer.echo(f"{name}: {out / entry['path']} {entry['figures']}")


@app.command("train-encoder")
def train_encoder(
    data: Annotated[Path, typer.Option("--data", help="folder written by `toyworld data` (random layout)")],
    out: Annotated[Path, typer.Option("--out", help="folder for image/ (a CLIPModel) and toyworld-encoders.json")],
    step_scale: Annotated[float, typer.Option(help="multiply the step count (quick trials)", min=1e-6, max=100)] = 1.0,
    force: Annotated[bool, typer.Option("--force", help="retrain even if the config hash matches")] = False,
) -> None:
    """Train the toy image encoder (a tiny CLIP) from scratch; load it as encoder kind `clip` from OUT/image."""
    from training.toyworld.encoder import train_encoders

    try:
        manifest = train_encoders(data, out, step_scale=step_scale, force=force, progress=True)
    except (ValueError, FileNotFoundError) as e:
        _fail(str(e))
    for name, entry in manifest["encoders"].items():
        typer.echo(f"{name}: {out / entry['path']} (kind {entry['kind']}, dim {entry['dim']}) {entry['figures']}")


Threads = Annotated[int, typer.Option(help="torch threads of the alignment stages (1: how the shipped builds were "
                                      "made; more is faster on a free machine, results equal up to float rounding)",
                                      min=1, max=256)]


@app.command()
def build(
    out: Annotated[Path, typer.Option("--out", help="the toy build folder (decoders/, encoders/, export/); "
                                      "serve it with POLYMODAL_TOY_DIR=OUT polymodal serve --preset toy")],
    step_scale: Annotated[float, typer.Option(help="multiply every training step count (quick trials)",
                                              min=1e-6, max=100)] = 1.0,
    work: Annotated[Optional[Path], typer.Option(help="intermediate files (default OUT/work)")] = None,
    grounding: Annotated[bool, typer.Option(
        "--grounding", help="also build OUT/export-grounding, the toy-grounding preset (boxes as an output; "
        "serve it with POLYMODAL_TOY_DIR=OUT polymodal serve --preset toy-grounding)")] = False,
    device: Annotated[str, typer.Option(help="where the alignment stages train: cpu (the shipped build) or cuda "
                                        "(float32; cached apart from CPU results)")] = "cpu",
    parts_from: Annotated[Optional[Path], typer.Option(
        "--parts-from", help="a toy build folder (e.g. polymodal/assets/toy) whose trained decoders/ and encoders/ "
        "are copied into OUT and used as they are, instead of training them")] = None,
    instruct_from: Annotated[Optional[Path], typer.Option(
        "--instruct-from", help="a finished toy export (e.g. polymodal/assets/toy/export, with --parts-from its "
        "build): skip the encode and decode stages and continue its instruct stage (its LoRA kept training) on "
        "this build's instruct data, plain dialogues included")] = None,
    plain_dialogues: Annotated[Optional[int], typer.Option(
        help="plain-question dialogues in the instruct data (default: the build's setting)", min=0)] = None,
    plain_bank: Annotated[Optional[int], typer.Option(
        help="answer only this many (the shortest) questions of the plain training bank (default: all)", min=1)] = None,
    continue_steps: Annotated[Optional[int], typer.Option(
        help="--instruct-from: steps of the continued instruct stage (default: the build's setting)", min=1)] = None,
    skills: Annotated[bool, typer.Option(
        "--skills", help="with --instruct-from: build the toy-skills preset (LLaVA-Plus skill use of the toy skills "
        "locate / count) into OUT/export-skills: the instruct stage continued on skill-use dialogues plus ordinary "
        "requests; serve it with POLYMODAL_TOY_DIR=OUT polymodal serve --preset toy-skills")] = False,
    skill_use_steps: Annotated[Optional[int], typer.Option(
        help="--skills: steps of the continued stage (default: the build's setting)", min=1)] = None,
    request_weight: Annotated[Optional[list[str]], typer.Option(
        "--request-weight", help="MODALITY=W: W times as many instruct-stage requests of that modality (repeatable; "
        "e.g. video=2)")] = None,
    mosit_edit_weight: Annotated[Optional[float], typer.Option(
        help="weight of the MosIT edit dialogues (issue #27: a shared toy image and a recolour / reshape instruction "
        "answered with the edited image) beside the other modes' (1.0 each); default: the build's (0, none)",
        min=0)] = None,
    mosit_image_in_weight: Annotated[Optional[float], typer.Option(
        help="with --mosit-edit-weight: weight of the image-in MosIT dialogues (I_T) instead of mosit.yaml's 0.5, "
        "replayed beside the edits so that image descriptions are kept", min=0)] = None,
    edit_decoder: Annotated[Optional[Path], typer.Option(
        "--edit-decoder", help="an InstructPix2Pix toy decoder (made by polymodal toyworld edit-decoder) that becomes "
        "the build's image decoder: it generates and edits (issue #27)")] = None,
    threads: Threads = 1,
) -> None:
    """Build the whole toy world: data, toy decoders and encoder, MosIT dialogues, the three alignment stages.

    Deterministic and cached step by step (a rerun redoes only what changed); about 1.5 hours on one CPU core
    at full size. --grounding adds 2000 steps of batch 32: about 6 minutes on an H200 (--device cuda), an
    estimated 7 hours on one CPU core. The package ships a build of both (polymodal/assets/toy), so this is
    only needed to change it. --instruct-from continues a finished export's instruct stage instead of running
    the three stages (how the shipped export got its plain dialogues: see the README's Toy world). --skills with
    --instruct-from builds the toy-skills preset (issue #25; its bench: the README's toy-skills paragraph).
    """
    from training.toyworld.build import BuildSettings
    from training.toyworld.build import build as run

    try:
        given = {"plain_dialogues": plain_dialogues, "plain_bank": plain_bank, "continue_steps": continue_steps,
                 "skill_use_steps": skill_use_steps, "mosit_edit_weight": mosit_edit_weight,
                 "mosit_image_in_weight": mosit_image_in_weight,
                 "instruct_request_weights": _weights(request_weight) if request_weight else None}
        settings = BuildSettings(step_scale=step_scale, **{k: v for k, v in given.items() if v is not None})
        manifest = run(out, settings, work=work, progress=True, grounding=grounding,
                       device=device, parts_from=parts_from, instruct_from=instruct_from, skills=skills,
                       threads=threads, edit_decoder=edit_decoder)
    except (ValueError, FileNotFoundError) as e:
        _fail(str(e))
    typer.echo(f"{out}: sizes (MB) {manifest['sizes_mb']}, {manifest['build_s']} s")


def _weights(items: list[str]) -> tuple[tuple[str, float], ...]:
    """``["video=2"]`` -> ``(("video", 2.0),)``. Raises: ValueError: not MODALITY=NUMBER."""
    out = []
    for item in items:
        name, sep, value = item.partition("=")
        try:
            out.append((name.strip(), float(value)))
        except ValueError:
            sep = ""
        if not sep:
            raise ValueError(f"--request-weight {item!r}: expected MODALITY=NUMBER, e.g. video=2")
    return tuple(out)


@app.command()
def check(
    data: Annotated[Path, typer.Option("--data", help="folder written by `toyworld data`")],
) -> None:
    """Score the checkers on the files of a toy data folder (reads every file back)."""
    from polymodal.modality import Modality
    from training.toyworld.checkers import check_file
    from training.toyworld.data import read_catalog
    from training.toyworld.evaluate import score_readings

    catalog = data / "catalog.jsonl"
    if not catalog.is_file():
        _fail(f"{catalog} not found")
    rows = read_catalog(catalog)
    for m in Modality:
        its = [r for r in rows if r["modality"] == m.value]
        if its:
            readings = [check_file(m, r["path"]) for r in its]
            typer.echo(score_readings(m, readings, [r["attributes"] for r in its]).line())


@app.command("score-decoder")
def score_decoder(
    out: Annotated[Path, typer.Option("--out", help="folder written by `toyworld train-decoders`")],
    modality: Annotated[str, typer.Option(help="image, audio or video")] = "image",
    n: Annotated[int, typer.Option(help="prompts", min=1, max=10_000)] = 48,
    seed: Annotated[int, typer.Option(min=0)] = 0,
) -> None:
    """Generate from the trained toy decoder's own text embeddings and score the media with the checker."""
    from decoders import build_decoder
    from polymodal.presets.toy import decoder_config
    from training.toyworld.evaluate import score_decoder as run

    try:
        dec = build_decoder(modality, decoder_config(out, modality))
    except (ValueError, FileNotFoundError) as e:
        _fail(str(e))
    typer.echo(run(dec, n=n, seed=seed).line())


@app.command("train-3d")
def train_3d(
    out: Annotated[Path, typer.Option("--out", help="a toy-3d decoders folder (ROOT3D/decoders, e.g. polymodal/assets/"
                                      "toy-3d/decoders): gets object3d/ and its entry in toyworld-decoders.json "
                                      "(other entries kept)")],
    step_scale: Annotated[float, typer.Option(help="multiply the step count (quick trials)", min=1e-6, max=100)] = 1.0,
    force: Annotated[bool, typer.Option("--force", help="retrain even if the config hash matches")] = False,
    score: Annotated[int, typer.Option(help="then render this many held-out captions and check them (0: no)",
                                       min=0, max=10_000)] = 40,
) -> None:
    """Train the toy 3D decoder (point-set diffusion, issue #29) from scratch on procedural coloured point clouds.

    Cached by the recipe's hash and resumable: stop it any time and run it again; it continues from the last
    checkpoint (every 500 steps). The toy-3d preset reads it from ROOT3D/decoders/object3d ($POLYMODAL_TOY_3D_DIR,
    else the shipped polymodal/assets/toy-3d: --out polymodal/assets/toy-3d/decoders).
    """
    from training.toyworld.object3d import Object3DDecoderRecipe, score_object3d_decoder, train_object3d_decoder

    recipe = Object3DDecoderRecipe()
    entry = train_object3d_decoder(out, recipe.scaled(step_scale) if step_scale != 1.0 else recipe, force=force,
                                   progress=True)
    typer.echo(f"object3d: {out / entry['path']} {entry['figures']}")
    if score:
        typer.echo(f"object3d decoder alone (own text encoder, {score} held-out captions): "
                   f"{score_object3d_decoder(out, count=score)}")


BUILD_3D_MANIFEST = "toy-3d-build.json"


TOY_3D_INSTRUCT_STEPS = 600
"""The toy-3d instruct stage's steps (toy's own: 300). At 300 the 3D requests through the service scored 175/200 (shape
185, colour 189; the decoder alone 77/80 on captions) with the stage's MSE still falling (0.69 -> 0.45)."""


def build_toy_3d(out: str | Path, settings=None, *, toy_root: str | Path | None = None, progress: bool = True,
                 work: str | Path | None = None, device: str | None = None, threads: int = 1) -> dict:
    """The ``toy-3d`` preset's aligned parts -> ``OUT/export`` and ``OUT/toy-3d-build.json`` (returned): toy's export
    continued with 3D (:func:`training.toyworld.build.extend`: the 3D output projector by a decode stage, then toy's
    instruct stage continued with 3D requests beside the toy ones). ``OUT`` is a toy-3d build folder whose
    ``decoders/`` holds the trained toy 3D decoder; ``toy_root`` the finished toy build (default: the shipped one).

    Raises:
        FileNotFoundError: no toy 3D decoder in ``OUT/decoders`` (names ``polymodal toyworld train-3d``), no toy
            export.
        ValueError: an unusable ``device``.
    """
    from polymodal.presets.toy import toy_3d_preset
    from polymodal.presets.toy import toy_root as default_toy_root
    from training.toyworld.build import extend
    from training.toyworld.object3d import OBJECT3D

    from training.toyworld.build import BuildSettings

    root = Path(toy_root) if toy_root is not None else default_toy_root()
    settings = settings if settings is not None else BuildSettings(instruct_steps=TOY_3D_INSTRUCT_STEPS)
    preset = toy_3d_preset(root, root_3d=out, aligned=False)  # FileNotFoundError: no 3D decoder (names train-3d)
    return extend(out, preset, [OBJECT3D], settings, toy_root=root, manifest=BUILD_3D_MANIFEST, progress=progress,
                  work=work, device=device, threads=threads)


@app.command("build-3d")
def build_3d(
    out: Annotated[Path, typer.Option("--out", help="the toy-3d build folder (ROOT3D, e.g. polymodal/assets/toy-3d): "
                                      "its decoders/ from train-3d; gets export/ and toy-3d-build.json")],
    toy_root: Annotated[Optional[Path], typer.Option(
        "--toy-root", help="the finished toy build whose export is continued (default: POLYMODAL_TOY_DIR or the "
        "shipped polymodal/assets/toy)")] = None,
    step_scale: Annotated[float, typer.Option(help="multiply every training step count (quick trials)",
                                              min=1e-6, max=100)] = 1.0,
    work: Annotated[Optional[Path], typer.Option(help="intermediate files (default OUT/work)")] = None,
    device: Annotated[str, typer.Option(help="where the alignment stages train: cpu or cuda (float32)")] = "cpu",
    threads: Threads = 1,
) -> None:
    """The toy-3d preset's alignment (issue #29): the 3D output projector (decode stage), then toy's instruct stage
    continued with 3D requests beside the toy ones, into OUT/export. Needs `polymodal toyworld train-3d --out
    OUT/decoders` first; cached step by step like `polymodal toyworld build`."""
    from training.toyworld.build import BuildSettings

    try:
        manifest = build_toy_3d(out, BuildSettings(step_scale=step_scale, instruct_steps=TOY_3D_INSTRUCT_STEPS),
                                toy_root=toy_root, work=work, progress=True, device=device, threads=threads)
    except (ValueError, FileNotFoundError) as e:
        _fail(str(e))
    typer.echo(f"{out}: sizes (MB) {manifest['sizes_mb']}, {manifest['build_s']} s")


@app.command("edit-decoder")
def edit_decoder(
    out: Annotated[Path, typer.Option("--out", help="folder for the edit decoder (a diffusers folder), its "
                                      "edit-decoder.json and ceiling.json")],
    kind: Annotated[str, typer.Option(help="instruct-pix2pix (the UNet reads the source's latents: Brooks et al. "
                                      "2023) or sdedit (the decoder continued on random layouts; img2img)")]
    = "instruct-pix2pix",
    source: Annotated[Path, typer.Option(
        help="the toy image decoder it grows from (or an InstructPix2Pix one to continue)")]
    = Path("polymodal/assets/toy/decoders/image"),
    steps: Annotated[Optional[int], typer.Option(help="training steps (default: the recipe's)", min=1)] = None,
    snr_gamma: Annotated[Optional[float], typer.Option(
        "--snr-gamma", help="instruct-pix2pix: Min-SNR-gamma loss weights (e.g. 5; default: plain MSE)", min=0.1)]
    = None,
    x0_weight_cap: Annotated[Optional[float], typer.Option(
        "--x0-weight-cap", help="instruct-pix2pix: noise error weighted 1 + min(1/SNR, CAP), so that a misplaced "
        "shape costs at high noise (e.g. 20; not with --snr-gamma)", min=0.1)] = None,
    edit_pairs: Annotated[Optional[int], typer.Option(
        "--edit-pairs", help="instruct-pix2pix: (source, edited) training pairs (default: the recipe's)", min=1)]
    = None,
    partial_captions: Annotated[float, typer.Option(
        "--partial-captions", help="instruct-pix2pix: share of edit pairs whose caption names only what changed "
        "(\"a picture of a circle\"), so that the source says the rest", min=0.0, max=1.0)] = 0.0,
    vae_steps: Annotated[int, typer.Option(
        "--vae-steps", help="then continue the VAE's decoder this many steps on random layouts, its encoder frozen "
        "(the latents the UNet learned stay; 0: no). Starts from SOURCE's VAE; e.g. 3000", min=0)] = 0,
    score: Annotated[int, typer.Option(help="held-out edit sources to score the decoder alone on (0: no)",
                                       min=0, max=10_000)] = 24,
    strength: Annotated[str, typer.Option(help="sdedit: comma-separated img2img strengths scored side by side")]
    = "0.4,0.6,0.8",
) -> None:
    """A toy image decoder that edits (issue #27) and its own edit ceiling: prompted with the target's caption
    through its own text encoder (no LLM), the share of held-out random-layout edits that show the asked change,
    keep the other attribute and keep the place (training.toyworld.editing.score_edits), with the controls.
    Training is skipped when OUT already holds a decoder of the same recipe."""
    import dataclasses
    import json

    from training.toyworld import editing as E

    if kind not in ("instruct-pix2pix", "sdedit"):
        _fail(f"unknown --kind {kind!r}; choose from: instruct-pix2pix, sdedit")
    try:
        strengths = tuple(float(x) for x in strength.split(","))
    except ValueError:
        _fail(f"--strength: comma-separated numbers, got {strength!r}")
    if any(not 0 < s <= 1 for s in strengths):
        _fail(f"--strength: each value must be in (0, 1], got {strength!r}")
    if kind == "sdedit":
        if edit_pairs is not None or partial_captions:
            _fail("--edit-pairs and --partial-captions are for --kind instruct-pix2pix")
        recipe = E.EditDecoderRecipe(**({"steps": steps} if steps else {}))
        train = E.continue_image_decoder
    else:
        if snr_gamma is not None and x0_weight_cap is not None:
            _fail("--snr-gamma and --x0-weight-cap are two loss weightings: give one")
        recipe = E.InstructEditRecipe(**({"steps": steps} if steps else {}),
                                      **({"edit_pairs": edit_pairs} if edit_pairs else {}), snr_gamma=snr_gamma,
                                      x0_weight_cap=x0_weight_cap, partial_captions=partial_captions)
        train = E.train_instruct_edit_decoder
    record_path = out / "edit-decoder.json"
    old = json.loads(record_path.read_text()) if record_path.is_file() else {}
    same = old.get("recipe") == json.loads(json.dumps(dataclasses.asdict(recipe)))
    if same and old.get("continued_from") == str(source):
        typer.echo(f"{out}: up to date ({old['train_s']} s when trained)")
    else:
        try:
            old = train(source, out, recipe, progress=True)
        except (OSError, ValueError) as e:
            _fail(str(e))
        typer.echo(f"{out}: trained in {old['train_s']} s, loss {old['unet_loss']}")
    if vae_steps:
        vrecipe = E.VaeDecoderRecipe(steps=vae_steps)
        tuned = old.get("vae_decoder") or {}
        if tuned.get("recipe") == dataclasses.asdict(vrecipe) and tuned.get("from") == str(source / "vae"):
            typer.echo(f"{out}/vae: up to date ({tuned['train_s']} s when tuned)")
        else:
            try:
                old["vae_decoder"] = E.tune_vae_folder(out, source / "vae", vrecipe, progress=True)
            except (OSError, ValueError) as e:
                _fail(str(e))
            tmp = record_path.with_suffix(".json.tmp")
            tmp.write_text(json.dumps(old, indent=2))
            tmp.replace(record_path)
        rt = old["vae_decoder"]
        typer.echo("  through the VAE alone, held-out sources keep colour / shape / place: "
                   + " -> ".join(f"{r['colour']:.2f} / {r['shape']:.2f} / {r['place']:.2f}"
                                 for r in (rt["roundtrip_before"], rt["roundtrip_after"])))
    if not score:
        return
    results: dict = {"record": old}
    if kind == "sdedit":
        results.update(E.decoder_edit_ceiling(out, n=score, strengths=strengths))
    else:
        results["source_use"] = E.source_use_gap(out)
        for t, v in results["source_use"].items():
            typer.echo(f"  denoising loss at t={t}: {v['with_source']:.4f} with the source, "
                       f"{v['zero_source']:.4f} with zeros")
        results.update(E.instruct_edit_ceiling(out, n=score))
    typer.echo(f"the decoder alone on {score} held-out edits (target caption as its prompt):")
    for run in results["runs"]:
        for k, v in run["kinds"].items():
            typer.echo(f"  strength {run['strength'] or '-'} {k}: asked {v['asked']:.2f}, other kept {v['other']:.2f}, "
                       f"place kept {v['place']:.2f}, all {v['all']:.2f}; controls: other's target "
                       f"{v['control_other']:.2f} (chance + 3 sd {v['chance_plus_3sd']:.2f}), follows its source "
                       f"{v['follow']:.2f}")
    (out / "ceiling.json").write_text(json.dumps(results, indent=1))
