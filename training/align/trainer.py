"""The training loop of one stage: setup, steps, resume checkpoints, metrics, export.

:func:`run` runs a stage in this process; Ray Train's workers (:mod:`training.align.ray_train`) run it with their
rank, and :func:`training.align.launch.train` picks one or the other. This module imports neither of them.

Determinism: example order is a stream of seeded per-epoch permutations, so the data position is the
step; a resume checkpoint holds the trained parameters, the optimizer and scheduler states, every rank's
RNG states and the step, and a resumed run ends with the same weights as an uninterrupted one.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import random
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from polymodal.config import PresetConfig
from polymodal.modality import Modality
from polymodal.presets import get_preset
from training.align.config import TrainConfig
from training.align.data import (
    DataFormatError,
    DataSpec,
    GroundedSpan,
    MediaRef,
    TaskRef,
    check_media,
    read_records,
)
from training.align.model import (
    AlignmentModel,
    EncodedExample,
    SequenceBuilder,
    SequenceTooLong,
    TokenRows,
)
from training.align.stages import StageSpec, stage_spec

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "polymodal-train-checkpoint"
CHECKPOINT_VERSION = 1


class TrainError(RuntimeError):
    """A run that cannot start or continue (the message says why and what to do)."""


# --------------------------------------------------------------------------------------------------
# model parts


@dataclass
class Parts:
    """The model a run starts from: the LLM stage (engine, encoders, input projectors) and the decoder
    stages (output projector + decoder) of the output modalities."""

    preset: PresetConfig
    llm: Any  # polymodal.pipeline.LLMStage
    decoders: dict[Modality, Any] = field(default_factory=dict)  # Modality -> DecoderStage

    def fresh_copy(self) -> Parts:
        """Copies of everything a run changes (LLM, projectors); encoders and decoders are frozen and shared."""
        llm = copy.copy(self.llm)
        llm.engine = copy.deepcopy(self.llm.engine)
        llm.input_projectors = copy.deepcopy(self.llm.input_projectors)
        decoders = {}
        for m, st in self.decoders.items():
            c = copy.copy(st)
            c.projector = copy.deepcopy(st.projector)
            decoders[m] = c
        return Parts(self.preset, llm, decoders)


def load_parts(preset: str | PresetConfig, *, output_modalities: Sequence[Modality] | None = None,
               device: str | None = None, init_from: str | None = None) -> Parts:
    """Build the preset's parts as inference does (same seeds), starting from the export ``init_from``.

    ``output_modalities``: decoder stages to build (default: every decoder of the preset).

    Raises:
        ValueError: a modality the preset has no decoder for. The loaders' errors.
    """
    from polymodal.pipeline import build_decoder_stage, build_llm_stage

    preset = get_preset(preset)
    llm = build_llm_stage(preset, device=device, export_dir=init_from)
    mods = list(preset.decoders) if output_modalities is None else list(output_modalities)
    decoders = {m: build_decoder_stage(preset, m, device=device, export_dir=init_from, d_llm=llm.engine.d_llm)
                for m in mods}
    return Parts(preset, llm, decoders)


# --------------------------------------------------------------------------------------------------
# results and metrics


@dataclass
class TrainResult:
    """What a run did. ``completed``: reached ``max_steps`` (and exported); else stopped by ``stop_after``."""

    step: int
    completed: bool
    out_dir: Path
    export_dir: Path | None
    metrics_path: Path
    last: dict[str, float]
    num_examples: int
    cached_states: bool
    model: AlignmentModel | None = None  # the in-process model (single-process runs)
    optimizer: torch.optim.Optimizer | None = None


class MetricsLog:
    """``metrics.jsonl`` (one object per logged step) and TensorBoard scalars when tensorboardX or
    tensorboard is installed."""

    def __init__(self, out_dir: Path, *, resume_step: int, tensorboard: bool):
        self.path = out_dir / "metrics.jsonl"
        if self.path.exists():
            keep = []
            for line in self.path.read_text().splitlines():
                try:
                    if json.loads(line).get("step", 0) <= resume_step:
                        keep.append(line)
                except json.JSONDecodeError:
                    continue
            self.path.write_text("".join(x + "\n" for x in keep))
        self.writer = None
        if tensorboard:
            try:
                from tensorboardX import SummaryWriter
            except ImportError:
                try:
                    from torch.utils.tensorboard import SummaryWriter
                except ImportError:
                    SummaryWriter = None
            if SummaryWriter is not None:
                self.writer = SummaryWriter(str(out_dir / "tensorboard"))

    def write(self, row: dict[str, Any]) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        if self.writer is not None:
            for k, v in row.items():
                if isinstance(v, (int, float)) and k not in ("step", "epoch"):
                    self.writer.add_scalar(f"train/{k}", v, row["step"])

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def read_metrics(out_dir: str | Path) -> list[dict[str, Any]]:
    """The rows of ``OUT_DIR/metrics.jsonl``."""
    p = Path(out_dir) / "metrics.jsonl"
    return [json.loads(x) for x in p.read_text().splitlines() if x.strip()] if p.exists() else []


# --------------------------------------------------------------------------------------------------
# setup


def _load_input_medium(ref: MediaRef, encoder) -> torch.Tensor:
    """A medium file -> (N, D_enc) encoder tokens (what the input projector reads): decoded as the service decodes
    an upload (:func:`polymodal.media_io.decode_media`; audio at the encoder's rate, default 16 kHz)."""
    from polymodal import media_io

    data = ref.path.read_bytes()
    try:
        part = media_io.decode_media(ref.modality, data, sample_rate_hz=encoder.sample_rate_hz or 16000)
    except ValueError as e:
        raise DataFormatError(f"cannot decode {ref.path}: {e}") from e
    return encoder.encode_tokens([part.data], sample_rate_hz=part.sample_rate_hz)[0].float().cpu()


def _image_frames(data: bytes, d) -> list[np.ndarray]:
    from polymodal.media.image import decode_image

    return [decode_image(data)]


def _video_frames(data: bytes, d) -> list[np.ndarray]:
    from polymodal.media.video import decode_video

    return list(decode_video(data, num_frames=d.num_frames)[0])


# The modalities the noise-prediction loss supports (a VAE decoder over RGB frames): how a file becomes frames at
# the decoder's defaults, and whether its latents keep a frame axis (video (4, F, h, w)) or not (image (4, h, w)).
NOISE_FRAMES = {Modality.IMAGE: (_image_frames, False), Modality.VIDEO: (_video_frames, True)}


def _encode_latents(ref: MediaRef, decoder) -> torch.Tensor:
    """An output medium file -> VAE latents of the decoder at its default size (noise loss).

    image: (4, h, w); video: (4, F, h, w) with the decoder's default frame count.

    Raises:
        ValueError: a modality the noise-prediction loss does not support (see :data:`NOISE_FRAMES`).
    """
    from PIL import Image

    if ref.modality not in NOISE_FRAMES:
        raise ValueError("the noise-prediction loss supports image and video decoders")
    to_frames, has_frames = NOISE_FRAMES[ref.modality]
    pipe = decoder.pipeline
    d = decoder.defaults
    frames = to_frames(ref.path.read_bytes(), d)
    pix = np.stack([np.asarray(Image.fromarray(f).resize((d.width_px, d.height_px), Image.BICUBIC)) for f in frames])
    x = torch.from_numpy(pix).float().permute(0, 3, 1, 2) / 127.5 - 1.0
    vae = pipe.vae
    with torch.no_grad():
        lat = vae.encode(x.to(vae.device, vae.dtype)).latent_dist.mean * vae.config.scaling_factor
    lat = lat.float().cpu()
    return lat.permute(1, 0, 2, 3) if has_frames else lat[0]


def _load_target(ref: MediaRef, shape: tuple[int, int]) -> torch.Tensor | None:
    if ref.embedding_path is None or not ref.embedding_path.is_file():
        return None
    arr = np.load(ref.embedding_path)
    t = torch.from_numpy(np.asarray(arr, dtype=np.float32))
    if t.ndim == 1 and shape[0] == 1:
        t = t.unsqueeze(0)
    if t.ndim == 3 and t.shape[0] == 1:
        t = t[0]
    if tuple(t.shape) != tuple(shape):
        raise DataFormatError(f"caption embedding {ref.embedding_path} has shape {tuple(arr.shape)}; this "
                              f"decoder's conditioning is {tuple(shape)}")
    return t


def _lambda(config: TrainConfig):
    def f(step: int) -> float:
        if config.warmup_steps and step < config.warmup_steps:
            return (step + 1) / config.warmup_steps
        if config.schedule == "constant":
            return 1.0
        span = max(1, config.max_steps - config.warmup_steps)
        frac = min(1.0, (step - config.warmup_steps) / span)
        return 1.0 - frac if config.schedule == "linear" else 0.5 * (1.0 + math.cos(math.pi * frac))
    return f


def _without_lora(init: Path, tmp: Path) -> Path:
    """A view of the export ``init`` without its LoRA (links to its other files; ``export.json`` without the
    ``lora`` part) in ``tmp``, so that loading it leaves the LLM's weights unmerged."""
    view = tmp / "export"
    view.mkdir()
    for f in init.iterdir():
        if f.name == "export.json":
            body = json.loads(f.read_text())
            body["parts"] = [p for p in body.get("parts", []) if p != "lora"]
            (view / f.name).write_text(json.dumps(body, indent=2))
        elif f.name != "lora":
            (view / f.name).symlink_to(f.resolve())
    return view


def _continue_lora(engine, lora_dir: Path, config: TrainConfig):
    """The LoRA of ``lora_dir`` on ``engine.model``, trainable (``continue_lora``).

    Raises:
        TrainError: its r or target modules differ from ``config``'s, or peft cannot load it.
    """
    from peft import PeftModel

    saved = json.loads((lora_dir / "adapter_config.json").read_text())
    if saved.get("r") != config.lora_r or sorted(saved.get("target_modules") or []) != sorted(config.lora_targets):
        raise TrainError(f"{lora_dir}: r {saved.get('r')} on {saved.get('target_modules')}; continue_lora needs "
                         f"lora_r {config.lora_r} on {config.lora_targets}")
    try:
        return PeftModel.from_pretrained(engine.model, str(lora_dir), is_trainable=True)
    except (ValueError, KeyError, RuntimeError, OSError) as e:
        raise TrainError(f"{lora_dir}: cannot load the LoRA to keep training it: {e}") from e


def _add_lora(engine, config: TrainConfig):
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                     target_modules=list(config.lora_targets), bias="none")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed + 7)
        try:
            peft_model = get_peft_model(engine.model, cfg)
        except ValueError as e:
            raise TrainError(f"cannot add a LoRA on {config.lora_targets}: {e}") from e
    return peft_model


