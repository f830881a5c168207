"""``polymodal mosit ...`` (also ``python -m mosit ...``): build, review export / import, example catalog."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Optional

import typer

app = typer.Typer(help="MosIT (modality-switching instruction tuning) dataset construction.",
                  no_args_is_help=True, add_completion=False)


def _fail(message: str, code: int = 2) -> None:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code)


@app.command()
def build(
    config: Path = typer.Option(..., "--config", "-c", help="MosIT config YAML"),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="output folder (default: runs/mosit/<name>)"),
    ray: bool = typer.Option(False, "--ray", help="run the shards on Ray Data (cluster: ray.address in the config)"),
    seed: Optional[int] = typer.Option(None, "--seed", help="override the config's seed"),
    resume: bool = typer.Option(False, "--resume", help="continue a build in --out (same config and catalog)"),
    progress: bool = typer.Option(True, "--progress/--no-progress"),
) -> None:
    """Generate, validate, fill media, drop near-duplicates and write a MosIT dataset."""
    from mosit.config import ConfigError, load_config
    from mosit.job import BuildError, build as run_build

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        cfg = load_config(config, seed=seed)
    except ConfigError as e:
        _fail(str(e))
    out = out or Path("runs") / "mosit" / cfg.name
    try:
        summary = run_build(cfg, out, use_ray=ray, resume=resume, progress=progress)
    except (BuildError, ValueError, FileNotFoundError) as e:
        _fail(str(e))
    except RuntimeError as e:  # LLM endpoint gave up, a model that would not load: resumable
        _fail(f"{e} (the shards done so far are kept; rerun with --resume)", code=1)
    d = summary["dialogues"]
    typer.echo(f"wrote {d['accepted']} of {d['total']} dialogues (yield {d['yield']:.0%}) to {out.resolve()}")
    typer.echo(json.dumps(summary["per_mode"], indent=1))


@app.command("export-review")
def export_review_cmd(out: Path = typer.Option(..., "--out", "-o", help="the dataset folder")) -> None:
    """Write review/review.html and review/review.csv for the dataset in --out."""
    from mosit.review import ReviewError, export_review

    try:
        html_path, csv_path = export_review(out)
    except ReviewError as e:
        _fail(str(e))
    typer.echo(f"{html_path}\n{csv_path}")


@app.command("import-review")
def import_review_cmd(
    out: Path = typer.Option(..., "--out", "-o", help="the dataset folder"),
    decisions: Path = typer.Option(..., "--decisions", "-d", help="the filled-in review CSV"),
    drop_undecided: bool = typer.Option(False, "--drop-undecided", help="keep only rows marked accept"),
) -> None:
    """Apply accept/reject decisions: writes mosit.reviewed.json and review/rejected_by_reviewer.jsonl."""
    from mosit.review import ReviewError, import_review

    if not decisions.is_file():
        _fail(f"decisions file not found: {decisions}")
    try:
        counts = import_review(out, decisions, drop_undecided=drop_undecided)
    except ReviewError as e:
        _fail(str(e))
    typer.echo(json.dumps(counts))


@app.command("example-catalog")
def example_catalog(
    dest: Path = typer.Argument(..., help="folder to write the media and catalog.jsonl into"),
    recipe: Optional[Path] = typer.Option(None, "--recipe", help="catalog recipe YAML (default: the example's)"),
) -> None:
    """Write the example catalog: scikit-image photos, espeak-ng speech, short PyAV videos."""
    from mosit.example import RecipeError, build_catalog_from_recipe

    try:
        path = build_catalog_from_recipe(recipe, dest)
    except RecipeError as e:
        _fail(str(e))
    typer.echo(str(path))


def main() -> None:
    app()
