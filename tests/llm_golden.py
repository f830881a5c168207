"""Fixed decode cases on the ``tiny`` preset and their recorder, for ``tests/test_llm_steps.py``.

``tests/data/llm_stream_golden.json`` holds what the decode loop yielded for each case *before* it was
split into named steps (recorded with ``python tests/llm_golden.py > tests/data/llm_stream_golden.json``
on commit edc91c3, where ``LLMEngine.stream`` was one function). The test replays the cases on the
current code and compares event by event: same text deltas, same groups (positions, ids, offsets,
flags, state checksums), same output (text, ids, finish reason, notes).

Re-record only for a change that is *meant* to alter the decode (and say so in the commit).
"""

from __future__ import annotations

import json
import sys
from functools import cache

from polymodal.modality import Modality
from polymodal.signals import ChatFormat

IMAGE, AUDIO, VIDEO = Modality.IMAGE, Modality.AUDIO, Modality.VIDEO


@cache
def engines():
    """``tiny`` with its own chat format, and the same LLM with NExT-GPT's ``###``-stopping template."""
    from polymodal.llm import load_llm
    from polymodal.presets import get_preset

    p = get_preset("tiny")
    return {"tiny": load_llm(p.llm, p.signals.spec(), p.chat, seed=0),
            "vicuna": load_llm(p.llm, p.signals.spec(), ChatFormat.vicuna_v0(), seed=0)}


def _script(engine, pieces: list[str]):
    """A ``propose`` hook emitting the pieces (signal-token strings or plain text), then EOS."""
    seq: list[int] = []
    for t in pieces:
        if t.startswith("<") and t.endswith(">") and t in engine.tokenizer.get_vocab():
            seq.append(engine.tokenizer.convert_tokens_to_ids(t))
        else:
            seq.extend(engine.tokenizer.encode(t, add_special_tokens=False))
    eos = engine.tokenizer.eos_token_id
    return lambda step, _logits: seq[step] if step < len(seq) else eos


def _img(k: int) -> list[str]:
    return [f"<IMG{i}>" for i in range(k)]


# name -> (engine, prompt, kwargs, script or None)
CASES: dict[str, tuple[str, str, dict, list[str] | None]] = {
    "greedy": ("tiny", "draw something", dict(max_new_tokens=24), None),
    "greedy-required": ("tiny", "a cat please", dict(max_new_tokens=12, required=[AUDIO, IMAGE]), None),
    **{f"sample-s{s}": ("tiny", "make a picture and a sound", dict(temperature=1.0, top_p=0.9, seed=s,
                                                                     max_new_tokens=48), None)
       for s in range(6)},
    "sample-hot-required": ("tiny", "show me", dict(temperature=1.5, top_p=1.0, seed=7, max_new_tokens=40,
                                                    required=[VIDEO, IMAGE]), None),
    "sample-no-signals": ("tiny", "hello there", dict(temperature=1.0, top_p=0.8, seed=3, max_new_tokens=32,
                                                      allow_signals=False), None),
    "sample-one-output": ("tiny", "many pictures", dict(temperature=1.2, top_p=0.95, seed=11, max_new_tokens=64,
                                                        max_outputs=1, max_signal_run=1), None),
    "script-group-mid": ("tiny", "draw", dict(max_new_tokens=30), ["here", *_img(4), " and", " more"]),
    "script-partial-then-text": ("tiny", "clip", dict(max_new_tokens=60),
                                 [f"<VID{i}>" for i in range(11)] + ["the", " end"]),
    "script-partial-at-length": ("tiny", "sound", dict(max_new_tokens=3), ["x", "<AUD0>", "<AUD1>"]),
    "script-stray-and-loop": ("tiny", "loop", dict(max_new_tokens=200, max_signal_run=2),
                              ["a", "<IMG3>", " b", *(_img(4) + [f"<AUD{i}>" for i in range(8)]) * 6]),
    "script-multibyte": ("tiny", "emoji", dict(max_new_tokens=40), ["cat 🐱 and 日本", *_img(4), " ok"]),
    "vicuna-stop-string": ("vicuna", "stop", dict(max_new_tokens=40), ["one # two", " ##", "# three"]),
    "vicuna-held-tail-at-eos": ("vicuna", "tail", dict(max_new_tokens=40), ["text ", "#"]),
    "vicuna-length": ("vicuna", "cut", dict(max_new_tokens=5), ["a b c d e f g h #"]),
    **{f"vicuna-sample-s{s}": ("vicuna", "tell me", dict(temperature=1.0, top_p=0.9, seed=s, max_new_tokens=40,
                                                         required=[IMAGE]), None)
       for s in range(3)},
}


def segments(name: str):
    from polymodal.llm import PromptSegment

    eng_name, prompt, _, _ = CASES[name]
    eng = engines()[eng_name]
    return eng, eng.chat_segments([("user", [PromptSegment(prompt, trusted=False)])])


def record(name: str) -> list[list]:
    """The events of one case as JSON-able rows: ``["text", delta]``, ``["group", ...]``, ``["output", ...]``."""
    eng, segs = segments(name)
    _, _, kwargs, script = CASES[name]
    if script is not None:
        kwargs = {**kwargs, "propose": _script(eng, script)}
    rows: list[list] = []
    for ev in eng.stream(segs, **kwargs):
        if ev.text is not None:
            rows.append(["text", ev.text])
        elif ev.group is not None:
            g = ev.group
            rows.append(["group", g.modality.value, list(g.positions), list(g.token_ids), g.text_offset,
                         g.completed, g.forced, round(float(g.hidden_states.double().sum()), 4),
                         round(float(g.token_embeds.double().sum()), 4)])
        else:
            o = ev.output
            rows.append(["output", o.text, o.prompt_len, list(o.generated_ids), o.finish_reason, list(o.notes)])
    return rows


if __name__ == "__main__":
    import torch

    torch.set_num_threads(1)
    json.dump({"recorded_on": sys.argv[1] if len(sys.argv) > 1 else "unknown",
               "cases": {name: record(name) for name in CASES}}, sys.stdout, ensure_ascii=False, indent=1)
    sys.stdout.write("\n")
