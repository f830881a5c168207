"""Plain-question dialogues for the instruct stage: questions that ask for words, answered in words.

The questions are the training bank :func:`training.toyworld.phrasings.plain_training_questions` (disjoint from the
held-out plain questions the benchmarks send). The answers are the base model's own: SmolLM2-135M-Instruct as the
``smol`` preset loads it (the toy preset's LLM and chat format), greedy, with every signal token suppressed
(batched: :func:`_greedy_batch`). Tuning on them (self-distillation) keeps what the model already says and
teaches one thing: a plain question gets words, not signal tokens. Answers are cut to whole sentences when they
run past ``max_new_tokens``; an answer with no whole sentence left, or one that writes a medium's placeholder
(``<image>``), is left out (:func:`trim_answer`).

The answers are cached in a folder keyed by the question list, the model and the generation settings
(:func:`distill_answers`; resumable: answers written so far are kept when a run stops). :func:`write_dialogues`
writes them as NExT-GPT text-to-X records without media (the ``t2x`` reader of :mod:`training.align.data`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import time
from collections.abc import Sequence
from pathlib import Path

ANSWERS = "answers.json"
_PARTIAL = "answers.partial.jsonl"
_VERSION = 1
_SENTENCE_END = re.compile(r"[.!?](?=\s|$)")


def _key(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def trim_answer(text: str, finish_reason: str) -> str | None:
    """The answer as a training target: whole when the model stopped by itself (``finish_reason`` ``"stop"``),
    else cut after its last whole sentence; ``None`` when nothing is left or it writes a medium's placeholder
    (``<image>``, ``<audio>``, ``<video>``: the t2x reader would read it as a medium)."""
    from polymodal.modality import Modality

    text = text.strip()
    if finish_reason != "stop":
        ends = list(_SENTENCE_END.finditer(text))
        text = text[:ends[-1].end()].strip() if ends else ""
    if not text or any(f"<{m.value}>" in text.lower() for m in Modality):
        return None
    return text


def _greedy_batch(engine, questions: Sequence[str], max_new_tokens: int) -> list[dict]:
    """Greedy answers of ``engine``'s model to ``questions`` in one left-padded batch, every signal token (and
    whatever the engine never generates) suppressed, stopping at the engine's EOS ids -> rows as
    :func:`distill_answers` returns them. Checked on 16 questions: the same texts as the engine's own decode loop
    (one at a time, ``allowed_modalities=()``), about 3 times faster on one core."""
    import torch

    from polymodal.llm import PromptSegment

    prompts = [engine.build_prompt(engine.chat_segments([("user", [PromptSegment(q, trusted=False)])]))[1]
               for q in questions]
    pad = engine.tokenizer.pad_token_id if engine.tokenizer.pad_token_id is not None else min(engine.eos_ids)
    width = max(map(len, prompts))
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    suppressed = sorted({*engine._always_suppressed, *(i for group in engine.signal_ids.values() for i in group)})
    with torch.no_grad():
        out = engine.model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                                    do_sample=False, suppress_tokens=suppressed, eos_token_id=sorted(engine.eos_ids),
                                    pad_token_id=pad)
    rows = []
    for q, gen in zip(questions, out[:, width:].tolist()):
        stop = next((k for k, x in enumerate(gen) if x in engine.eos_ids), None)
        gen = gen if stop is None else gen[:stop]
        text = engine.tokenizer.decode(gen, skip_special_tokens=True)
        reason = "stop" if stop is not None else "length"
        rows.append({"question": q, "text": text, "finish_reason": reason, "completion_tokens": len(gen),
                     "answer": trim_answer(text, reason)})
    return rows


def distill_answers(questions: Sequence[str], cache_dir: str | Path, *, max_new_tokens: int = 96,
                    batch_size: int = 16, progress: bool = True) -> list[dict]:
    """The base model's answer to each question, from the cache where it holds that question with these settings
    (answers are kept per question: a run stopped part-way, or a smaller or larger question list, reuses them).

    Returns one row per question, in order: ``{"question", "text"`` (as generated), ``"finish_reason",
    "completion_tokens", "answer"`` (:func:`trim_answer`; ``None``: left out)``}``. ``cache_dir`` gets
    :data:`ANSWERS` (and, while running, a partial file that a rerun resumes from).

    Raises:
        FileNotFoundError: the ``smol`` preset's GGUF file is not installed (from the LLM loader).
    """
    import torch

    from polymodal.pipeline import AnyToAnyPipeline
    from polymodal.presets import smol

    preset = smol()
    # the settings, not the questions: greedy answers do not depend on the batch (checked in _greedy_batch)
    key = _key({"version": _VERSION, "llm": preset.llm.model_dump(mode="json"), "chat": dataclasses.asdict(preset.chat),
                "max_new_tokens": max_new_tokens, "greedy": True, "signals": "suppressed", "batch_size": batch_size})
    cache_dir = Path(cache_dir)
    final = cache_dir / ANSWERS
    done: dict[str, dict] = {}
    if final.is_file():
        body = json.loads(final.read_text())
        if body.get("key") == key:
            done = {row["question"]: row for row in body["rows"]}
            if all(q in done for q in questions):
                return [done[q] for q in questions]
    cache_dir.mkdir(parents=True, exist_ok=True)
    partial = cache_dir / _PARTIAL
    if partial.is_file():
        lines = partial.read_text().splitlines()
        if lines and json.loads(lines[0]).get("key") == key:
            for line in lines[1:]:
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:  # a line cut by a kill
                    continue
                done[row["question"]] = row
        else:
            partial.unlink()
    if not partial.is_file():
        partial.write_text(json.dumps({"key": key}) + "\n")
    todo = [q for q in questions if q not in done]
    if todo:
        torch.set_num_threads(1)
        engine = AnyToAnyPipeline.from_preset(
            preset.model_copy(update={"decoders": {}, "output_projectors": {}})).llm_stage.engine
        t0 = time.time()
        todo.sort(key=len)  # batches of similar prompt lengths: little padding
        with partial.open("a") as f:
            for i in range(0, len(todo), batch_size):
                for row in _greedy_batch(engine, todo[i:i + batch_size], max_new_tokens):
                    f.write(json.dumps(row) + "\n")
                    done[row["question"]] = row
                f.flush()
                if progress:
                    print(f"  plain answers: {len(done)}/{len(questions)} ({time.time() - t0:.0f} s)", flush=True)
    tmp = final.with_suffix(".tmp")
    tmp.write_text(json.dumps({"key": key, "rows": list(done.values())}, indent=1))  # every answer known
    tmp.replace(final)
    partial.unlink(missing_ok=True)
    return [done[q] for q in questions]


def dialogue_records(rows: Sequence[dict], n: int) -> list[dict]:
    """``n`` t2x records (no media) from the kept rows of :func:`distill_answers`, in order, cycling when ``n`` is
    more than there are (a ratio knob); ``n == 0``: none.

    Raises:
        ValueError: ``n`` < 0, or ``n`` > 0 and no row has an answer.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    kept = [r for r in rows if r["answer"]]
    if n and not kept:
        raise ValueError("no plain question has a usable answer")
    return [{"conversations": [{"from": "human", "value": kept[i % len(kept)]["question"]},
                               {"from": "gpt", "value": kept[i % len(kept)]["answer"]}]} for i in range(n)]


def write_dialogues(path: str | Path, rows: Sequence[dict], n: int) -> Path:
    """Write :func:`dialogue_records` as a JSON list (atomically); returns ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(dialogue_records(rows, n), indent=1))
    tmp.replace(path)
    return path
