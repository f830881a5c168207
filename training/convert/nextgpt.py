"""Convert NExT-GPT's released delta (``pytorch_model.pt`` of 7b_tiva_v0) into a polymodal export folder.

NExT-GPT (Wu et al., 2023, arXiv 2309.05519; repository NExT-GPT/NExT-GPT, ``code/model/
anyToImageVideoAudio.py`` and ``code/model/layers.py``) saves, in one ``torch.save`` dict, every trainable
parameter of its ``NextGPTModel`` after stage 3 (LoRA r=32, alpha 32 on q,k,v,o of Vicuna-7B v0 through
peft 0.3, the resized token matrices, the input projector, the three output projectors). Key map
(``L`` layers, ``p`` in q,k,v,o, ``X`` in A,B; D_llm 4096, D_enc 1024, r 32, V = 32000 + 38):

=====================================================================  ======================================
NExT-GPT key (shape)                                                   export part
=====================================================================  ======================================
``llama_model.base_model.model.model.layers.{i}.self_attn.{p}_proj``   ``lora/adapter_model.safetensors``
``.lora_{X}[.default].weight`` (A: (r, D_llm), B: (D_out, r))          ``base_model.model.model.layers.{i}
                                                                       .self_attn.{p}_proj.lora_{X}.weight``
``llama_model.base_model.model.model.embed_tokens.weight`` (V, D_llm)  ``token_rows`` ``input_embeddings``
``llama_model.base_model.model.lm_head.weight`` (V, D_llm)             ``token_rows`` ``output_embeddings``
(stage-2 names ``llama_model.model.embed_tokens.weight`` /
``llama_model.lm_head.weight`` are accepted too)
``llama_proj.{weight,bias}`` ((D_llm, D_enc), (D_llm,))                ``input_{m}`` ``fc.*``, every modality
                                                                       (one ImageBind projection for all)
``gen_text_hidden_fcs.0.*`` / ``gen_text_hidden_fcs_video.0.*`` /      ``output_image`` / ``output_video`` /
``gen_text_hidden_fcs_audio.0.*``                                      ``output_audio`` (names through
                                                                       ``projectors.NEXTGPT_TRANSFORMER_KEY_MAP``)
``visual_encoder.*``                                                   dropped: frozen ImageBind-huge
=====================================================================  ======================================

Rows of the token matrices: ids ``0..B-1`` are the base vocabulary (Vicuna v0: B = 32000; the matrices were
trainable, so these rows moved too), ids ``B..V-1`` the added tokens in the order of the preset's
``llm.added_tokens`` (7b_tiva_v0: ``<Img> </Img> [IMG0..3] [VID0..23] [AUD0..7]``). NExT-GPT's later code
adds ``<Vid> </Vid> <Aud> </Aud>`` as well (B + 42 rows): another version, refused with a message.

Strict: every key is mapped or deliberately dropped (:data:`DROPPED_PREFIXES`), every expected key present,
every shape checked against the preset (and the base model's config when given); anything else raises
:class:`ConversionError` naming the keys.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from polymodal.config import PresetConfig
from polymodal.modality import Modality
from polymodal.presets import get_preset

log = logging.getLogger(__name__)

SOURCE_VERSION = "7b_tiva_v0"
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
# code/config/stage_3.yaml of the reference repository: r 32 (read from the shapes), alpha 32, dropout 0.1
NEXTGPT_LORA_ALPHA = 32.0
NEXTGPT_LORA_DROPOUT = 0.1
NEXTGPT_BASE_VOCAB_SIZE = 32000  # Vicuna-7B v0 / LLaMA tokenizer

_LORA_RE = re.compile(
    r"^llama_model\.base_model\.model\.model\.layers\.(\d+)\.self_attn\.([qkvo]_proj)\.lora_([AB])(\.default)?\.weight$"
)
EMBED_KEYS = ("llama_model.base_model.model.model.embed_tokens.weight", "llama_model.model.embed_tokens.weight")
HEAD_KEYS = ("llama_model.base_model.model.lm_head.weight", "llama_model.lm_head.weight")
INPUT_PROJECTOR_PREFIX = "llama_proj."
OUTPUT_PROJECTOR_PREFIXES: dict[Modality, str] = {
    Modality.IMAGE: "gen_text_hidden_fcs.0.",
    Modality.VIDEO: "gen_text_hidden_fcs_video.0.",
    Modality.AUDIO: "gen_text_hidden_fcs_audio.0.",
}
DROPPED_PREFIXES: dict[str, str] = {
    "visual_encoder.": "frozen ImageBind-huge weights; the imagebind encoder loads imagebind_huge.pth itself",
}
ROWS_CHOICES = ("auto", "all", "new")
_MAX_LISTED = 12


class ConversionError(ValueError):
    """The checkpoint does not convert: unknown or missing keys, a shape unlike the preset or the base model,
    a checkpoint of another version, or a preset that cannot hold it. The message names what differs."""


def _listed(items: list[str]) -> str:
    shown = ", ".join(items[:_MAX_LISTED])
    return shown + (f" and {len(items) - _MAX_LISTED} more" if len(items) > _MAX_LISTED else "")


@dataclass(frozen=True)
class BaseModelInfo:
    """What the converter checks against the base LLM (Vicuna-7B v0): its tokenizer's token strings
    (ids 0..B-1) and its config sizes."""

    path: str
    tokens: tuple[str, ...]
    hidden_size: int
    num_hidden_layers: int
    kv_dim: int

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> "BaseModelInfo":
        """Read the tokenizer and config of a local transformers folder (no weights).

        Raises:
            ConversionError: the folder is missing or its tokenizer / config do not load.
        """
        from transformers import AutoConfig, AutoTokenizer

        p = Path(path)
        if not p.is_dir():
            raise ConversionError(f"base model folder not found: {p} (the merged Vicuna-7B v0 folder)")
        try:
            tok = AutoTokenizer.from_pretrained(str(p))
            cfg = AutoConfig.from_pretrained(str(p))
        except (OSError, ValueError) as e:
            raise ConversionError(f"cannot read the tokenizer / config of the base model {p}: {e}") from e
        tokens = tuple(tok.convert_ids_to_tokens(list(range(len(tok)))))
        heads = int(cfg.num_attention_heads)
        head_dim = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // heads)
        kv = int(getattr(cfg, "num_key_value_heads", None) or heads)
        return cls(str(p), tokens, int(cfg.hidden_size), int(cfg.num_hidden_layers), kv * head_dim)


@dataclass(frozen=True)
class NextGPTDelta:
    """The released delta, parsed and checked, in polymodal names.

    Attributes:
        lora: peft adapter tensors (``base_model.model.model.layers.{i}.self_attn.{p}_proj.lora_{A,B}.weight``).
        lora_rank: r. num_layers: LLM layers carrying LoRA.
        input_embeddings / output_embeddings: (V, D_llm) ``embed_tokens`` / ``lm_head`` rows.
        input_projector: ``fc.weight`` (D_llm, D_enc), ``fc.bias`` (D_llm,).
        output_projectors: per modality, tensors under :class:`projectors.TransformerOutputProjector` names.
        key_map: every source key -> where it went (``part:key``) or ``dropped: reason``.
    """

    lora: dict[str, torch.Tensor]
    lora_rank: int
    num_layers: int
    input_embeddings: torch.Tensor
    output_embeddings: torch.Tensor
    input_projector: dict[str, torch.Tensor]
    output_projectors: dict[Modality, dict[str, torch.Tensor]]
    key_map: dict[str, str] = field(default_factory=dict)

    @property
    def d_llm(self) -> int:
        return int(self.input_embeddings.shape[1])

    @property
    def vocab_rows(self) -> int:
        return int(self.input_embeddings.shape[0])


@dataclass(frozen=True)
class ConversionReport:
    """What :func:`convert_nextgpt` wrote."""

    out_dir: Path
    preset: str
    parts: tuple[str, ...]
    d_llm: int
    lora_rank: int
    num_layers: int
    base_vocab_size: int
    added_tokens: tuple[str, ...]
    rows: str
    rows_written: int
    dropped: dict[str, str]

    def summary(self) -> str:
        return (f"wrote {self.out_dir} ({', '.join(self.parts)}): D_llm {self.d_llm}, LoRA r {self.lora_rank} on "
                f"{self.num_layers} layers, {self.rows_written} token rows ({self.rows}: base {self.base_vocab_size} "
                f"+ {len(self.added_tokens)} added)" + (f"; dropped: {_listed(sorted(self.dropped))}" if self.dropped else ""))


# --------------------------------------------------------------------------------------------------
# loading and parsing


def load_nextgpt_checkpoint(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """Read ``pytorch_model.pt`` (a ``torch.save`` dict of tensors) on CPU, memory-mapped when possible.

    Raises:
        ConversionError: a missing file, not a torch file, or not a flat ``{str: tensor}`` dict.
    """
    p = Path(path)
    if not p.is_file():
        raise ConversionError(f"checkpoint not found: {p}")
    try:
        try:
            state = torch.load(str(p), map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:  # legacy (non-zip) files cannot be memory-mapped
            if "mmap" not in str(e):
                raise
            state = torch.load(str(p), map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, ValueError, EOFError) as e:
        raise ConversionError(f"{p} is not a readable torch checkpoint: {e}") from e
    except Exception as e:  # pickle.UnpicklingError for foreign objects under weights_only
        raise ConversionError(f"{p} is not a plain tensor dict (NExT-GPT saves one with torch.save): {e}") from e
    if not isinstance(state, Mapping):
        raise ConversionError(f"{p} holds a {type(state).__name__}, expected a dict of tensors")
    bad = [str(k) for k, v in state.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise ConversionError(f"{p}: entries that are not tensors under string keys: {_listed(bad)}")
    return {k: v.detach() for k, v in state.items()}


def _their_projector_key(ours: str) -> str:
    """Our TransformerOutputProjector key -> NExT-GPT's ``TextFcLayer`` key (inverse of the key map)."""
    from projectors import NEXTGPT_TRANSFORMER_KEY_MAP

    for theirs, mine in NEXTGPT_TRANSFORMER_KEY_MAP.items():
        if ours == mine or (mine.endswith(".") and ours.startswith(mine)):
            return theirs + ours[len(mine):]
    raise ConversionError(f"projector key {ours!r} has no NExT-GPT name")  # pragma: no cover - map is total


