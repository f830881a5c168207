"""What trains: new token rows in their own parameters, the projectors, an optional LoRA, and the forward
pass that computes NExT-GPT's losses over a batch of training sequences.

- :class:`TokenRows`: the embedding rows (input embeddings and LM-head rows) of the signal / marker tokens,
  copied out of the frozen vocabulary into their own ``nn.Parameter`` so an optimizer (and its weight
  decay) never sees the frozen rows. ``embed`` and ``logits`` splice them back in.
- :class:`SequenceBuilder`: a dialogue -> token ids, CE labels, input-media slots and signal-group slots,
  laid out exactly as :meth:`polymodal.llm.LLMEngine.chat_segments` lays out a prompt at inference.
- :class:`AlignmentModel`: the ``nn.Module`` the optimizer (and DDP) sees. ``forward(indices)`` returns
  the losses of those examples. Two paths: *live* (the LLM runs every step: anything upstream of its
  states may train) and *cached* (decoding alignment with the LLM and the input rows frozen: the LLM's
  last-layer states at the signal and label positions are computed once, a step only runs the LM-head
  rows and the output projectors).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from polymodal.llm import LLMEngine, PromptSegment
from polymodal.modality import Modality
from training.align.data import Dialogue, GroundedSpan, MediaRef, TaskRef

log = logging.getLogger(__name__)

IGNORE = -100


def per_token_l2(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """NExT-GPT's decoding-side distance: the Euclidean distance per conditioning token, averaged.

    Args:
        pred, target: (B, Q, D_cond).
    Returns:
        () mean over B and Q of ``||pred - target||_2`` over D_cond.
    """
    return torch.linalg.vector_norm(pred.float() - target.float(), dim=-1).mean()


class TokenRows(nn.Module):
    """Trainable rows of some tokens (T_new), apart from the frozen vocabulary.

    Args:
        engine: the LLM engine (its embedding matrix and LM head stay frozen).
        tokens: token strings whose rows are held here (each one id).
        train_input: the input-embedding rows learn. train_output: the LM-head rows learn.
            With tied embeddings (one matrix for both) there is one set of rows, learning if either is set.
    Raises:
        ValueError: a token that is not one id of the tokenizer.
    """

    def __init__(self, engine: LLMEngine, tokens: Sequence[str], *, train_input: bool, train_output: bool):
        super().__init__()
        model = engine.model
        emb = model.get_input_embeddings()
        head = model.get_output_embeddings()
        self.tokens = list(tokens)
        ids = [engine._single_id(t) for t in self.tokens]
        self.tied = head is None or head.weight is emb.weight
        self._frozen = {"emb": emb, "head": head}  # plain dict: not registered, never in state_dict()
        self.register_buffer("ids", torch.tensor(ids, dtype=torch.long), persistent=False)
        lookup = torch.full((emb.weight.shape[0],), -1, dtype=torch.long)
        lookup[self.ids] = torch.arange(len(ids))
        self.register_buffer("lookup", lookup, persistent=False)
        with torch.no_grad():
            self.input_rows = nn.Parameter(emb.weight[self.ids].detach().clone().float(),
                                           requires_grad=train_input or (self.tied and train_output))
            self.output_rows = None if self.tied else nn.Parameter(
                head.weight[self.ids].detach().clone().float(), requires_grad=train_output)

    @property
    def head_rows(self) -> torch.Tensor:
        return self.input_rows if self.output_rows is None else self.output_rows

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """(B, T) ids -> (B, T, D_llm) input embeddings, the held rows spliced in."""
        w = self._frozen["emb"].weight
        base = F.embedding(ids, w)
        idx = self.lookup[ids]
        rows = self.input_rows[idx.clamp(min=0)].to(base.dtype)
        return torch.where((idx >= 0).unsqueeze(-1), rows, base)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """(n, D_llm) last-layer states -> (n, V) float32 logits, the held LM-head rows spliced in."""
        head = self._frozen["head"] or self._frozen["emb"]
        base = F.linear(h, head.weight, getattr(head, "bias", None)).float()
        new = F.linear(h.float(), self.head_rows.float())
        if getattr(head, "bias", None) is not None:
            new = new + head.bias[self.ids].float()
        return base.index_copy(-1, self.ids, new)

    @torch.no_grad()
    def frozen_logit_stats(self, h: torch.Tensor, labels: torch.Tensor):
        """For states ``h`` (n, D_llm) predicting ``labels`` (n,): the log-sum-exp over the frozen columns
        (n,), the label's frozen logit (n,; 0 for a held label) and the label's held-row index (n,; -1)."""
        head = self._frozen["head"] or self._frozen["emb"]
        base = F.linear(h, head.weight, getattr(head, "bias", None)).float()
        base[:, self.ids] = -float("inf")
        row = self.lookup[labels]
        label_frozen = torch.where(row < 0, base.gather(1, labels[:, None])[:, 0],
                                   torch.zeros_like(row, dtype=base.dtype))
        return torch.logsumexp(base, dim=-1), label_frozen, row

    def cached_ce(self, h: torch.Tensor, lse_frozen: torch.Tensor, label_frozen: torch.Tensor,
                  label_row: torch.Tensor) -> torch.Tensor:
        """Mean CE from :meth:`frozen_logit_stats` and the held LM-head rows (equal to the full-vocabulary CE)."""
        head = self._frozen["head"] or self._frozen["emb"]
        new = F.linear(h.float(), self.head_rows.float())
        if getattr(head, "bias", None) is not None:
            new = new + head.bias[self.ids].float()
        lse = torch.logaddexp(lse_frozen, torch.logsumexp(new, dim=-1))
        label = torch.where(label_row >= 0, new.gather(1, label_row.clamp(min=0)[:, None])[:, 0], label_frozen)
        return (lse - label).mean()

    @torch.no_grad()
    def write_back(self) -> None:
        """Copy the rows into the engine's embedding matrix and LM head (inference sees them)."""
        emb = self._frozen["emb"].weight
        emb[self.ids] = self.input_rows.to(emb.dtype)
        head = self._frozen["head"]
        if head is not None and not self.tied:
            head.weight[self.ids] = self.output_rows.to(head.weight.dtype)


