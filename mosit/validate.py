"""Dialogue validation: every rule that MosIT's construction applied (speaker order, length, where media
may appear) plus a per-mode check that the dialogue carries exactly the mode's media.

Rules (the ``rule`` of a :class:`Violation`):

- ``empty_dialogue`` / ``empty_message``: nothing to learn from.
- ``speaker``: a speaker other than ``human`` / ``gpt``.
- ``starts_with_human``, ``ends_with_assistant``: NExT-GPT kept only dialogues that open with the human
  and close with the assistant.
- ``speaker_alternation``: two messages in a row from the same speaker.
- ``turn_count``: exchanges (human messages) outside ``[min_turns, max_turns]``.
- ``word_limit``: more words than ``word_limit`` in the whole dialogue (NExT-GPT: under 300).
- ``malformed_placeholder``: unclosed, mismatched, nested, empty or wrongly cased media tags.
- ``placeholder_not_allowed``: a placeholder in a speaker's turn where the mode has no media for that
  speaker (e.g. a human ``<Image>`` in ``T_I``).
- ``modality_mismatch``: the human / assistant placeholders are not exactly the mode's inputs / outputs
  (an extra medium or a missing one).
- ``repeated_message``: a message (of at least 4 words, placeholders aside) that (nearly) repeats an
  earlier one (``difflib`` ratio >= 0.9): small LLMs echo the previous turn.
- ``refusal``: an assistant-style refusal ("as an AI", "I don't have the ability to", "I cannot show")
  anywhere, captions included: useless as training data for a model that *can* show media.
"""

from __future__ import annotations

import difflib
import re
from collections import Counter
from dataclasses import dataclass

from mosit.dialogue import GPT, HUMAN, SPEAKERS, Dialogue, placeholder_problems
from mosit.modes import Mode

RULES = (
    "empty_dialogue", "empty_message", "speaker", "starts_with_human", "ends_with_assistant",
    "speaker_alternation", "turn_count", "word_limit", "malformed_placeholder", "placeholder_not_allowed",
    "modality_mismatch", "repeated_message", "refusal",
)
REPEAT_RATIO = 0.9
_REFUSAL = re.compile(
    r"\bas an ai\b|\bas an? (?:helpful |virtual )?(?:ai|assistant|language model)\b|"
    r"\bi (?:don't|do not) have the (?:ability|capability|capacity)\b|"
    r"\bi (?:can't|cannot|can not|am unable to|am not able to) (?:access|show|display|provide|play|generate|see|view|hear)\b|"
    r"\bsorry for any confusion\b", re.IGNORECASE)
_PLACEHOLDER = re.compile(r"<\s*(image|audio|video)\s*>.*?<\s*/\s*\1\s*>", re.IGNORECASE | re.DOTALL)


@dataclass(frozen=True)
class Violation:
    """One broken rule: ``rule`` is a key of :data:`RULES`; ``message`` says where and why."""

    rule: str
    message: str

    def __str__(self) -> str:
        return f"{self.rule}: {self.message}"


@dataclass(frozen=True)
class Rules:
    """Bounds of a valid dialogue."""

    min_turns: int = 3
    max_turns: int = 7
    word_limit: int = 300


def _fmt(counter: Counter) -> str:
    return ", ".join(f"{n} {m.value}" for m, n in sorted(counter.items(), key=lambda x: x[0].value)) or "none"


def validate_dialogue(dialogue: Dialogue, mode: Mode, rules: Rules = Rules()) -> list[Violation]:
    """Every violation of ``dialogue`` against ``mode`` and ``rules`` (empty list: valid)."""
    msgs = dialogue.messages
    if not msgs:
        return [Violation("empty_dialogue", "the dialogue has no messages")]
    out: list[Violation] = []
    for i, m in enumerate(msgs):
        if m.speaker not in SPEAKERS:
            out.append(Violation("speaker", f"message {i} is from {m.speaker!r}; expected one of {SPEAKERS}"))
        if not m.value.strip():
            out.append(Violation("empty_message", f"message {i} ({m.speaker}) is empty"))
    if msgs[0].speaker != HUMAN:
        out.append(Violation("starts_with_human", f"the first message is from {msgs[0].speaker!r}"))
    if msgs[-1].speaker != GPT:
        out.append(Violation("ends_with_assistant", f"the last message is from {msgs[-1].speaker!r}"))
    for i in range(1, len(msgs)):
        if msgs[i].speaker == msgs[i - 1].speaker:
            out.append(Violation("speaker_alternation", f"messages {i - 1} and {i} are both from {msgs[i].speaker!r}"))
            break
    turns = sum(m.speaker == HUMAN for m in msgs)
    if not rules.min_turns <= turns <= rules.max_turns:
        out.append(Violation("turn_count", f"{turns} exchanges; allowed {rules.min_turns}-{rules.max_turns}"))
    words = sum(len(m.value.split()) for m in msgs)
    if words > rules.word_limit:
        out.append(Violation("word_limit", f"{words} words; limit {rules.word_limit}"))
    for i, m in enumerate(msgs):
        for p in placeholder_problems(m.value):
            out.append(Violation("malformed_placeholder", f"message {i}: {p}"))
    allowed = {HUMAN: mode.inputs, GPT: mode.outputs}
    found: dict[str, Counter] = {HUMAN: Counter(), GPT: Counter()}
    for i, m in enumerate(msgs):
        if m.speaker not in found:
            continue
        for p in m.placeholders:
            found[m.speaker][p.modality] += 1
            if not allowed[m.speaker]:
                who = "human" if m.speaker == HUMAN else "assistant"
                out.append(Violation("placeholder_not_allowed",
                                     f"message {i}: a {p.modality.value} placeholder in a {who} turn; mode "
                                     f"{mode.name} has no {who} media"))
    for speaker, who in ((HUMAN, "human"), (GPT, "assistant")):
        want, got = Counter(allowed[speaker]), found[speaker]
        if want and got != want:
            extra, missing = got - want, want - got
            parts = []
            if extra:
                parts.append(f"extra {_fmt(extra)}")
            if missing:
                parts.append(f"missing {_fmt(missing)}")
            out.append(Violation("modality_mismatch",
                                 f"{who} media: {'; '.join(parts)} (mode {mode.name} wants {_fmt(want)})"))
    seen: list[tuple[int, str]] = []
    for i, m in enumerate(msgs):
        plain = " ".join(_PLACEHOLDER.sub(" ", m.value).lower().split())
        if len(plain.split()) >= 4:
            for j, prev in seen:
                ratio = difflib.SequenceMatcher(None, prev, plain, autojunk=False).ratio()
                if ratio >= REPEAT_RATIO:
                    out.append(Violation("repeated_message", f"message {i} repeats message {j} (similarity {ratio:.2f})"))
                    break
            seen.append((i, plain))
        hit = _REFUSAL.search(m.value)
        if hit:
            out.append(Violation("refusal", f"message {i}: {hit.group(0)!r}"))
    return out
