"""The configuration of a training run (pydantic: it comes from the command line or a YAML/JSON file)."""

from __future__ import annotations

import hashlib
import json
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from polymodal.modality import Modality

Stage = Literal["encode", "decode", "instruct"]
STAGES: tuple[str, ...] = ("encode", "decode", "instruct")

# Fields that do not change what a run computes: a resumed run may differ in them.
_RUN_ONLY = frozenset({"out_dir", "export_dir", "resume", "stop_after", "progress", "log_every", "checkpoint_every",
                       "ray", "num_workers", "cpus_per_worker", "ray_address", "device", "tensorboard"})


class DataSource(BaseModel):
    """One data file (see :mod:`training.align.data`)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    path: str
    format: str = "auto"
    modality: Modality | None = None
    media_root: str | None = None


class TrainConfig(BaseModel):
    """A training run of one NExT-GPT stage.

    Stages (NExT-GPT, arXiv 2309.05519, sec. 4):

    - ``encode``: encoding-side alignment. Input projectors learn from (medium, caption) pairs with the
      caption cross-entropy; the LLM and the encoders are frozen.
    - ``decode``: decoding-side alignment. Output projectors and the signal-token rows learn from captions,
      the LLM frozen; loss = ``ce_weight`` * CE on the signal group after the caption + ``mse_weight`` *
      mean per-token Euclidean distance between the projector output (Q, D_cond) and the decoder text
      encoder's embedding of the caption (+ ``noise_weight`` * the frozen UNet's noise-prediction MSE).
    - ``instruct``: instruction tuning. A LoRA (``lora_r`` on ``lora_targets``) on the LLM plus both
      projectors and the new token rows, on dialogues (MosIT, text-to-X), same losses.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    stage: Stage
    preset: str = "tiny"
    data: list[DataSource] = Field(..., min_length=1)
    out_dir: str
    export_dir: str | None = Field(None, description="default: OUT_DIR/export")
    init_from: str | None = Field(None, description="an export to start from (projectors, token rows)")
    modalities: list[Modality] | None = Field(None, description="train only these; default: all in the data")

    max_steps: int = Field(200, ge=1, le=10_000_000)
    batch_size: int = Field(8, ge=1, le=4096, description="examples per step per worker")
    lr: float = Field(1e-3, gt=0.0, le=1.0, description="projectors' learning rate")
    rows_lr: float | None = Field(None, gt=0.0, le=1.0, description="token rows' learning rate (default lr)")
    lora_lr: float | None = Field(None, gt=0.0, le=1.0, description="LoRA learning rate (default lr)")
    weight_decay: float = Field(0.0, ge=0.0, le=1.0, description="on projector and LoRA matrices; never on token rows")
    warmup_steps: int = Field(0, ge=0)
    schedule: Literal["constant", "linear", "cosine"] = "cosine"
    grad_clip: float | None = Field(1.0, gt=0.0)
    seed: int = Field(0, ge=0)

    ce_weight: float = Field(1.0, ge=0.0)
    mse_weight: float = Field(1.0, ge=0.0)
    noise_weight: float = Field(0.0, ge=0.0, description=">0 adds the noise-prediction loss through the frozen UNet")
    token_rows: Literal["none", "output", "all"] = Field(
        "all", description="new token rows that learn: none, output (LM-head rows), all (input and output)")
    signal_ce: Literal["all", "first"] = Field(
        "all", description="which signal tokens of an output group take the next-token loss: all (NExT-GPT), or "
        "first (the LLM still learns to open the group; the states of the rest answer to the decoding-side loss "
        "alone: in the toy world, video after a 32-token lead-in 43.5% -> 96.0% through the service)")
    cache_states: Literal["auto", "on", "off"] = Field(
        "auto", description="decode: compute the frozen LLM's states once when nothing upstream of them trains")

    lora_r: int = Field(32, ge=1, le=1024)
    lora_alpha: float = Field(32.0, gt=0.0)
    lora_dropout: float = Field(0.1, ge=0.0, lt=1.0)
    lora_targets: list[str] = ["q_proj", "k_proj", "v_proj", "o_proj"]
    continue_lora: bool = Field(False, description="instruct from an export that holds a LoRA: keep training that "
                                "adapter (its r and targets must be lora_r and lora_targets) instead of refusing")

    prompt_template: str = Field("{caption}", description="decode: the user message made from a caption")
    instruction: str = Field("Describe this {modality} briefly.", description="encode: the user's request")
    max_tokens: int = Field(512, ge=8, description="longest training sequence (longer ones are skipped)")
    max_examples: int | None = Field(None, ge=1, description="use the first N usable records of each data file")

    checkpoint_every: int = Field(100, ge=1)
    stop_after: int | None = Field(None, ge=1, description="stop (with a checkpoint) after this step")
    resume: bool = False
    log_every: int = Field(10, ge=1)
    progress: bool = True
    tensorboard: bool = True
    device: str | None = None

    ray: bool = False
    num_workers: int = Field(2, ge=1, le=4096)
    cpus_per_worker: int = Field(1, ge=1, le=1024, description="CPUs (and torch threads) per Ray Train worker")
    ray_address: str | None = None

    @model_validator(mode="after")
    def _check(self) -> TrainConfig:
        if "{caption}" not in self.prompt_template:
            raise ValueError("prompt_template must contain {caption}")
        if self.stage == "encode" and self.noise_weight > 0:
            raise ValueError("noise_weight applies to the decode and instruct stages (output projectors)")
        return self

    @property
    def export_path(self) -> str:
        return self.export_dir or f"{self.out_dir.rstrip('/')}/export"

    def fingerprint(self) -> str:
        """Hash of the fields that decide what a run computes (a resume must match it)."""
        body = {k: v for k, v in self.model_dump(mode="json").items() if k not in _RUN_ONLY}
        return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()[:16]

    def differing_fields(self, other: dict) -> list[str]:
        mine = {k: v for k, v in self.model_dump(mode="json").items() if k not in _RUN_ONLY}
        theirs = {k: v for k, v in other.items() if k not in _RUN_ONLY}
        return sorted(k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k))
