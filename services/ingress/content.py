"""``message.content`` of an answer: the text with a markdown reference where each medium was emitted.

One :class:`ContentStream` writes both the streamed content deltas and the whole answer's content (the
non-streamed body feeds it the answer's text and every reference at its offset), so the concatenated stream
equals the non-streamed ``content`` whenever the streamed text is the answer's text.

Layout rule (a function of what came before only, so it can stream): a reference starts a paragraph (the
whitespace before it dropped, a blank line before it unless the content is empty), the text after a reference
starts a new paragraph (its leading whitespace replaced by a blank line), and trailing whitespace is held back
until more text follows (an answer's trailing whitespace is never sent).
"""

from __future__ import annotations


class ContentStream:
    """Places references into a text that arrives in pieces.

    Feed :meth:`text` (the LLM's text deltas, in order) and :meth:`reference` (a reference and its character
    offset in that text, in offset order) in any interleaving; each returns the content to send now (maybe
    ``""``). :meth:`finish` returns the rest (references whose offset the text never reached). :attr:`content`
    is everything sent.
    """

    def __init__(self) -> None:
        self._text = ""
        self._placed = 0  # characters of the text already in the content
        self._pending: list[tuple[int, str]] = []
        self._out: list[str] = []
        self._tail = ""  # the last two characters sent (the layout rule looks at them)
        self._after_ref = False

    @property
    def content(self) -> str:
        return "".join(self._out)

    def text(self, delta: str) -> str:
        self._text += delta
        return self._drain()

    def reference(self, offset: int, markdown: str) -> str:
        """``markdown`` belongs at ``offset`` of the text (placed as soon as the text reaches it; an offset the
        content has already passed places it now)."""
        self._pending.append((int(offset), markdown))
        return self._drain()

    def finish(self) -> str:
        """The references still waiting (after the text); the held-back trailing whitespace is dropped."""
        sent = [self._emit_ref(md) for _, md in self._pending]
        self._pending.clear()
        return "".join(sent)

    # ---- internals -------------------------------------------------------------------------------
    def _drain(self) -> str:
        sent: list[str] = []
        while self._pending and self._pending[0][0] <= len(self._text):
            offset, md = self._pending.pop(0)
            if offset > self._placed:  # the text before a reference, its trailing whitespace dropped
                sent.append(self._emit_text(self._text[self._placed:offset].rstrip()))
                self._placed = offset
            sent.append(self._emit_ref(md))
        end = len(self._text.rstrip())
        if end > self._placed:
            sent.append(self._emit_text(self._text[self._placed:end]))
            self._placed = end
        return "".join(sent)

    def _emit_text(self, piece: str) -> str:
        if self._after_ref:
            piece = piece.lstrip()
            if not piece:
                return ""
            piece = "\n\n" + piece
            self._after_ref = False
        return self._send(piece)

    def _emit_ref(self, markdown: str) -> str:
        if not self._tail or self._tail.endswith("\n\n"):
            sep = ""
        elif self._tail.endswith("\n"):
            sep = "\n"
        else:
            sep = "\n\n"
        self._after_ref = True
        return self._send(sep + markdown)

    def _send(self, piece: str) -> str:
        if piece:
            self._out.append(piece)
            self._tail = (self._tail + piece)[-2:]
        return piece


def compose(text: str, references: list[tuple[int, str]]) -> str:
    """The whole content: ``text`` with each ``(offset, markdown)`` placed (in the given order, which must be
    output order)."""
    cs = ContentStream()
    for offset, md in references:
        cs.reference(min(max(0, offset), len(text)), md)
    cs.text(text)
    cs.finish()
    return cs.content