@dataclass
class Setup:
    """Everything a run needs, built once (and once per Ray worker)."""

    config: TrainConfig
    spec: StageSpec
    parts: Parts
    model: AlignmentModel
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    trained_inputs: list[Modality]
    trained_outputs: list[Modality]
    peft_model: Any = None
    skipped: int = 0


def setup(config: TrainConfig, parts: Parts | None = None) -> Setup:
    """Read the data, load (or take) the model parts, and build the model, optimizer and scheduler.

    Raises:
        ValueError / DataFormatError / MissingMediaError: bad data (naming the row).
        TrainError: nothing to train on, or an incompatible starting point.
    """
    spec = stage_spec(config.stage)
    records, dialogues = [], []
    for src in config.data:
        recs = read_records(DataSpec(src.path, src.format, src.modality, src.media_root))
        usable = [d for d in (spec.to_dialogue(r, config) for r in recs) if d is not None]
        records.extend(recs)
        dialogues.extend(usable[:config.max_examples] if config.max_examples else usable)
    if not dialogues:
        raise TrainError(f"none of the {len(records)} records read is usable by the {config.stage} stage "
                         f"(encode: media with captions; decode: captions or dialogues with output media; "
                         f"instruct: dialogues)" + (f" for modalities {[m.value for m in config.modalities]}"
                                                     if config.modalities else ""))
    out_mods = sorted({r.modality for d in dialogues for r in d.media("assistant")}, key=lambda m: m.value)
    in_mods = sorted({r.modality for d in dialogues for r in d.media("user")}, key=lambda m: m.value)
    noise_mods = [m for m in out_mods if m in NOISE_FRAMES] if config.noise_weight > 0 else []
    if config.noise_weight > 0 and not noise_mods:
        raise TrainError("noise_weight > 0 but no image or video outputs to render (the noise-prediction loss "
                         "supports image and video decoders)")
    check_media(dialogues, inputs=bool(in_mods), outputs=False)
    if noise_mods:
        check_media([d for d in dialogues if any(r.modality in noise_mods for r in d.media("assistant"))],
                    inputs=False, outputs=True)

    init_lora = Path(config.init_from) / "lora" if config.init_from else None
    resume_lora = bool(spec.lora and init_lora is not None and (init_lora / "adapter_config.json").is_file())
    if resume_lora and not config.continue_lora:
        raise TrainError(f"{config.init_from} holds a LoRA; a new LoRA trained on top of it cannot be exported as "
                         "one adapter. Start the instruct stage from an export without lora/, or set "
                         "continue_lora to keep training that adapter.")
    if resume_lora and parts is not None:
        raise TrainError("continue_lora loads the parts itself (the LoRA of init_from unmerged); pass no parts")
    preset = get_preset(config.preset)
    for m in out_mods:
        if m not in preset.decoders or m not in preset.output_projectors:
            raise TrainError(f"preset {preset.name!r} has no {m.value} decoder; drop those records or pick "
                             f"--modalities from: {', '.join(x.value for x in preset.decoders)}")
    if resume_lora:
        with tempfile.TemporaryDirectory(prefix="polymodal-init-") as tmp:
            parts = load_parts(preset, output_modalities=out_mods, device=config.device,
                               init_from=str(_without_lora(Path(config.init_from), Path(tmp))))
    elif parts is None:
        parts = load_parts(preset, output_modalities=out_mods, device=config.device, init_from=config.init_from)
    engine = parts.llm.engine
    dev = engine.device

    # freeze everything; then switch on what this stage trains
    engine.model.requires_grad_(False)
    for st in parts.decoders.values():
        st.projector.requires_grad_(False)
        for comp in (getattr(st.decoder.pipeline, n, None) for n in ("unet", "vae", "text_encoder")):
            if isinstance(comp, nn.Module):
                comp.requires_grad_(False)
    for p in parts.llm.input_projectors.values():
        p.requires_grad_(False)
    peft_model = (_continue_lora(engine, init_lora, config) if resume_lora else _add_lora(engine, config)) \
        if spec.lora else None

    trained_inputs = [m for m in in_mods if spec.input_projectors]
    trained_outputs = [m for m in out_mods if spec.output_projectors]
    # trained projectors learn in float32 (an fp16 preset keeps fp16 only in its frozen parts)
    for m in trained_inputs:
        parts.llm.input_projectors[m].float().requires_grad_(True)
    for m in trained_outputs:
        parts.decoders[m].projector.float().requires_grad_(True)

    sig = engine.spec
    tokens: list[str] = []
    if "signal" in spec.token_kinds:
        tokens += [t for m in out_mods for t in sig.tokens[m]]
    if "marker" in spec.token_kinds:
        tokens += [t for m in in_mods for t in sig.input_markers[m]]
    if "grounding" in spec.token_kinds and preset.grounding is not None and any(
            isinstance(p, (TaskRef, GroundedSpan)) for d in dialogues for msg in d.messages for p in msg.parts):
        tokens += preset.grounding.added_tokens()
    if not tokens:  # nothing of this kind: hold the output signal rows, frozen
        tokens = [t for m in out_mods for t in sig.tokens[m]]
    rows = TokenRows(engine, tokens, train_input=config.token_rows == "all", train_output=config.token_rows != "none")
    if config.token_rows == "none":
        rows.requires_grad_(False)
    rows.to(dev)

    builder = SequenceBuilder(engine, {m: p.prompt_tokens(parts.llm.encoders[m].num_tokens)
                                       for m, p in parts.llm.input_projectors.items()},
                              config.max_tokens, grounding=preset.grounding, signal_ce=config.signal_ce)
    examples: list[EncodedExample] = []
    skipped = 0
    for d in dialogues:
        try:
            examples.append(builder.build(d))
        except SequenceTooLong as e:
            skipped += 1
            log.warning("skipped: %s", e)
    if not examples:
        raise TrainError(f"every example is longer than max_tokens={config.max_tokens}")

    # frozen encoders: embed every input medium once
    input_embeds: dict[MediaRef, torch.Tensor] = {}
    refs = list(dict.fromkeys(s.media for ex in examples for s in ex.inputs))
    for ref in _progress(refs, "encoding media", config.progress):
        input_embeds[ref] = _load_input_medium(ref, parts.llm.encoders[ref.modality])

    # decoding-side targets: the decoder's own text encoder on each caption, once
    targets: dict[Modality, torch.Tensor] = {}
    target_keys: dict[tuple[int, int], int] = {}
    for m in out_mods:
        dec = parts.decoders[m].decoder
        shape = tuple(dec.cond_shape)
        slots = [(i, k, s.media) for i, ex in enumerate(examples) for k, s in enumerate(ex.outputs) if s.modality is m]
        key_of: dict[tuple, int] = {}
        rows_t: list[torch.Tensor | None] = []
        pending: list[tuple[int, str]] = []
        for i, k, ref in slots:
            key = (ref.caption, ref.embedding_path)
            if key not in key_of:
                key_of[key] = len(rows_t)
                t = _load_target(ref, shape)
                rows_t.append(t)
                if t is None:
                    pending.append((key_of[key], ref.caption))
            target_keys[(i, k)] = key_of[key]
        for start in _progress(range(0, len(pending), 64), f"encoding {m.value} captions", config.progress):
            chunk = pending[start:start + 64]
            emb = dec.encode_text([c for _, c in chunk]).float().cpu()
            for (j, _), e in zip(chunk, emb):
                rows_t[j] = e.reshape(shape)
        targets[m] = torch.stack(rows_t).to(dev)

    latents: dict[MediaRef, torch.Tensor] = {}
    rendered = list(dict.fromkeys(s.media for ex in examples for s in ex.outputs if s.modality in noise_mods))
    for ref in _progress(rendered, "encoding target media", config.progress):
        latents[ref] = _encode_latents(ref, parts.decoders[ref.modality].decoder)

    input_rows_train = rows.input_rows.requires_grad
    can_cache = config.stage == "decode" and not input_rows_train and not spec.lora and not trained_inputs
    if config.cache_states == "on" and not can_cache:
        raise TrainError("cache_states=on needs the decode stage with frozen input rows (token_rows none, or output "
                         "on a model whose LM head is not tied to its embeddings)")
    cached = can_cache and config.cache_states != "off"

    model = AlignmentModel(
        engine,
        {m: p for m, p in parts.llm.input_projectors.items()},
        {m: parts.decoders[m].projector for m in out_mods},
        rows,
        examples=examples,
        input_embeds=input_embeds,
        targets=targets,
        target_keys=target_keys,
        weights={"ce": config.ce_weight, "mse": config.mse_weight, "noise": config.noise_weight},
        decoders={m: parts.decoders[m].decoder for m in noise_mods},
        latents=latents,
        cached=cached,
        progress=config.progress,
    )
    optimizer = _optimizer(model, config)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lambda(config))
    return Setup(config, spec, parts, model, optimizer, scheduler, trained_inputs, trained_outputs, peft_model, skipped)