# --------------------------------------------------------------------------------------------------
# sequences


@dataclass(frozen=True)
class InputSlot:
    """An input medium: its k projected embeddings go to positions ``start .. start + k - 1``."""

    modality: Modality
    start: int
    media: MediaRef


@dataclass(frozen=True)
class OutputSlot:
    """A signal group: N signal tokens at ``positions``; the target is the caption's embedding."""

    modality: Modality
    positions: tuple[int, ...]
    media: MediaRef


@dataclass(frozen=True)
class EncodedExample:
    """A training sequence. ``ids``/``labels`` are (T,); labels are ``IGNORE`` where no CE is taken
    (the token at t is predicted from the state at t - 1)."""

    ids: tuple[int, ...]
    labels: tuple[int, ...]
    inputs: tuple[InputSlot, ...]
    outputs: tuple[OutputSlot, ...]
    source: str


class SequenceTooLong(ValueError):
    """A dialogue longer than ``max_tokens``."""


def _progress(items, desc: str, enabled: bool):
    if not enabled or len(items) < 4:
        return items
    from tqdm.auto import tqdm

    return tqdm(items, desc=desc, leave=False)


class SequenceBuilder:
    """Lays out a :class:`Dialogue` as the engine lays out a prompt (system, user / assistant turns with
    the preset's chat format; media between their begin / end markers), with CE labels on the assistant's
    text, signal groups and turn suffix.

    Grounding parts (:class:`TaskRef`, :class:`GroundedSpan`) are written in the preset's own grounding tokens
    (``grounding``, format ``loc``): the task identifier, and ``<p>phrase</p><loc_a><loc_b>...`` with the
    phrase tokenized as untrusted text.

    Args:
        engine: the LLM engine. k_tokens: per input modality, the input projector's k.
        max_tokens: longest sequence; longer dialogues raise :class:`SequenceTooLong`.
        grounding: the preset's :class:`polymodal.grounding.GroundingConfig` (grounding data needs it).
        signal_ce: ``"all"``: every token of an output signal group is labelled; ``"first"``: only the first
            (``TrainConfig.signal_ce``).
    """

    def __init__(self, engine: LLMEngine, k_tokens: dict[Modality, int], max_tokens: int, grounding=None,
                 signal_ce: str = "all"):
        if signal_ce not in ("all", "first"):
            raise ValueError(f"signal_ce must be 'all' or 'first', got {signal_ce!r}")
        self.engine = engine
        self.k_tokens = k_tokens
        self.max_tokens = max_tokens
        self.grounding = grounding
        self.signal_ce = signal_ce
        tok = engine.tokenizer
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)

    def _text(self, text: str, trusted: bool) -> list[int]:
        return self.engine.tokenize_segment(PromptSegment(text, trusted=trusted)) if text else []

    def _grounding(self, part: TaskRef | GroundedSpan, source: str) -> list[int]:
        g = self.grounding
        if g is None or g.format != "loc":
            raise ValueError(f"{source}: grounding data needs a preset with our grounding tokens "
                             f"(preset.grounding with format 'loc')")
        if isinstance(part, TaskRef):
            try:
                return self._text(g.task_identifier(part.name), True)
            except ValueError as e:
                raise ValueError(f"{source}: {e}") from None
        grid = g.grid()
        w, h = part.image_size
        boxes = "".join(grid.encode_box(b, w, h) for b in part.boxes_px)
        return [*self._text(grid.phrase_markers[0], True), *self._text(part.phrase, False),
                *self._text(grid.phrase_markers[1] + boxes, True)]

    def build(self, dialogue: Dialogue) -> EncodedExample:
        """Raises:
            ValueError: a medium this model cannot read or produce; an output medium without caption.
            SequenceTooLong: more than ``max_tokens`` tokens.
        """
        e, f = self.engine, self.engine.chat_format
        ids: list[int] = []
        labels: list[int] = []
        inputs: list[InputSlot] = []
        outputs: list[OutputSlot] = []

        def add(tok_ids: Sequence[int], labeled: bool) -> None:
            ids.extend(tok_ids)
            labels.extend(tok_ids if labeled else [IGNORE] * len(tok_ids))

        if f.add_bos and e.tokenizer.bos_token_id is not None:
            add([e.tokenizer.bos_token_id], False)
        system = f.system if dialogue.system is None else dialogue.system  # as LLMEngine.chat_segments lays it out
        if system or f.system_prefix:
            add(self._text(f.system_prefix + system + f.system_suffix, True), False)
        for msg in dialogue.messages:
            user = msg.role == "user"
            add(self._text(f.user_prefix if user else f.assistant_prefix, True), False)
            for part in msg.parts:
                if isinstance(part, str):
                    add(self._text(part, False), not user)
                    continue
                if isinstance(part, (TaskRef, GroundedSpan)):
                    add(self._grounding(part, dialogue.source), not user)
                    continue
                m = part.modality
                if user:
                    if m not in self.k_tokens:
                        raise ValueError(f"{dialogue.source}: this model has no {m.value} input path")
                    begin, end = e.marker_ids[m]
                    add([begin], False)
                    inputs.append(InputSlot(m, len(ids), part))
                    add([self.pad_id] * self.k_tokens[m], False)
                    add([end], False)
                else:
                    if m not in e.signal_ids:
                        raise ValueError(f"{dialogue.source}: this model has no {m.value} signal tokens")
                    if not part.caption and part.embedding_path is None:
                        raise ValueError(f"{dialogue.source}: an output {m.value} has no caption (its target)")
                    group = e.signal_ids[m]
                    outputs.append(OutputSlot(m, tuple(range(len(ids), len(ids) + len(group))), part))
                    add(group[:1], True)
                    add(group[1:], self.signal_ce == "all")
            add(self._text(f.user_suffix if user else f.assistant_suffix, True), not user)
        if len(ids) > self.max_tokens:
            raise SequenceTooLong(f"{dialogue.source}: {len(ids)} tokens > max_tokens {self.max_tokens}")
        return EncodedExample(tuple(ids), tuple(labels), tuple(inputs), tuple(outputs), dialogue.source)