def _single(state: Mapping[str, torch.Tensor], names: tuple[str, ...], what: str) -> tuple[str, torch.Tensor]:
    present = [k for k in names if k in state]
    if not present:
        raise ConversionError(f"missing key: {names[0]} ({what})")
    if len(present) > 1:
        raise ConversionError(f"both {present[0]} and {present[1]} are present ({what}); expected one")
    return present[0], state[present[0]]


def _check_preset(preset: PresetConfig) -> None:
    spec = preset.signals.spec()
    added = preset.llm.added_tokens
    if not added:
        raise ConversionError(
            f"preset {preset.name!r} declares no llm.added_tokens, so the row order of the checkpoint's new "
            "tokens is unknown; use the nextgpt-7b preset (or a copy of it)"
        )
    missing = [t for t in spec.all_signal_tokens() + spec.all_marker_tokens() if t not in added]
    if missing:
        raise ConversionError(f"preset {preset.name!r}: tokens missing from llm.added_tokens: {_listed(missing)}")
    for m in OUTPUT_PROJECTOR_PREFIXES:
        if m not in preset.output_projectors or m not in preset.decoders:
            raise ConversionError(f"preset {preset.name!r} has no {m.value} output projector / decoder for the "
                                  f"checkpoint's {OUTPUT_PROJECTOR_PREFIXES[m]}*")
        if preset.output_projectors[m].kind != "transformer":
            raise ConversionError(f"preset {preset.name!r}: the {m.value} output projector is "
                                  f"{preset.output_projectors[m].kind!r}; NExT-GPT's is 'transformer'")
    for m, pcfg in preset.input_projectors.items():
        if pcfg.kind != "linear" or (pcfg.num_queries or 1) != 1:
            raise ConversionError(f"preset {preset.name!r}: the {m.value} input projector is {pcfg.kind!r} with "
                                  f"{pcfg.num_queries} tokens; NExT-GPT's llama_proj is 'linear', one token")


