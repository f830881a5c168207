"""Scoring: the checkers on procedural data, and a decoder's output for asked attributes.

The share of media whose reading (:mod:`training.toyworld.checkers`) shows every asked attribute.
"""

from __future__ import annotations

from dataclasses import dataclass

from polymodal.modality import Modality
from training.toyworld import checkers
from training.toyworld.data import iter_items
from training.toyworld.phrasings import ATTRIBUTE_COMBOS, CAPTION_TEMPLATES

SCORED = checkers.SCORED
"""The attributes each modality's media are scored on (:data:`training.toyworld.checkers.SCORED`)."""


@dataclass(frozen=True)
class Score:
    """``correct`` of ``total`` media showed every scored attribute; ``per_attribute`` each alone."""

    modality: Modality
    correct: int
    total: int
    per_attribute: dict

    @property
    def accuracy(self) -> float:
        return self.correct / self.total if self.total else 0.0

    def line(self) -> str:
        per = ", ".join(f"{k} {v / self.total:.1%}" for k, v in self.per_attribute.items())
        return f"{self.modality.value}: {self.correct}/{self.total} = {self.accuracy:.1%} ({per})"


def score_readings(modality: Modality | str, readings, asked: list[dict]) -> Score:
    """Score ``readings`` against ``asked`` attribute dicts (same order)."""
    modality = Modality.parse(modality)
    keys = SCORED[modality]
    per = {k: 0 for k in keys}
    correct = 0
    for reading, want in zip(readings, asked, strict=True):
        hits = {k: getattr(reading, k) == want[k] for k in keys if k in want}
        for k, hit in hits.items():
            per[k] += int(hit)
        correct += int(all(hits.values()))
    return Score(modality, correct, len(asked), per)


def score_procedural(modality: Modality | str, count: int = 300, seed: int = 0, **kwargs) -> Score:
    """The checker's score on ``count`` procedural items (in memory; see :func:`~training.toyworld.data.make_item`)."""
    modality = Modality.parse(modality)
    items = list(iter_items(modality, count, seed, **kwargs))
    readings = [checkers.check(modality, it.data, sample_rate_hz=it.sample_rate_hz) for it in items]
    return score_readings(modality, readings, [it.attributes for it in items])


def toy_prompts(modality: Modality | str, n: int) -> list[tuple[str, dict]]:
    """``n`` (caption, attributes) pairs cycling through every attribute combination and phrasing; a phrasing that
    leaves out a scored attribute is replaced by the first one that asks every scored attribute."""
    modality = Modality.parse(modality)
    combos = ATTRIBUTE_COMBOS[modality]
    templates = CAPTION_TEMPLATES[modality]
    asks_all = next(t for t in templates if all(f"{{{k}}}" in t for k in SCORED[modality]))
    out = []
    for i in range(n):
        attrs = combos[i % len(combos)]
        template = templates[(i // len(combos)) % len(templates)]
        if not all(f"{{{k}}}" in template for k in SCORED[modality]):
            template = asks_all  # every scored attribute must be asked
        out.append((template.format(**attrs), attrs))
    return out


def score_decoder(decoder, n: int = 48, seed: int = 0, options=None) -> Score:
    """Generate ``n`` media from the decoder's own text embedding of :func:`toy_prompts` and score them.

    ``decoder`` is a :class:`decoders.Decoder` (its ``encode_text`` and ``render``); each medium is read from
    its file (:func:`read_media`); failed items count as wrong.
    """
    modality = decoder.modality
    prompts = toy_prompts(modality, n)
    readings = []
    batch = 16
    for i in range(0, n, batch):
        chunk = prompts[i : i + batch]
        embeds = decoder.encode_text([p for p, _ in chunk])
        readings += read_media(modality, decoder.render(embeds, [seed + i + k for k in range(len(chunk))], options))
    return score_readings(modality, readings, [a for _, a in prompts])


def empty_reading(modality: Modality | str):
    """The reading of a medium that could not be made: every attribute ``None`` (a miss;
    :func:`training.toyworld.checkers.empty_reading`)."""
    return checkers.empty_reading(modality)


def read_media(modality: Modality, media) -> list:
    """Checker readings of decoder outputs as a user gets them: each ``decoders.Medium`` is read back from its
    file (:meth:`~decoders.media.Medium.encode`: PNG, float WAV, or MP4 at the decoder's ``crf``, whose
    compression can move a small shape); a failed item (a ``DecodeError``, no ``data``) reads as nothing."""
    return [checkers.check_bytes(modality, m.encode()[0]) if getattr(m, "data", None) is not None
            else empty_reading(modality) for m in media]


def derangement(n: int, seed: int = 0) -> list[int]:
    """A permutation of range(n) with no fixed point (n >= 2): request i gets the states of request perm[i]."""
    import numpy as np

    if n < 2:
        raise ValueError("shuffling needs at least 2 requests")
    rng = np.random.default_rng(seed)
    while True:
        perm = rng.permutation(n)
        if not (perm == np.arange(n)).any():
            return [int(x) for x in perm]


def score_pipeline(pipe, modality: Modality | str, prompts: list[tuple[str, dict]], *, seed: int = 0,
                   shuffle: bool = False, batch_size: int = 8, max_new_tokens: int | None = None,
                   progress: bool = False) -> Score:
    """Ask an :class:`~polymodal.pipeline.AnyToAnyPipeline` for each (request, attributes) and score its media.

    Each request goes through the LLM stage with ``modality`` required (lead-in ``max_new_tokens``, default
    the preset's ``prompt_lead_in_tokens``), the first group of that modality through the decoder stage.
    ``shuffle=True`` is the control: request i is rendered from the signal states of another request (a
    derangement), so a score above chance there would mean information reaching the medium around the
    states.
    """
    from polymodal.types import TextPart, Turn

    modality = Modality.parse(modality)
    gen = pipe.preset.generation
    lead = gen.prompt_lead_in_tokens if max_new_tokens is None else max_new_tokens
    groups = []
    it = prompts
    if progress:
        from tqdm import tqdm

        it = tqdm(prompts, desc=f"{modality.value} requests (LLM)")
    for k, (text, _) in enumerate(it):
        result = pipe.llm_stage.generate([Turn("user", (TextPart(text),))], modalities=[modality],
                                         max_new_tokens=lead, seed=seed + k)
        groups.append(next(g for g in result.groups if g.modality is modality))
    if shuffle:
        perm = derangement(len(groups), seed)
        groups = [groups[j] for j in perm]
    stage = pipe.decoder_stages[modality]
    readings = []
    for i in range(0, len(groups), batch_size):
        chunk = groups[i:i + batch_size]
        readings += read_media(modality, stage.render(chunk, [seed + i + k for k in range(len(chunk))]))
    return score_readings(modality, readings, [a for _, a in prompts])
