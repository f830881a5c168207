"""Dialogues with media placeholders, as MosIT's scenarist LLM writes them.

A message is plain text in which a medium is described by a placeholder,
``<Image> a red kite over a beach </Image>`` (likewise ``<Audio>``, ``<Video>``), the format of
NExT-GPT's MosIT demonstrations. :func:`parse_dialogue` reads the demonstrations' ``Human: ... / GPT: ...``
text; :func:`find_placeholders` finds well-formed placeholders and :func:`placeholder_problems` reports
malformed ones (unclosed, mismatched, nested, empty, wrongly cased tags).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from polymodal.modality import Modality

HUMAN, GPT = "human", "gpt"
SPEAKERS = (HUMAN, GPT)
_ANY_TAG_RE = re.compile(r"<\s*(/?)\s*([A-Za-z]+)\s*>")


def tag_name(modality: Modality) -> str:
    """The placeholder tag of ``modality`` (its spec's ``tag``: ``Image``, ``Audio``, ``Video``)."""
    return modality.spec.tag


def _media_tags(text: str) -> list[tuple[re.Match, Modality]]:
    """The tags of ``text`` that name a registered modality (any case), with that modality, in order."""
    names = {m.value: m for m in Modality}
    return [(t, names[t.group(2).lower()]) for t in _ANY_TAG_RE.finditer(text) if t.group(2).lower() in names]
_SPEAKER_RE = re.compile(r"^\s*(human|user|gpt|assistant)\s*[:：]\s?(.*)$", re.IGNORECASE)
_SPEAKER_ALIASES = {"human": HUMAN, "user": HUMAN, "gpt": GPT, "assistant": GPT}


def placeholder(modality: Modality, caption: str) -> str:
    """``<Image> caption </Image>`` for ``modality``."""
    tag = tag_name(modality)
    return f"<{tag}> {caption.strip()} </{tag}>"


@dataclass(frozen=True)
class Placeholder:
    """A well-formed placeholder: its modality, caption and ``[start, end)`` span in the message text."""

    modality: Modality
    caption: str
    start: int
    end: int


@dataclass(frozen=True)
class Message:
    """One message: ``speaker`` is ``"human"`` or ``"gpt"`` (NExT-GPT's ``from`` values)."""

    speaker: str
    value: str

    @property
    def placeholders(self) -> tuple[Placeholder, ...]:
        return find_placeholders(self.value)


@dataclass(frozen=True)
class Dialogue:
    """A dialogue of one mode about one topic (before its media are filled).

    Attributes:
        id: stable id, e.g. ``"mosit-000012"``.
        mode: mode registry key.
        topic: the topic it was written about.
        messages: in order.
        origin: ``"generated"`` (written by the LLM) or ``"draft"`` (supplied in the config's drafts file).
    """

    id: str
    mode: str
    topic: str
    messages: tuple[Message, ...]
    origin: str = "generated"

    def text(self) -> str:
        return "\n".join(f"{'Human' if m.speaker == HUMAN else 'GPT'}: {m.value}" for m in self.messages)

    def to_dict(self) -> dict:
        return {"id": self.id, "mode": self.mode, "topic": self.topic, "origin": self.origin,
                "messages": [{"from": m.speaker, "value": m.value} for m in self.messages]}

    @classmethod
    def from_dict(cls, d: dict) -> "Dialogue":
        return cls(id=d["id"], mode=d["mode"], topic=d.get("topic", ""), origin=d.get("origin", "generated"),
                   messages=tuple(Message(m["from"], m["value"]) for m in d["messages"]))


def find_placeholders(text: str) -> tuple[Placeholder, ...]:
    """Well-formed placeholders in ``text`` (a canonical open tag, a non-empty caption, the matching close
    tag, nothing tag-like in between), in order. Malformed ones are left out: see :func:`placeholder_problems`."""
    out: list[Placeholder] = []
    tags = _media_tags(text)
    i = 0
    while i < len(tags) - 1:
        (a, ma), (b, mb) = tags[i], tags[i + 1]
        if (not a.group(1) and b.group(1) and ma is mb and a.group(0) == f"<{tag_name(ma)}>"
                and b.group(0) == f"</{tag_name(mb)}>" and text[a.end():b.start()].strip()):
            out.append(Placeholder(ma, " ".join(text[a.end():b.start()].split()), a.start(), b.end()))
            i += 2
        else:
            i += 1
    return tuple(out)


def placeholder_problems(text: str) -> list[str]:
    """Human-readable problems with the media tags of ``text`` (empty list: every tag is well formed)."""
    problems: list[str] = []
    tags = _media_tags(text)
    i = 0
    while i < len(tags):
        a, m = tags[i]
        canon_open, canon_close = f"<{tag_name(m)}>", f"</{tag_name(m)}>"
        if a.group(1):
            problems.append(f"closing tag {a.group(0)!r} without an opening tag")
            i += 1
            continue
        if a.group(0) != canon_open:
            problems.append(f"tag {a.group(0)!r} should be written {canon_open!r}")
        if i + 1 >= len(tags):
            problems.append(f"{a.group(0)!r} is never closed")
            break
        b, mb = tags[i + 1]
        if not b.group(1):
            problems.append(f"{a.group(0)!r} is not closed before {b.group(0)!r}")
            i += 1
            continue
        if mb is not m:
            problems.append(f"{a.group(0)!r} is closed by {b.group(0)!r}")
        elif b.group(0) != canon_close:
            problems.append(f"tag {b.group(0)!r} should be written {canon_close!r}")
        if not text[a.end():b.start()].strip():
            problems.append(f"empty {tag_name(m)} placeholder")
        i += 2
    return problems


def parse_dialogue(text: str, *, id: str = "", mode: str = "", topic: str = "", origin: str = "generated") -> Dialogue:
    """Parse ``Human: ... / GPT: ...`` text (also ``User:`` / ``Assistant:``); a line without a speaker
    prefix continues the previous message. Text before the first speaker line is ignored.

    Raises:
        ValueError: no speaker line at all.
    """
    messages: list[list[str]] = []
    for line in text.splitlines():
        m = _SPEAKER_RE.match(line)
        if m:
            messages.append([_SPEAKER_ALIASES[m.group(1).lower()], m.group(2).strip()])
        elif messages and line.strip():
            messages[-1][1] = (messages[-1][1] + "\n" + line.strip()).strip()
    if not messages:
        raise ValueError("no 'Human:' or 'GPT:' line found in the dialogue text")
    return Dialogue(id=id, mode=mode, topic=topic, origin=origin,
                    messages=tuple(Message(s, v) for s, v in messages))