def _build_output_projector(preset: PresetConfig, m: Modality, d_llm: int):
    from projectors import build_output_projector

    dec = preset.decoders[m]
    return build_output_projector(
        preset.output_projectors[m].model_copy(update={"checkpoint": None}),
        d_llm=d_llm,
        num_signal_tokens=preset.signals.spec().count(m),
        cond_shape=(dec.cond_tokens, dec.cond_dim),
        normalize=m.spec.normalize_cond,  # as polymodal.pipeline.build_decoder_stage builds it
        seed=0,
    )


def parse_nextgpt_state_dict(
    state: Mapping[str, torch.Tensor], preset: PresetConfig | str = "nextgpt-7b", *,
    base: BaseModelInfo | None = None, base_vocab_size: int = NEXTGPT_BASE_VOCAB_SIZE,
) -> NextGPTDelta:
    """Map every key of the released delta onto polymodal names and check every shape.

    Args:
        state: the ``torch.save`` dict (see the module docstring for its keys).
        preset: the preset the export is for (sizes of projectors and decoders, ``llm.added_tokens``).
        base: the base LLM's tokenizer and config; when given, B = its token count and D_llm, the layer
            count and the k/v width must match it.
        base_vocab_size: B when ``base`` is not given (Vicuna v0: 32000).

    Raises:
        ConversionError: unknown keys, missing keys, shapes that disagree with each other, the preset or the
            base model, or a vocabulary of another checkpoint version (e.g. 32042 rows instead of 32038).
    """
    preset = get_preset(preset)
    _check_preset(preset)
    key_map: dict[str, str] = {}
    unknown: list[str] = []
    lora_src: dict[tuple[int, str, str], str] = {}
    proj_src: dict[Modality, dict[str, str]] = {m: {} for m in OUTPUT_PROJECTOR_PREFIXES}
    in_src: dict[str, str] = {}
    for k in state:
        if k in EMBED_KEYS or k in HEAD_KEYS:
            continue
        hit = _LORA_RE.match(k)
        if hit:
            slot = (int(hit.group(1)), hit.group(2), hit.group(3))
            if slot in lora_src:
                raise ConversionError(f"duplicate LoRA weight: {lora_src[slot]} and {k}")
            lora_src[slot] = k
            continue
        if k.startswith(INPUT_PROJECTOR_PREFIX):
            in_src["fc." + k[len(INPUT_PROJECTOR_PREFIX):]] = k
            continue
        m = next((m for m, pre in OUTPUT_PROJECTOR_PREFIXES.items() if k.startswith(pre)), None)
        if m is not None:
            proj_src[m][k[len(OUTPUT_PROJECTOR_PREFIXES[m]):]] = k
            continue
        reason = next((r for pre, r in DROPPED_PREFIXES.items() if k.startswith(pre)), None)
        if reason is not None:
            key_map[k] = f"dropped: {reason}"
            continue
        unknown.append(k)
    if unknown:
        raise ConversionError(
            f"unknown key(s) in the checkpoint (neither mapped nor deliberately dropped): {_listed(sorted(unknown))}; "
            f"this converter reads NExT-GPT {SOURCE_VERSION}'s pytorch_model.pt (LoRA, llama_proj, "
            "gen_text_hidden_fcs*, embed_tokens, lm_head)"
        )

    # ---- token matrices and the vocabulary layout
    ek, emb = _single(state, EMBED_KEYS, "input token embeddings")
    hk, head = _single(state, HEAD_KEYS, "LM head")
    if emb.ndim != 2 or head.shape != emb.shape:
        raise ConversionError(f"{ek} {tuple(emb.shape)} and {hk} {tuple(head.shape)} must be the same (V, D_llm)")
    d_llm = int(emb.shape[1])
    rows = int(emb.shape[0])
    added = preset.llm.added_tokens
    b = len(base.tokens) if base is not None else int(base_vocab_size)
    if rows != b + len(added):
        extra = rows - b
        hint = ""
        if extra == len(added) + 4:
            hint = (f" {extra} added rows is the layout of NExT-GPT's later code, which also adds <Vid>, </Vid>, "
                    f"<Aud>, </Aud>; the released {SOURCE_VERSION} delta has {len(added)}. This checkpoint is "
                    "another version and is not supported.")
        elif rows - len(added) > 0:
            hint = (f" With {len(added)} added tokens the checkpoint's base vocabulary is {rows - len(added)}: "
                    f"{'the base model given' if base is not None else 'the base vocabulary assumed'} has {b} "
                    "(Vicuna-7B v0 has 32000; a tokenizer with an extra pad token has 32001).")
        raise ConversionError(
            f"{ek}: {rows} rows, but base vocabulary {b} + {len(added)} added tokens "
            f"({', '.join(added[:3])}, ...) = {b + len(added)} rows expected.{hint}"
        )
    if base is not None and d_llm != base.hidden_size:
        raise ConversionError(f"{ek}: width {d_llm}, but the base model {base.path} has hidden_size {base.hidden_size}")
    key_map[ek] = "token_rows.safetensors:input_embeddings"
    key_map[hk] = "token_rows.safetensors:output_embeddings"

    # ---- LoRA
    layers = sorted({i for i, _, _ in lora_src})
    n_layers = base.num_hidden_layers if base is not None else (layers[-1] + 1 if layers else 0)
    if n_layers == 0:
        raise ConversionError("missing keys: no LoRA weights (llama_model.base_model.model.model.layers.{i}"
                              ".self_attn.{q,k,v,o}_proj.lora_{A,B}.weight)")
    beyond = [lora_src[s] for s in sorted(lora_src) if s[0] >= n_layers]
    if beyond:
        raise ConversionError(f"LoRA weights for layers the base model ({n_layers} layers) lacks: {_listed(beyond)}")
    missing = [
        f"llama_model.base_model.model.model.layers.{i}.self_attn.{p}.lora_{x}.default.weight"
        for i in range(n_layers) for p in LORA_TARGETS for x in "AB" if (i, p, x) not in lora_src
    ]
    if missing:
        raise ConversionError(f"missing LoRA key(s): {_listed(missing)}")
    rank = int(state[lora_src[(0, "q_proj", "A")]].shape[0])
    kv_dim = base.kv_dim if base is not None else d_llm
    lora: dict[str, torch.Tensor] = {}
    bad: list[str] = []
    for (i, p, x), k in sorted(lora_src.items()):
        t = state[k]
        out_dim = kv_dim if p in ("k_proj", "v_proj") else d_llm
        want = (rank, d_llm) if x == "A" else (out_dim, rank)
        if tuple(t.shape) != want:
            bad.append(f"{k} {tuple(t.shape)} vs {want}")
            continue
        dst = f"base_model.model.model.layers.{i}.self_attn.{p}.lora_{x}.weight"
        lora[dst] = t
        key_map[k] = f"lora/adapter_model.safetensors:{dst}"
    if bad:
        raise ConversionError(f"LoRA shape mismatch (r {rank}, D_llm {d_llm}): {_listed(bad)}")

    # ---- input projector (one llama_proj for every modality)
    d_enc = {m: preset.encoders[m].dim for m in preset.input_projectors if m in preset.encoders}
    want_in = ("fc.weight", "fc.bias")
    miss_in = [INPUT_PROJECTOR_PREFIX + k[3:] for k in want_in if k not in in_src]
    extra_in = [v for k, v in in_src.items() if k not in want_in]
    if miss_in or extra_in:
        raise ConversionError("input projector: " + "; ".join(
            ([f"missing key(s): {_listed(miss_in)}"] if miss_in else []) +
            ([f"unknown key(s): {_listed(extra_in)}"] if extra_in else [])))
    w, bias = state[in_src["fc.weight"]], state[in_src["fc.bias"]]
    enc_dims = set(d_enc.values())
    if w.ndim != 2 or w.shape[0] != d_llm or tuple(bias.shape) != (d_llm,) or (enc_dims and {int(w.shape[1])} != enc_dims):
        raise ConversionError(
            f"llama_proj.weight {tuple(w.shape)} / llama_proj.bias {tuple(bias.shape)}: expected "
            f"({d_llm}, D_enc) / ({d_llm},) with D_enc the preset's encoder dim {sorted(enc_dims) or '?'}"
        )
    input_projector = {"fc.weight": w, "fc.bias": bias}
    for k in in_src.values():
        key_map[k] = "input_{" + ",".join(m.value for m in preset.input_projectors) + "}.safetensors:fc." + k.split(".")[-1]

    # ---- output projectors
    outputs: dict[Modality, dict[str, torch.Tensor]] = {}
    for m, pre in OUTPUT_PROJECTOR_PREFIXES.items():
        own = _build_output_projector(preset, m, d_llm).state_dict()
        theirs = {_their_projector_key(k): k for k in own}
        got = proj_src[m]
        miss = sorted(pre + t for t in theirs if t not in got)
        extra = sorted(v for t, v in got.items() if t not in theirs)
        shape = sorted(f"{pre + t} {tuple(state[got[t]].shape)} vs {tuple(own[o].shape)}"
                       for t, o in theirs.items() if t in got and tuple(state[got[t]].shape) != tuple(own[o].shape))
        if miss or extra or shape:
            raise ConversionError(f"{m.value} output projector ({pre}*) does not fit preset {preset.name!r}: " + "; ".join(
                ([f"missing key(s): {_listed(miss)}"] if miss else []) +
                ([f"unknown key(s): {_listed(extra)}"] if extra else []) +
                ([f"shape mismatch: {_listed(shape)}"] if shape else [])))
        outputs[m] = {o: state[got[t]] for t, o in theirs.items()}
        for t, o in theirs.items():
            key_map[got[t]] = f"output_{m.value}.safetensors:{o}"

    unmapped = sorted(set(state) - set(key_map))
    if unmapped:  # pragma: no cover - every branch above records its keys
        raise ConversionError(f"internal: keys left unmapped: {_listed(unmapped)}")
    return NextGPTDelta(lora=lora, lora_rank=rank, num_layers=n_layers, input_embeddings=emb,
                        output_embeddings=head, input_projector=input_projector, output_projectors=outputs,
                        key_map=key_map)