def _optimizer(model: AlignmentModel, config: TrainConfig) -> torch.optim.Optimizer:
    """AdamW; weight decay on projector and LoRA matrices only, never on token rows, biases or norms."""
    decay, no_decay, lora_decay, lora_no_decay, rows = [], [], [], [], []
    for name, p in model.trainable().items():
        if name.startswith("rows."):
            rows.append(p)
        elif "lora_" in name:
            (lora_decay if p.ndim >= 2 else lora_no_decay).append(p)
        else:
            (decay if p.ndim >= 2 else no_decay).append(p)
    if not (decay or no_decay or lora_decay or lora_no_decay or rows):
        raise TrainError("nothing to train (every part is frozen)")
    lora_lr = config.lora_lr or config.lr
    groups = [
        {"params": decay, "lr": config.lr, "weight_decay": config.weight_decay, "name": "projectors"},
        {"params": no_decay, "lr": config.lr, "weight_decay": 0.0, "name": "projectors_no_decay"},
        {"params": lora_decay, "lr": lora_lr, "weight_decay": config.weight_decay, "name": "lora"},
        {"params": lora_no_decay, "lr": lora_lr, "weight_decay": 0.0, "name": "lora_no_decay"},
        {"params": rows, "lr": config.rows_lr or config.lr, "weight_decay": 0.0, "name": "token_rows"},
    ]
    return torch.optim.AdamW([g for g in groups if g["params"]])


