"""``polymodal train``: run one NExT-GPT training stage (also ``python -m training.align``)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer(
    name="train",
    help="Train projectors, token rows and a LoRA: NExT-GPT's encode / decode / instruct stages.",
    add_completion=False,
    pretty_exceptions_enable=False,
    invoke_without_command=True,
    subcommand_metavar="",
)


def _fail(msg: str, code: int = 2) -> None:
    typer.secho(f"error: {msg}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code)


@app.callback()
def train(
    stage: Annotated[str, typer.Option(help="encode (input projectors), decode (output projectors + signal rows), "
                                            "instruct (LoRA + both projectors)")],
    data: Annotated[list[str], typer.Option(
        help="data file, repeatable: PATH or FORMAT:PATH (formats: auto, pairs, cc3m, webvid, audiocap, "
             "comprehension, generation, t2x, mosit, jsonl, captions), or 'builtin' / 'builtin:image' "
             "for the shipped caption list")],
    out: Annotated[Path, typer.Option(help="run folder: checkpoint/, metrics.jsonl, export/")],
    preset: Annotated[str, typer.Option("--preset", "-p", help="preset name or YAML file")] = "tiny",
    modality: Annotated[str | None, typer.Option(help="modality of caption lists / rows that do not say")] = None,
    media_root: Annotated[Path | None, typer.Option(help="folder to resolve media file names against")] = None,
    modalities: Annotated[str | None, typer.Option(help="train only these, e.g. image,audio")] = None,
    export: Annotated[Path | None, typer.Option(help="export folder (default OUT/export)")] = None,
    init_from: Annotated[Path | None, typer.Option(help="start from this export (e.g. an earlier stage's)")] = None,
    max_steps: Annotated[int, typer.Option(min=1)] = 200,
    batch_size: Annotated[int, typer.Option(min=1, help="examples per step (per worker)")] = 8,
    lr: Annotated[float, typer.Option(min=0.0, help="projectors' learning rate")] = 1e-3,
    rows_lr: Annotated[float | None, typer.Option(help="token rows' learning rate (default --lr)")] = None,
    lora_lr: Annotated[float | None, typer.Option(help="LoRA learning rate (default --lr)")] = None,
    weight_decay: Annotated[float, typer.Option(min=0.0, help="on projector / LoRA matrices, never token rows")] = 0.0,
    warmup_steps: Annotated[int, typer.Option(min=0)] = 0,
    schedule: Annotated[str, typer.Option(help="constant, linear, cosine")] = "cosine",
    grad_clip: Annotated[float, typer.Option(help="max gradient norm (0: off)")] = 1.0,
    seed: Annotated[int, typer.Option(min=0)] = 0,
    ce_weight: Annotated[float, typer.Option(min=0.0)] = 1.0,
    mse_weight: Annotated[float, typer.Option(min=0.0, help="per-token Euclidean distance to the caption target")] = (
        1.0),
    noise_weight: Annotated[float, typer.Option(min=0.0, help=">0: noise-prediction loss through the frozen UNet "
                                                              "(image / video; needs the media files)")] = 0.0,
    token_rows: Annotated[str, typer.Option(help="new token rows that learn: none, output, all")] = "all",
    cache_states: Annotated[str, typer.Option(help="auto, on, off: decode-stage LLM states computed once")] = "auto",
    signal_ce: Annotated[str, typer.Option(help="all (NExT-GPT) or first: signal tokens of an output group that take "
                                           "the next-token loss")] = "all",
    lora_r: Annotated[int, typer.Option(min=1)] = 32,
    lora_alpha: Annotated[float, typer.Option()] = 32.0,
    lora_dropout: Annotated[float, typer.Option(min=0.0, max=0.99)] = 0.1,
    lora_targets: Annotated[str, typer.Option(help="comma-separated module names")] = "q_proj,k_proj,v_proj,o_proj",
    prompt_template: Annotated[str, typer.Option(help="decode: user message made from {caption}")] = "{caption}",
    instruction: Annotated[str, typer.Option(help="encode: the request after the {modality}")] = (
        "Describe this {modality} briefly."),
    max_tokens: Annotated[int, typer.Option(min=8, help="longest training sequence (longer ones are skipped)")] = 512,
    max_examples: Annotated[int | None, typer.Option(min=1, help="use the first N records of each data file")] = None,
    checkpoint_every: Annotated[int, typer.Option(min=1)] = 100,
    stop_after: Annotated[int | None, typer.Option(min=1, help="stop (with a checkpoint) after this step")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="continue the run in OUT from its checkpoint")] = False,
    log_every: Annotated[int, typer.Option(min=1)] = 10,
    progress: Annotated[bool, typer.Option("--progress/--no-progress")] = True,
    tensorboard: Annotated[bool, typer.Option("--tensorboard/--no-tensorboard")] = True,
    device: Annotated[str | None, typer.Option(help="cpu, cuda (default: cuda if available)")] = None,
    ray: Annotated[bool, typer.Option("--ray", help="run on Ray Train (TorchTrainer, DDP)")] = False,
    num_workers: Annotated[int, typer.Option(min=1, help="Ray Train workers")] = 2,
    cpus_per_worker: Annotated[int, typer.Option(min=1, help="CPUs (torch threads) per Ray Train worker")] = 1,
    ray_address: Annotated[str | None, typer.Option(help="attach to this Ray cluster (default: a private one)")] = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    """Train one stage, write a resume checkpoint while going and an export at the end.

    The export (OUT/export) holds only the trained parts; pass it to `polymodal generate --projectors DIR`
    or `polymodal serve --projectors DIR`.
    """
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    from pydantic import ValidationError

    from polymodal.llm import LLMLoadError
    from polymodal.modality import Modality
    from training.align.config import DataSource, TrainConfig
    from training.align.data import DataFormatError, parse_data_arg
    from training.align.launch import train as run_train
    from training.align.trainer import TrainError

    try:
        mod = Modality.parse(modality) if modality else None
        sources = []
        for d in data:
            spec = parse_data_arg(d, modality=mod, media_root=str(media_root) if media_root else None)
            sources.append(DataSource(path=spec.path, format=spec.format, modality=spec.modality,
                                      media_root=spec.media_root))
        config = TrainConfig(
            stage=stage, preset=preset, data=sources, out_dir=str(out), export_dir=str(export) if export else None,
            init_from=str(init_from) if init_from else None,
            modalities=Modality.parse_list(modalities) or None,
            max_steps=max_steps, batch_size=batch_size, lr=lr, rows_lr=rows_lr, lora_lr=lora_lr,
            weight_decay=weight_decay, warmup_steps=warmup_steps, schedule=schedule,
            grad_clip=grad_clip or None, seed=seed, ce_weight=ce_weight, mse_weight=mse_weight,
            noise_weight=noise_weight, token_rows=token_rows, cache_states=cache_states, signal_ce=signal_ce,
            lora_r=lora_r, lora_alpha=lora_alpha, lora_dropout=lora_dropout,
            lora_targets=[t.strip() for t in lora_targets.split(",") if t.strip()],
            prompt_template=prompt_template, instruction=instruction, max_tokens=max_tokens,
            max_examples=max_examples,
            checkpoint_every=checkpoint_every, stop_after=stop_after, resume=resume, log_every=log_every,
            progress=progress, tensorboard=tensorboard, device=device, ray=ray, num_workers=num_workers,
            cpus_per_worker=cpus_per_worker,
            ray_address=ray_address,
        )
    except ValidationError as e:
        _fail("; ".join(f"{'.'.join(map(str, err['loc'])) or 'config'}: {err['msg']}" for err in e.errors()))
    except ValueError as e:
        _fail(str(e))
    try:
        result = run_train(config)
    except (TrainError, DataFormatError, LLMLoadError, ValueError, OSError) as e:
        _fail(str(e))
    summary = ", ".join(f"{k} {v:.4f}" for k, v in result.last.items())
    typer.echo(f"step {result.step}/{config.max_steps} ({summary})", err=True)
    if result.export_dir is not None:
        typer.echo(f"exported to {result.export_dir}")
    else:
        typer.echo(f"stopped at step {result.step}; continue with --resume --out {config.out_dir}")


def main() -> None:
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