# --------------------------------------------------------------------------------------------------
# writing


def _write_lora(delta: NextGPTDelta, directory: Path, *, alpha: float, dropout: float, base_path: str | None) -> None:
    from peft import LoraConfig
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    cfg = LoraConfig(r=delta.lora_rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(LORA_TARGETS),
                     bias="none", task_type="CAUSAL_LM", base_model_name_or_path=base_path)
    cfg.save_pretrained(str(directory))
    save_file({k: v.contiguous() for k, v in delta.lora.items()}, str(directory / "adapter_model.safetensors"),
              metadata={"format": "pt", "source": f"nextgpt:{SOURCE_VERSION}"})


def write_nextgpt_export(
    delta: NextGPTDelta, out_dir: str | os.PathLike[str], preset: PresetConfig | str = "nextgpt-7b", *,
    base: BaseModelInfo | None = None, rows: str = "auto", lora_alpha: float = NEXTGPT_LORA_ALPHA,
    lora_dropout: float = NEXTGPT_LORA_DROPOUT, source: dict[str, Any] | None = None, overwrite: bool = False,
) -> ConversionReport:
    """Write a parsed delta as a polymodal export folder (see :mod:`polymodal.export`), atomically.

    ``rows``: ``all`` writes every row of the token matrices (the base rows were trained too; needs ``base``
    for the base token strings), ``new`` only the added tokens' rows, ``auto`` = ``all`` when ``base`` is
    given, else ``new`` (the base rows are then recorded as dropped in ``export.json``).

    Raises:
        ConversionError: an unknown ``rows`` choice, ``all`` without ``base``, base token strings that are
            not unique, or ``out_dir`` non-empty without ``overwrite``.
    """
    from polymodal.export import save_token_rows, write_manifest
    from projectors import build_input_projector, save_projector

    preset = get_preset(preset)
    if rows not in ROWS_CHOICES:
        raise ConversionError(f"unknown rows {rows!r}; choose from: {', '.join(ROWS_CHOICES)}")
    if rows == "auto":
        rows = "all" if base is not None else "new"
    if rows == "all" and base is None:
        raise ConversionError("rows='all' needs the base model (--base) for the token strings of the base rows")
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise ConversionError(f"{out} exists and is not empty; pass overwrite (--overwrite) to replace it")
    added = tuple(preset.llm.added_tokens)
    n_base = delta.vocab_rows - len(added)
    dropped = {k: v.removeprefix("dropped: ") for k, v in delta.key_map.items() if v.startswith("dropped: ")}
    if rows == "all":
        tokens = list(base.tokens) + list(added)
        dup = sorted({t for t in tokens if tokens.count(t) > 1}) if len(set(tokens)) != len(tokens) else []
        if dup:
            raise ConversionError(f"token strings are not unique, rows cannot be keyed by them: {_listed(dup)}")
        sel = slice(0, delta.vocab_rows)
    else:
        tokens = list(added)
        sel = slice(n_base, delta.vocab_rows)
        dropped[f"embed_tokens/lm_head rows 0..{n_base - 1}"] = (
            "base-vocabulary rows (trained with the delta); written only with rows='all' (needs --base)")

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp"))
    try:
        save_token_rows(tmp / "token_rows.safetensors", tokens, delta.input_embeddings[sel], delta.output_embeddings[sel])
        _write_lora(delta, tmp / "lora", alpha=lora_alpha, dropout=lora_dropout, base_path=base.path if base else preset.llm.path)
        meta = {"source": f"nextgpt:{SOURCE_VERSION}"}
        parts = ["token_rows", "lora"]
        for m, pcfg in preset.input_projectors.items():
            proj = build_input_projector(pcfg.model_copy(update={"checkpoint": None}), d_enc=preset.encoders[m].dim,
                                         d_llm=delta.d_llm, seed=0)
            proj.load_state_dict({k: v.float() for k, v in delta.input_projector.items()}, strict=True)
            save_projector(proj, tmp / f"input_{m.value}.safetensors", extra_metadata=meta)
            parts.append(f"input_{m.value}")
        for m, tensors in delta.output_projectors.items():
            proj = _build_output_projector(preset, m, delta.d_llm)
            proj.load_state_dict({k: v.float() for k, v in tensors.items()}, strict=True)
            save_projector(proj, tmp / f"output_{m.value}.safetensors", extra_metadata=meta)
            parts.append(f"output_{m.value}")
        write_manifest(tmp, preset.name, parts, extra={
            "source": {"model": "NExT-GPT", "version": SOURCE_VERSION, **(source or {})},
            "llm": {"d_llm": delta.d_llm, "base_vocab_size": n_base, "added_tokens": list(added),
                    "rows": rows, "base": base.path if base else None},
            "lora": {"r": delta.lora_rank, "lora_alpha": lora_alpha, "lora_dropout": lora_dropout,
                     "target_modules": list(LORA_TARGETS), "num_layers": delta.num_layers},
            "signal_states": "last-layer post-norm state at each signal token's own position (as trained)",
            "dropped": dropped,
            "key_map": delta.key_map,
        })
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return ConversionReport(out_dir=out, preset=preset.name, parts=tuple(sorted(parts)), d_llm=delta.d_llm,
                            lora_rank=delta.lora_rank, num_layers=delta.num_layers, base_vocab_size=n_base,
                            added_tokens=added, rows=rows, rows_written=len(tokens), dropped=dropped)