def _progress(items, desc: str, enabled: bool):
    if not enabled or len(items) < 2:
        return items
    from tqdm.auto import tqdm

    return tqdm(items, desc=desc, leave=False)


# --------------------------------------------------------------------------------------------------
# checkpoints


def checkpoint_path(out_dir: str | Path) -> Path:
    return Path(out_dir) / "checkpoint" / "state.pt"


def _rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
    }


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(tuple(state["python"]) if not isinstance(state["python"], tuple) else state["python"])
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), *rest))


def save_checkpoint(s: Setup, step: int, rng_states: list[dict[str, Any]]) -> Path:
    """Write the resume checkpoint atomically: trained parameters, optimizer, scheduler, RNG states of
    every rank, the step (= the data position) and the config it was trained with."""
    path = checkpoint_path(s.config.out_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    body = {
        "format": CHECKPOINT_FORMAT,
        "version": CHECKPOINT_VERSION,
        "step": step,
        "config": s.config.model_dump(mode="json"),
        "fingerprint": s.config.fingerprint(),
        "trainable": {k: v.detach().cpu() for k, v in s.model.trainable().items()},
        "optimizer": s.optimizer.state_dict(),
        "scheduler": s.scheduler.state_dict(),
        "rng": rng_states,
    }
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".state.", suffix=".tmp")
    os.close(fd)
    try:
        torch.save(body, tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def load_checkpoint(s: Setup, rank: int = 0) -> int:
    """Restore a resume checkpoint into ``s``; returns its step.

    Raises:
        TrainError: another format, another configuration (names the differing fields), or parameters
            that do not match this model.
    """
    path = checkpoint_path(s.config.out_dir)
    body = torch.load(path, map_location="cpu", weights_only=True)
    if body.get("format") != CHECKPOINT_FORMAT or body.get("version") != CHECKPOINT_VERSION:
        raise TrainError(f"{path} is not a polymodal training checkpoint v{CHECKPOINT_VERSION}")
    if body["fingerprint"] != s.config.fingerprint():
        diff = s.config.differing_fields(body["config"])
        raise TrainError(f"{path} was written by a run with another configuration (differs in: "
                         f"{', '.join(diff) or 'derived settings'}); use another --out or the same settings")
    mine = s.model.trainable()
    theirs = body["trainable"]
    if set(mine) != set(theirs):
        missing, extra = sorted(set(mine) - set(theirs)), sorted(set(theirs) - set(mine))
        raise TrainError(f"{path}: trained parameters differ (missing {missing[:5]}, unexpected {extra[:5]})")
    with torch.no_grad():
        for k, p in mine.items():
            if p.shape != theirs[k].shape:
                raise TrainError(f"{path}: {k} is {tuple(theirs[k].shape)}, the model's {tuple(p.shape)}")
            p.copy_(theirs[k].to(p.device, p.dtype))
    s.optimizer.load_state_dict(body["optimizer"])
    s.scheduler.load_state_dict(body["scheduler"])
    rng = body["rng"]
    _set_rng_state(rng[rank] if rank < len(rng) else rng[0])
    return int(body["step"])


# --------------------------------------------------------------------------------------------------
# export


def export_trained(s: Setup, step: int) -> Path:
    """Write the export folder (see :mod:`polymodal.export`): the trained projectors, the token rows, the
    LoRA, and the parts of ``init_from`` this run did not retrain; then ``export.json``."""
    import shutil

    from polymodal.export import read_manifest, save_token_rows, write_manifest
    from projectors import save_projector

    cfg = s.config
    d = Path(cfg.export_path)
    d.mkdir(parents=True, exist_ok=True)
    meta = {"stage": cfg.stage, "step": str(step), "preset": s.parts.preset.name}
    written: list[str] = []
    for m in s.trained_inputs:
        save_projector(s.parts.llm.input_projectors[m], d / f"input_{m.value}.safetensors", extra_metadata=meta)
        written.append(f"input_{m.value}")
    for m in s.trained_outputs:
        save_projector(s.parts.decoders[m].projector, d / f"output_{m.value}.safetensors", extra_metadata=meta)
        written.append(f"output_{m.value}")
    rows = s.model.rows
    rows.write_back()
    tokens = list(rows.tokens) if any(p.requires_grad for p in rows.parameters()) else []
    init = Path(cfg.init_from) if cfg.init_from else None
    if init is not None:
        body = read_manifest(init)
        for part in body.get("parts", []):
            src = init / f"{part}.safetensors"
            if part in written or not src.is_file() or part == "token_rows":
                continue
            shutil.copyfile(src, d / src.name)
            written.append(part)
        if (init / "lora" / "adapter_config.json").is_file() and s.peft_model is None:
            shutil.copytree(init / "lora", d / "lora", dirs_exist_ok=True)
            written.append("lora")
        if (init / "token_rows.safetensors").is_file():
            from safetensors import safe_open

            with safe_open(str(init / "token_rows.safetensors"), "pt") as f:
                tokens = list(dict.fromkeys(json.loads((f.metadata() or {}).get("tokens", "[]")) + tokens))
    if tokens:
        engine = s.parts.llm.engine
        ids = torch.tensor([engine._single_id(t) for t in tokens])
        emb = engine.model.get_input_embeddings().weight
        head = engine.model.get_output_embeddings()
        out_rows = None if head is None or head.weight is emb else head.weight[ids]
        save_token_rows(d / "token_rows.safetensors", tokens, emb[ids].detach(),
                        None if out_rows is None else out_rows.detach())
        written.append("token_rows")
    if s.peft_model is not None:
        # the new token rows go to token_rows.safetensors; the adapter holds only the LoRA matrices
        s.peft_model.save_pretrained(str(d / "lora"), save_embedding_layers=False)
        written.append("lora")
    write_manifest(d, s.parts.preset.name, sorted(set(written)),
                   extra={"trained_by": "polymodal train", "stage": cfg.stage, "steps": step,
                          "modalities": sorted({m.value for m in s.trained_inputs + s.trained_outputs})})
    return d


# --------------------------------------------------------------------------------------------------
# the loop


def batch_indices(num_examples: int, step: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1,
                  _perms: dict | None = None) -> list[int]:
    """Example indices of ``step`` on ``rank``: positions ``(step * world_size + rank) * batch_size ...`` of
    the stream of per-epoch permutations (seeded with ``seed`` and the epoch)."""
    perms = _perms if _perms is not None else {}
    out = []
    start = (step * world_size + rank) * batch_size
    for g in range(start, start + batch_size):
        epoch, pos = divmod(g, num_examples)
        if epoch not in perms:
            gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
            perms[epoch] = torch.randperm(num_examples, generator=gen).tolist()
            for old in [e for e in perms if e < epoch - 1]:
                del perms[old]
        out.append(perms[epoch][pos])
    return out


def run(config: TrainConfig, parts: Parts | None = None, *, rank: int = 0, world_size: int = 1) -> TrainResult:
    """Run (or resume) the stage in this process; with ``world_size > 1`` inside an initialised
    ``torch.distributed`` process group (gradients averaged by DDP).

    Raises:
        TrainError: a checkpoint exists and ``resume`` is off, or it does not fit this run.
        (and :func:`setup`'s errors)
    """
    import torch.distributed as dist

    out_dir = Path(config.out_dir)
    ckpt = checkpoint_path(out_dir)
    if ckpt.exists() and not config.resume:
        raise TrainError(f"{out_dir} already holds a checkpoint of a run; pass --resume to continue it, or use "
                         "another --out")
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(config.seed * 1000 + rank)
    random.seed(config.seed * 1000 + rank)
    np.random.seed(config.seed * 1000 + rank)
    s = setup(config, parts)
    start = load_checkpoint(s, rank) if ckpt.exists() else 0
    distributed = world_size > 1
    model: nn.Module = s.model
    if distributed:
        # a batch may leave a projector (or the marker rows) of another modality unused
        single = config.stage == "decode" and len(s.trained_outputs) == 1
        model = nn.parallel.DistributedDataParallel(s.model, find_unused_parameters=not single)
    metrics = MetricsLog(out_dir, resume_step=start, tensorboard=config.tensorboard) if rank == 0 else None
    n = len(s.model.examples)
    if rank == 0:
        log.info("%s stage: %d examples (%d skipped), %d trainable parameters, cached states: %s", config.stage,
                 n, s.skipped, sum(p.numel() for p in s.model.trainable().values()), s.model.cached)
    perms: dict = {}
    bar = None
    if config.progress and rank == 0:
        from tqdm.auto import tqdm

        bar = tqdm(total=config.max_steps, initial=start, desc=f"train {config.stage}", unit="step")
    t0 = time.perf_counter()
    sums: dict[str, float] = {}
    count = 0
    last: dict[str, float] = {}
    step = start
    stop = min(config.max_steps, config.stop_after) if config.stop_after else config.max_steps
    trainable = list(s.model.trainable().values())
    try:
        while step < stop:
            s.model.train()
            idx = batch_indices(n, step, config.batch_size, config.seed, rank, world_size, perms)
            losses = model(idx)
            s.optimizer.zero_grad(set_to_none=True)
            losses.total.backward()
            if config.grad_clip:
                torch.nn.utils.clip_grad_norm_(trainable, config.grad_clip)
            s.optimizer.step()
            s.scheduler.step()
            step += 1
            for k, v in losses.parts.items():
                sums[k] = sums.get(k, 0.0) + float(v.detach())
            count += 1
            if step % config.log_every == 0 or step == stop:
                vals = torch.tensor([sums[k] / count for k in sorted(sums)], dtype=torch.float64)
                if distributed:
                    dist.all_reduce(vals)
                    vals /= world_size
                last = {k: float(v) for k, v in zip(sorted(sums), vals)}
                if metrics is not None:
                    metrics.write({"step": step, "epoch": round(step * config.batch_size * world_size / n, 3),
                                   **{k: round(v, 6) for k, v in last.items()},
                                   "lr": s.scheduler.get_last_lr()[0],
                                   "elapsed_s": round(time.perf_counter() - t0, 3)})
                if bar is not None:
                    bar.set_postfix({k: f"{v:.4f}" for k, v in last.items()})
                sums, count = {}, 0
            if bar is not None:
                bar.update(1)
            if step % config.checkpoint_every == 0 or step == stop:
                rng = [_rng_state()]
                if distributed:
                    gathered: list = [None] * world_size
                    dist.all_gather_object(gathered, rng[0])
                    rng = gathered
                if rank == 0:
                    save_checkpoint(s, step, rng)
                if distributed:
                    dist.barrier()
    finally:
        if bar is not None:
            bar.close()
        if metrics is not None:
            metrics.close()
    s.model.eval()
    completed = step >= config.max_steps
    export = None
    if completed:
        if rank == 0:
            export = export_trained(s, step)
        else:
            s.model.rows.write_back()
        if distributed:
            dist.barrier()
    return TrainResult(step=step, completed=completed, out_dir=out_dir, export_dir=export,
                       metrics_path=out_dir / "metrics.jsonl", last=last, num_examples=n,
                       cached_states=s.model.cached, model=None if distributed else s.model,
                       optimizer=None if distributed else s.optimizer)
