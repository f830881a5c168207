"""``polymodal convert ...``: turn released checkpoints into export folders (mounted by ``polymodal.cli``)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

app = typer.Typer(
    help="Convert released checkpoints into polymodal export folders (for --projectors DIR).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.callback()
def _group() -> None:
    """Convert released checkpoints into polymodal export folders (for --projectors DIR)."""


@app.command("nextgpt")
def nextgpt(
    checkpoint: Annotated[Path, typer.Argument(help="NExT-GPT 7b_tiva_v0 pytorch_model.pt")],
    out: Annotated[Path, typer.Option("--out", "-o", help="export folder to write")],
    preset: Annotated[str, typer.Option("--preset", "-p", help="preset it will be served with, or a preset YAML")] = "nextgpt-7b",
    base: Annotated[Optional[Path], typer.Option(help="merged Vicuna-7B v0 folder (tokenizer + config); default: the preset's llm.path if local")] = None,
    rows: Annotated[str, typer.Option(help="token rows to write: all (needs the base), new (added tokens only), auto")] = "auto",
    base_vocab_size: Annotated[int, typer.Option(help="base vocabulary size when no base model is given", min=1)] = 32000,
    lora_alpha: Annotated[float, typer.Option(help="LoRA alpha (not stored in the checkpoint; NExT-GPT: 32)", min=0.0)] = 32.0,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="replace a non-empty --out folder")] = False,
) -> None:
    """Convert NExT-GPT's released delta into an export folder: token rows, a peft LoRA adapter, the input
    projector and the three output projectors, export.json with the full key map.

    Then: polymodal serve --preset nextgpt-7b --projectors OUT
    """
    from training.convert.nextgpt import ConversionError, convert_nextgpt

    try:
        report = convert_nextgpt(checkpoint, out, preset=preset, base=base, rows=rows,
                                 base_vocab_size=base_vocab_size, lora_alpha=lora_alpha, overwrite=overwrite)
    except (ConversionError, ValueError, OSError) as e:
        typer.secho(f"error: {e}", fg=typer.colors.RED, err=True)
        raise typer.Exit(2) from None
    typer.echo(report.summary())
