"""Alignment data of the toy world, in the formats :mod:`training.align` reads.

- Encoding side: the toy catalog itself (``catalog.jsonl``: ``path, caption, modality``; the ``jsonl`` reader),
  random-layout media with their captions.
- Decoding side and instruct: NExT-GPT's text-to-X instruction JSON (``t2x`` reader): one request per record
  from the training bank of :mod:`training.toyworld.phrasings`, the medium as a placeholder in the answer
  whose caption is the decoding-side target (the toy decoder's text-encoder embedding of the caption, not
  of the request). With ``lead_ins`` half the answers say a sentence first (``"Here is a blue triangle.
  <image>"``), the other half are the medium alone, so a model tuned on them may do either.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from polymodal.modality import Modality
from training.toyworld.phrasings import LEAD_INS, requests

def request_records(modalities: Sequence[Modality | str], per_modality: int | Mapping[Modality, int], *, seed: int = 0,
                    lead_ins: bool = False) -> list[dict]:
    """``per_modality`` t2x records per modality (training bank only; an int, or a count per modality),
    interleaved across modalities (a modality with more records fills the tail alone)."""
    mods = [Modality.parse(m) for m in modalities]
    counts = {m: per_modality if isinstance(per_modality, int) else int(per_modality[m]) for m in mods}
    rng = np.random.default_rng([seed, 7])
    per: list[list[dict]] = []
    for m in mods:
        rows = []
        for k, (request, caption, _) in enumerate(requests(m, counts[m], heldout=False, seed=seed)):
            answer = f"<{m.value}>"  # the training data's placeholder of the medium
            if lead_ins and k % 2 == 1:
                lead = LEAD_INS[m][rng.integers(len(LEAD_INS[m]))].format(caption=caption)
                answer = f"{lead} {answer}"
            rows.append({f"{m.value}_captions": [caption],
                         "conversations": [{"from": "human", "value": request}, {"from": "gpt", "value": answer}]})
        per.append(rows)
    return [r for group in itertools.zip_longest(*per) for r in group if r is not None]


def write_requests(path: str | Path, modalities: Sequence[Modality | str], per_modality: int | Mapping[Modality, int], *, seed: int = 0,
                   lead_ins: bool = False) -> Path:
    """Write :func:`request_records` as a JSON list (atomically); returns ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(request_records(modalities, per_modality, seed=seed, lead_ins=lead_ins), indent=1))
    tmp.replace(path)
    return path


def training_prompts(path: str | Path) -> set[str]:
    """Every human message of a written request file (or MosIT file): for the benchmark's disjointness check."""
    body = json.loads(Path(path).read_text())
    out = set()
    for rec in body:
        for msg in rec.get("conversations") or rec.get("conversation") or []:
            if msg.get("from") in ("human", "user"):
                out.add(msg["value"].strip())
    return out