# --------------------------------------------------------------------------------------------------
# the model


@dataclass
class Losses:
    """Per-step losses: ``total`` (the one backpropagated) and its parts (0-d tensors; absent = 0)."""

    total: torch.Tensor
    parts: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass
class _Cached:
    """One example's frozen quantities. The CE needs only the held LM-head rows each step:
    ``CE = logaddexp(lse_frozen, logsumexp(h @ rows^T)) - label logit``, exact."""

    h_ce: torch.Tensor  # (n, D_llm) states predicting labelled tokens
    labels: torch.Tensor  # (n,)
    lse_frozen: torch.Tensor  # (n,) log-sum-exp of the logits over the frozen vocabulary columns
    label_frozen: torch.Tensor  # (n,) the label's logit when the label is a frozen token (else 0)
    label_row: torch.Tensor  # (n,) the label's index among the held rows, or -1
    groups: list[tuple[Modality, torch.Tensor, int]]  # (modality, (N, D_llm) states, example-group index)


class AlignmentModel(nn.Module):
    """The trainable parts around a frozen LLM, and the loss of a batch.

    Registered submodules: ``llm`` (the engine's causal LM; frozen except a LoRA), ``input_projectors``,
    ``output_projectors`` (``nn.ModuleDict`` keyed by modality value) and ``rows`` (:class:`TokenRows`).
    Encoders and decoders are frozen and held outside the module tree.

    Args:
        examples: the encoded training sequences. input_embeds: media -> (D_enc,) encoder embedding.
        targets: (modality, caption key) -> (Q, D_cond) decoder text-encoder embedding; ``target_keys``
            gives each output slot's key. latents: output media -> VAE latents (noise loss).
        weights: ``ce``, ``mse``, ``noise`` loss weights. cached: use the cached-state path.
    """

    def __init__(
        self,
        engine: LLMEngine,
        input_projectors: dict[Modality, nn.Module],
        output_projectors: dict[Modality, nn.Module],
        rows: TokenRows,
        *,
        examples: list[EncodedExample],
        input_embeds: dict[MediaRef, torch.Tensor],
        targets: dict[Modality, torch.Tensor],
        target_keys: dict[tuple[int, int], int],
        weights: dict[str, float],
        decoders: dict | None = None,
        latents: dict[MediaRef, torch.Tensor] | None = None,
        cached: bool = False,
        progress: bool = False,
    ):
        super().__init__()
        self.engine = engine
        self.llm = engine.model
        self.input_projectors = nn.ModuleDict({m.value: p for m, p in input_projectors.items()})
        self.output_projectors = nn.ModuleDict({m.value: p for m, p in output_projectors.items()})
        self.rows = rows
        self.examples = examples
        self.input_embeds = input_embeds
        self.targets = targets
        self.target_keys = target_keys
        self.weights = weights
        self.decoders = decoders or {}
        self.latents = latents or {}
        self.cached = cached
        self.pad_id = SequenceBuilder(engine, {}, 1).pad_id
        self._cache: list[_Cached] | None = None
        self.device = engine.device
        self.progress = progress
        if cached:
            self._cache = self._compute_cache()

    # ----------------------------------------------------------------------------------------------
    def _batch_tensors(self, batch: list[EncodedExample]):
        T = max(len(ex.ids) for ex in batch)
        B = len(batch)
        ids = torch.full((B, T), self.pad_id, dtype=torch.long)
        labels = torch.full((B, T), IGNORE, dtype=torch.long)
        mask = torch.zeros((B, T), dtype=torch.long)
        for b, ex in enumerate(batch):
            n = len(ex.ids)
            ids[b, :n] = torch.tensor(ex.ids)
            labels[b, :n] = torch.tensor(ex.labels)
            mask[b, :n] = 1
        return ids.to(self.device), labels.to(self.device), mask.to(self.device)

    def _inputs_embeds(self, batch: list[EncodedExample], ids: torch.Tensor) -> torch.Tensor:
        embeds = self.rows.embed(ids).to(self.engine.dtype)
        slots = [(b, s) for b, ex in enumerate(batch) for s in ex.inputs]
        if not slots:
            return embeds
        embeds = embeds.clone()
        for m in {s.modality for _, s in slots}:
            mine = [(b, s) for b, s in slots if s.modality is m]
            if m.value not in self.input_projectors:
                raise ValueError(f"no {m.value} input projector")
            proj = self.input_projectors[m.value]
            enc = torch.stack([self.input_embeds[s.media] for _, s in mine]).to(self.device)
            out = proj(enc).to(embeds.dtype)  # (n, k, D_llm)
            for (b, s), e in zip(mine, out):
                embeds[b, s.start:s.start + e.shape[0]] = e
        return embeds

    def _hidden(self, embeds: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """(B, T, D_llm) -> last-layer states after the final norm (what inference captures)."""
        return self.llm.get_decoder()(inputs_embeds=embeds, attention_mask=mask, use_cache=False).last_hidden_state

    @torch.no_grad()
    def _compute_cache(self, chunk: int = 16) -> list[_Cached]:
        out = []
        order = sorted(range(len(self.examples)), key=lambda i: len(self.examples[i].ids))  # little padding
        done: dict[int, _Cached] = {}
        for start in _progress(range(0, len(order), chunk), "caching LLM states", self.progress):
            idx = order[start:start + chunk]
            batch = [self.examples[i] for i in idx]
            ids, labels, mask = self._batch_tensors(batch)
            hb = self._hidden(self._inputs_embeds(batch, ids), mask).float()
            for b, (i, ex) in enumerate(zip(idx, batch)):
                h = hb[b, :len(ex.ids)]
                lab_all = labels[b, 1:len(ex.ids)]
                sel = lab_all != IGNORE
                groups = [(s.modality, h[list(s.positions)].clone(), k) for k, s in enumerate(ex.outputs)]
                h_ce, lab = h[:-1][sel].clone(), lab_all[sel].clone()
                done[i] = _Cached(h_ce, lab, *self.rows.frozen_logit_stats(h_ce, lab), groups)
        out = [done[i] for i in range(len(self.examples))]
        return out

    # ----------------------------------------------------------------------------------------------
    def forward(self, indices: Sequence[int]) -> Losses:
        """Losses of the examples ``indices`` (see the class docstring)."""
        parts: dict[str, torch.Tensor] = {}
        group_states: list[tuple[int, int, Modality, torch.Tensor]] = []  # (example, slot, modality, (N, D))
        total = torch.zeros((), device=self.device)
        if self.cached:
            cache = [self._cache[i] for i in indices]
            h_ce = torch.cat([c.h_ce for c in cache])
            labels = torch.cat([c.labels for c in cache])
            for i, c in zip(indices, cache):
                group_states.extend((i, k, m, h) for m, h, k in c.groups)
            if labels.numel():
                ce = self.rows.cached_ce(h_ce, torch.cat([c.lse_frozen for c in cache]),
                                         torch.cat([c.label_frozen for c in cache]),
                                         torch.cat([c.label_row for c in cache]))
                parts["ce"] = ce
                if ce.requires_grad:
                    total = total + self.weights.get("ce", 1.0) * ce
        else:
            batch = [self.examples[i] for i in indices]
            ids, labels_full, mask = self._batch_tensors(batch)
            h = self._hidden(self._inputs_embeds(batch, ids), mask)
            sel = labels_full[:, 1:] != IGNORE
            h_ce = h[:, :-1][sel]
            labels = labels_full[:, 1:][sel]
            for b, (i, ex) in enumerate(zip(indices, batch)):
                for k, s in enumerate(ex.outputs):
                    group_states.append((i, k, s.modality, h[b, list(s.positions)]))
            if labels.numel():
                ce = F.cross_entropy(self.rows.logits(h_ce), labels)
                parts["ce"] = ce
                total = total + self.weights.get("ce", 1.0) * ce
        if group_states:
            dist_sum = torch.zeros((), device=self.device)
            noise_sum = torch.zeros((), device=self.device)
            n_noise = 0
            for m in sorted({g[2] for g in group_states}, key=lambda x: x.value):
                mine = [g for g in group_states if g[2] is m]
                hs = torch.stack([g[3] for g in mine])  # (n, N, D_llm)
                sig = torch.tensor(self.engine.signal_ids[m], device=self.device)
                te = self.rows.embed(sig.unsqueeze(0)).expand(len(mine), -1, -1)
                proj = self.output_projectors[m.value]
                p = next(proj.parameters())
                pred = proj(hs.to(p.dtype), te.to(p.dtype))  # (n, Q, D_cond)
                keys = torch.tensor([self.target_keys[(g[0], g[1])] for g in mine], device=self.device)
                tgt = self.targets[m][keys]
                dist_sum = dist_sum + torch.linalg.vector_norm(pred.float() - tgt.float(), dim=-1).mean(-1).sum()
                if self.weights.get("noise", 0.0) > 0:
                    refs = [self.examples[g[0]].outputs[g[1]].media for g in mine]
                    have = [j for j, r in enumerate(refs) if r in self.latents]
                    if have:
                        lat = [self.latents[refs[j]] for j in have]
                        noise_sum = noise_sum + self._noise_loss(m, pred[have], lat) * len(have)
                        n_noise += len(have)
            mse = dist_sum / len(group_states)
            parts["mse"] = mse
            total = total + self.weights.get("mse", 1.0) * mse
            if n_noise:
                parts["noise"] = noise_sum / n_noise
                total = total + self.weights["noise"] * parts["noise"]
        parts["loss"] = total
        return Losses(total, parts)

    def _noise_loss(self, m: Modality, cond: torch.Tensor, latents: list[torch.Tensor]) -> torch.Tensor:
        """Noise-prediction MSE of the frozen UNet conditioned on ``cond`` (n, Q, D_cond) at random steps."""
        pipe = self.decoders[m].pipeline
        unet, sched = pipe.unet, pipe.scheduler
        lat = torch.stack(latents).to(unet.device, unet.dtype)
        noise = torch.randn(lat.shape, dtype=lat.dtype).to(lat.device)
        t = torch.randint(0, sched.config.num_train_timesteps, (lat.shape[0],)).to(lat.device)
        noisy = sched.add_noise(lat, noise, t)
        pred = unet(noisy, t, encoder_hidden_states=cond.to(unet.dtype)).sample
        if getattr(sched.config, "prediction_type", "epsilon") == "v_prediction":
            target = sched.get_velocity(lat, noise, t)
        else:
            target = noise
        return F.mse_loss(pred.float(), target.float())

    # ----------------------------------------------------------------------------------------------
    def trainable(self) -> dict[str, nn.Parameter]:
        """Name -> parameter of everything that learns."""
        return {n: p for n, p in self.named_parameters() if p.requires_grad}