def convert_nextgpt(
    checkpoint: str | os.PathLike[str], out_dir: str | os.PathLike[str], *, preset: PresetConfig | str = "nextgpt-7b",
    base: str | os.PathLike[str] | None = None, rows: str = "auto", base_vocab_size: int = NEXTGPT_BASE_VOCAB_SIZE,
    lora_alpha: float = NEXTGPT_LORA_ALPHA, lora_dropout: float = NEXTGPT_LORA_DROPOUT, overwrite: bool = False,
) -> ConversionReport:
    """Convert NExT-GPT's released ``pytorch_model.pt`` into an export folder for ``--projectors DIR``.

    Args:
        checkpoint: the released delta (``ChocoWu/nextgpt_7b_tiva_v0``'s ``pytorch_model.pt``).
        out_dir: the export folder to write (token rows, ``lora/`` peft adapter, input and output projectors,
            ``export.json`` with the full key map).
        preset: the preset it will be served with (default ``nextgpt-7b``).
        base: the merged Vicuna-7B v0 folder (tokenizer + config); default: the preset's ``llm.path`` when
            that is a local folder. Checks sizes and gives the base token strings for ``rows='all'``.
        rows: ``auto`` | ``all`` | ``new`` (see :func:`write_nextgpt_export`).
        base_vocab_size: the base vocabulary when no base model is available (32000).
        lora_alpha, lora_dropout: not stored in the checkpoint; NExT-GPT trained with 32 and 0.1.
        overwrite: replace a non-empty ``out_dir``.

    Raises:
        ConversionError: see :func:`parse_nextgpt_state_dict` and :func:`write_nextgpt_export`.
    """
    preset = get_preset(preset)
    if base is None and preset.llm.source == "pretrained" and preset.llm.path and Path(preset.llm.path).is_dir():
        base = preset.llm.path
    info = BaseModelInfo.load(base) if base is not None else None
    state = load_nextgpt_checkpoint(checkpoint)
    delta = parse_nextgpt_state_dict(state, preset, base=info, base_vocab_size=base_vocab_size)
    p = Path(checkpoint)
    report = write_nextgpt_export(delta, out_dir, preset, base=info, rows=rows, lora_alpha=lora_alpha,
                                  lora_dropout=lora_dropout, overwrite=overwrite,
                                  source={"checkpoint": p.name, "bytes": p.stat().st_size})
    log.info("%s", report.summary())
    return report
