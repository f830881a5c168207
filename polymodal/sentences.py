"""Sentences of a text to speak, found in the whole text or as the text arrives in pieces (an LLM's deltas).

:func:`split_sentences` cuts a text where a speaker would pause for a sentence; :class:`SentenceStream` finds the
same sentences in text that arrives delta by delta, releasing each as soon as the next one starts. Speech is made
sentence by sentence (``skills.tts``), so a spoken answer can start before the answer is written, and the speech
of a text spoken in pieces is the speech of the whole text. Plain Python (no model, no numpy): the HTTP edge uses
it.
"""

from __future__ import annotations

import re

MAX_SENTENCE_CHARS = 250
"""A sentence longer than this is cut at a comma / semicolon / colon, else between words (bounds the time to
the first chunk of a stream and one subprocess's input)."""

_ABBREVIATIONS = frozenset({"mr", "mrs", "ms", "dr", "prof", "st", "sr", "jr", "vs", "etc", "e.g", "i.e", "no",
                            "fig", "approx", "mt", "ave", "inc", "ltd", "co", "a.m", "p.m", "u.s", "u.k"})
# a sentence end: terminal punctuation (and closing quotes / brackets) followed by whitespace, or a line break
_BOUNDARY = re.compile(r"(?<=[.!?\u2026])([\"'\u201d\u2019)\]]*)\s+|\s*\n\s*")
SPEAKABLE = re.compile(r"\w")  # a letter or a digit: something to say
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")


def _cut_long(sentence: str, max_chars: int) -> list[str]:
    """Cut a sentence over ``max_chars`` at the last , ; : before the limit, else at the last space."""
    out = []
    rest = sentence
    while len(rest) > max_chars:
        head = rest[:max_chars]
        cut = max(head.rfind(", "), head.rfind("; "), head.rfind(": "))
        if cut < max_chars // 3:
            cut = head.rfind(" ")
        if cut <= 0:
            cut = max_chars - 1  # one unbroken word longer than the limit
        out.append(rest[:cut + 1].strip())
        rest = rest[cut + 1:].strip()
    if rest:
        out.append(rest)
    return out


def _pieces(text: str) -> list[str]:
    """The text cut at every sentence boundary (abbreviations such as "Dr." are not boundaries)."""
    pieces, start = [], 0
    for m in _BOUNDARY.finditer(text):
        closers = m.group(1) or ""  # closing quotes / brackets stay with their sentence
        piece = text[start:m.start()]
        last_word = piece.rsplit(None, 1)[-1].rstrip(".").lower() if piece.strip() else ""
        initial = len(last_word) == 1 and last_word.isalpha()  # "J. R. R. Tolkien"
        if "\n" not in m.group(0) and piece.endswith(".") and (last_word in _ABBREVIATIONS or initial):
            continue
        pieces.append(piece + closers)
        start = m.end()
    pieces.append(text[start:])
    return pieces


def split_sentences(text: str, max_chars: int = MAX_SENTENCE_CHARS) -> list[str]:
    """The sentences of ``text``, in order, as they are spoken one by one.

    Boundaries: ``.`` ``!`` ``?`` ``…`` (with any closing quotes or brackets) followed by whitespace, except after a
    common abbreviation (``Dr.``, ``e.g.``, ``p.m.``) or an initial (``J.``), and line breaks. A piece without a
    letter or digit ("...", "--") is joined to the sentence before it (or after it, at the start); sentences over
    ``max_chars`` are cut (see :data:`MAX_SENTENCE_CHARS`). Control characters are dropped, runs of whitespace
    become one space.

    Returns:
        The sentences; empty when nothing in ``text`` can be spoken.
    """
    text = _CONTROL.sub(" ", text.replace("\r\n", "\n").replace("\r", "\n"))
    out: list[str] = []
    pending = ""  # unspeakable pieces before the first speakable one
    for piece in _pieces(text):
        piece = " ".join(piece.split())
        if not piece:
            continue
        if not SPEAKABLE.search(piece):
            if out:
                out[-1] = f"{out[-1]} {piece}"
            else:
                pending = f"{pending} {piece}".strip()
            continue
        if pending:
            piece, pending = f"{pending} {piece}", ""
        out.append(piece)
    return [s for sentence in out for s in _cut_long(sentence, max_chars)]


class SentenceStream:
    """Cuts text that arrives in pieces (an LLM's deltas) into sentences as soon as each is complete.

    ``feed(delta)`` returns the sentences completed so far, ``flush()`` the rest at the end. For any way of
    cutting a text into deltas, the sentences returned in order equal :func:`split_sentences` of the whole text
    (a sentence is released only once the text after it starts another speakable sentence, so a boundary is
    never taken back). Thread-unsafe: one per stream.
    """

    def __init__(self, max_chars: int = MAX_SENTENCE_CHARS):
        self.max_chars = max_chars
        self._buffer = ""
        self._done = 0  # sentences of the buffer's split already released

    def feed(self, delta: str) -> list[str]:
        """Add ``delta``; returns the sentences that are now complete (maybe none)."""
        self._buffer += delta
        sentences = split_sentences(self._buffer, self.max_chars)
        # the last sentence may still grow (or absorb trailing punctuation): keep it back
        ready = sentences[self._done:max(self._done, len(sentences) - 1)]
        self._done += len(ready)
        return ready

    def flush(self) -> list[str]:
        """The sentences not yet released (call once, at the end of the text)."""
        sentences = split_sentences(self._buffer, self.max_chars)
        rest = sentences[self._done:]
        self._done = len(sentences)
        return rest
