"""Parsers of the grounding formats of several models, one registry: :data:`GROUNDING_FORMATS`.

The preset names the format (:class:`polymodal.grounding.config.GroundingConfig`); it is never guessed from
the text. Each parser turns an answer (its text, or its token ids and the tokenizer, decoded with the
special tokens kept, for formats whose tags are special tokens that ordinary decoding drops) and the
sizes of the images the user sent into the cleaned text and the boxes, in pixels of the image the boxes
refer to (the last image sent). A span that does not follow the format (a missing coordinate, a value out
of range, a reversed box) stays text; parsing never raises on model output.

Formats and their reference frames (``W x H`` is the sent image):

=============  ==========================================================  =====================================
key            syntax                                                      frame
=============  ==========================================================  =====================================
``loc``        ``<p>dog</p><loc_a><loc_b>`` (ours; pairs per box)          G x G grid cells over the image
``kosmos2``    ``<phrase>dog</phrase><object><patch_index_a><patch_..>``   32 x 32 grid, cell centres
               ``</object>`` (boxes joined by ``</delimiter_of_multi_..>``) (transformers' post-processing)
``qwen-vl``    ``<ref>dog</ref><box>(x1,y1),(x2,y2)</box>``                integers 0-1000 of W and H
``qwen2-vl``   ``<|object_ref_start|>dog<|object_ref_end|><|box_start|>``  integers 0-1000 of W and H
               ``(x1,y1),(x2,y2)<|box_end|>`` (special tokens)
``shikra``     ``dog[x1,y1,x2,y2;x1,y1,x2,y2]``                            0-1 of the image padded to a square
                                                                           (centred, side max(W, H))
``minigpt-v2`` ``<p>dog</p> {<x1><y1><x2><y2>}<delim>{...}``               integers 0-100 of W and H
``paligemma``  ``<loc0120><loc0030><loc0900><loc0500> dog ; ...``         y first: y1 x1 y2 x2, n/1024 of H, W
=============  ==========================================================  =====================================

Sources: Kosmos-2 (arXiv 2306.14824; ``transformers.models.kosmos2.processing_kosmos2``), Qwen-VL
(arXiv 2308.12966, its tokenizer's ``<ref>``/``<box>`` and drawing at ``/1000 * w``), Qwen2-VL's tokenizer
special tokens, Shikra (arXiv 2306.15195: boxes as ``[x1,y1,x2,y2]`` with 3 decimals, ``;`` between boxes
of one phrase, images expanded to a square), MiniGPT-v2 (arXiv 2310.09478: ``{<X_left><Y_top><X_right>
<Y_bottom>}`` normalised to [0, 100], ``<delim>`` between boxes), PaliGemma (arXiv 2407.07726:
``<loc0000>..<loc1023>``, ``<ymin><xmin><ymax><xmax>``, detections separated by ``;``).
"""

from __future__ import annotations

import abc
import re
from collections.abc import Callable, Sequence
from typing import ClassVar

from polymodal.grounding.boxes import (
    BoxPx,
    GroundedPhrase,
    GroundingOutput,
    Span,
    assemble,
    box_from_fractions,
    last_image,
)
from polymodal.grounding.loc import LocGrid

ImageSizes = Sequence[tuple[int, int]]


class GroundingParser(abc.ABC):
    """One format. :meth:`parse` is the entry; subclasses implement :meth:`spans`."""

    name: ClassVar[str]
    frame: ClassVar[str]

    def parse(self, text: str | None = None, *, image_sizes: ImageSizes = (), token_ids: Sequence[int] | None = None,
              tokenizer=None) -> GroundingOutput:
        """Parse an answer.

        Args:
            text: the answer as the model wrote it (tags included). Or, instead:
            token_ids, tokenizer: the answer's ids, decoded here with the special tokens kept.
            image_sizes: (width_px, height_px) of each image the user sent, in order; boxes refer to the
                last one. Without images the markup stays text (there is nothing to place the boxes on).
        Raises:
            ValueError: neither ``text`` nor ``token_ids`` with ``tokenizer`` given.
        """
        if text is None:
            if token_ids is None or tokenizer is None:
                raise ValueError("give the answer text, or its token_ids and the tokenizer")
            text = decode_keeping_tags(token_ids, tokenizer)
        where = last_image(image_sizes)
        if where is None:
            return GroundingOutput(self.leftover(text))
        index, w, h = where
        return assemble(text, self.spans(text, w, h), index, self.leftover)

    @abc.abstractmethod
    def spans(self, text: str, width_px: int, height_px: int) -> list[Span]:
        """The well-formed spans of ``text`` with their boxes in pixels."""

    def leftover(self, text: str) -> str:
        """Text outside the spans, as it appears in the answer (default: unchanged)."""
        return text


def decode_keeping_tags(token_ids: Sequence[int], tokenizer) -> str:
    """Decode ids with special tokens kept (tags such as Qwen2-VL's ``<|box_start|>`` are special tokens that
    ``skip_special_tokens=True`` drops)."""
    return tokenizer.decode(list(token_ids), skip_special_tokens=False)


def _phrase_span(start: int, end: int, replacement: str, raw_phrase: str | None, boxes: list[BoxPx]) -> Span:
    """A span whose replacement is the phrase (markers removed), leading/trailing spaces kept as text."""
    if raw_phrase is None:
        return Span(start, end, replacement, "", tuple(boxes))
    lead = len(raw_phrase) - len(raw_phrase.lstrip())
    return Span(start, end, replacement, raw_phrase.strip(), tuple(boxes), lead)


def _not_inside(opening: str, closing: str) -> str:
    """Regex for text holding neither marker (so a phrase never spans an earlier, unclosed marker)."""
    return rf"(?:(?!{re.escape(opening)}|{re.escape(closing)}).)*?"


# ---- ours ------------------------------------------------------------------------------------------
class LocParser(GroundingParser):
    """``<p>phrase</p>`` then one pair of location tokens per box (see :mod:`polymodal.grounding.loc`).

    Our tokens are special tokens: they never show in the answer text, so a malformed span leaves its words
    (the phrase) and drops its tokens, and stray tokens are dropped too.
    """

    name = "loc"
    frame = "G x G grid cells over the image (cell edges)"

    def __init__(self, grid: LocGrid | None = None):
        self.grid = grid or LocGrid()
        g = self.grid
        before, _, after = g.token_format.partition("{i}")
        loc = rf"{re.escape(before)}(\d+){re.escape(after)}"
        self._loc = re.compile(loc)
        p0, p1 = g.phrase_markers
        unit = rf"{re.escape(g.box_markers[0])}(?:\s*{loc})*\s*{re.escape(g.box_markers[1])}" if g.box_markers \
            else loc
        self._span = re.compile(
            rf"(?:{re.escape(p0)}(?P<phrase>{_not_inside(p0, p1)}){re.escape(p1)}\s*)?"
            rf"(?P<boxes>{unit}(?:\s*{unit})*)", re.DOTALL)
        self._unit = re.compile(unit) if g.box_markers else None
        strays = [*g.phrase_markers, *(g.box_markers or ()), *(t for _, t in g.task_tokens)]
        self._strays = re.compile("|".join([loc, *(re.escape(s) for s in strays)]))

    def spans(self, text: str, width_px: int, height_px: int) -> list[Span]:
        out = []
        for m in self._span.finditer(text):
            body = m.group("boxes")
            if self._unit is not None:
                pairs = [[int(x) for x in self._loc.findall(u.group(0))] for u in self._unit.finditer(body)]
            else:
                cells = [int(x) for x in self._loc.findall(body)]
                pairs = [cells[k:k + 2] for k in range(0, len(cells), 2)]
            boxes = [self.grid.decode(p[0], p[1], width_px, height_px) if len(p) == 2 else None for p in pairs]
            if not boxes or any(b is None for b in boxes):
                continue  # malformed: stays (its tokens dropped by `leftover`)
            phrase = m.group("phrase")
            out.append(_phrase_span(m.start(), m.end(), phrase or "", phrase, boxes))
        return out

    def leftover(self, text: str) -> str:
        return self._strays.sub("", text)


# ---- Kosmos-2 --------------------------------------------------------------------------------------
_KOSMOS_PAIR = r"<patch_index_\d+><patch_index_\d+>"
_KOSMOS_SPAN = re.compile(
    r"(?:<phrase>(?P<phrase>[^<]+)</phrase>)?"
    rf"<object>(?P<boxes>(?:{_KOSMOS_PAIR}</delimiter_of_multi_objects/>)*{_KOSMOS_PAIR})</object>")


class Kosmos2Parser(GroundingParser):
    """Kosmos-2, parsed by transformers' own post-processing (``clean_text_and_extract_entities_with_bboxes``,
    what ``Kosmos2Processor.post_process_generation`` runs on the text after ``</image>``).

    That cleanup removes every ``<...>`` tag, so a malformed span leaves its words without tags; boxes are
    fractions of the image (Kosmos-2 resizes it to a square without padding), times W and H here.
    """

    name = "kosmos2"
    frame = "32 x 32 grid, cell centres, fractions of W and H"
    num_patches_per_side = 32

    def parse(self, text: str | None = None, *, image_sizes: ImageSizes = (), token_ids=None,
              tokenizer=None) -> GroundingOutput:
        if text is None:
            if token_ids is None or tokenizer is None:
                raise ValueError("give the answer text, or its token_ids and the tokenizer")
            text = decode_keeping_tags(token_ids, tokenizer)
        where = last_image(image_sizes)
        if where is None:
            return GroundingOutput(text)
        from transformers.models.kosmos2.processing_kosmos2 import clean_text_and_extract_entities_with_bboxes

        caption = text.split("</image>")[-1]  # as post_process_generation does
        cleaned, entities = clean_text_and_extract_entities_with_bboxes(caption, self.num_patches_per_side)
        # the raw span of each entity, in the order transformers lists them (a phrase-less object gives one
        # entity per box)
        raws: list[str] = []
        for m in _KOSMOS_SPAN.finditer(caption):
            n = 1 if m.group("phrase") else m.group("boxes").count("</delimiter_of_multi_objects/>") + 1
            raws.extend([m.group(0)] * n)
        index, w, h = where
        boxes = []
        for k, (name, (start, end), fractions) in enumerate(entities):
            fake = name.startswith("<patch_index_")
            for x1, y1, x2, y2 in fractions:
                box = box_from_fractions(x1, y1, x2, y2, w, h)
                if box is not None:
                    boxes.append(GroundedPhrase("" if fake else name, box, index, raws[k] if k < len(raws) else "",
                                                None if fake else (start, end)))
        return GroundingOutput(cleaned, tuple(boxes))

    def spans(self, text: str, width_px: int, height_px: int) -> list[Span]:  # pragma: no cover - parse overrides
        raise NotImplementedError


# ---- Qwen-VL / Qwen2-VL -----------------------------------------------------------------------------
_QWEN_BOX = re.compile(r"^\s*\(\s*(\d+)\s*,\s*(\d+)\s*\)\s*,\s*\(\s*(\d+)\s*,\s*(\d+)\s*\)\s*$")


def _phrase_box_spans(span: re.Pattern, box: re.Pattern, read: Callable[[re.Match], BoxPx | None],
                      text: str) -> list[Span]:
    """Spans of ``[phrase] box box ...`` (``span``'s groups ``phrase``, optional, and ``boxes``): each ``box`` match in
    ``boxes`` read into pixels by ``read``; a span with a box ``read`` refuses (``None``) stays text, all or none."""
    out = []
    for m in span.finditer(text):
        boxes = [read(b) for b in box.finditer(m.group("boxes"))]
        if boxes and all(b is not None for b in boxes):
            phrase = m.group("phrase")
            out.append(_phrase_span(m.start(), m.end(), phrase or "", phrase, boxes))
    return out


class _QwenParser(GroundingParser):
    """``REF0 phrase REF1`` then one or more ``BOX0 (x1,y1),(x2,y2) BOX1``; integers in [0, 1000] of W, H."""

    tags: ClassVar[tuple[str, str, str, str]]
    frame = "integers 0-1000, fractions x/1000 of W and y/1000 of H"

    def __init__(self):
        r0, r1, b0, b1 = (re.escape(t) for t in self.tags)
        box = rf"{b0}(?:(?!{b0}|{b1}).)*?{b1}"
        self._box = re.compile(rf"{b0}(?P<c>(?:(?!{b0}|{b1}).)*?){b1}", re.DOTALL)
        self._span = re.compile(
            rf"(?:{r0}(?P<phrase>{_not_inside(self.tags[0], self.tags[1])}){r1}\s*)?(?P<boxes>{box}(?:\s*{box})*)",
            re.DOTALL)

    def spans(self, text: str, width_px: int, height_px: int) -> list[Span]:
        def read(b: re.Match) -> BoxPx | None:
            c = _QWEN_BOX.match(b.group("c"))
            vals = [int(v) for v in c.groups()] if c else []
            if len(vals) != 4 or max(vals) > 1000:
                return None
            return box_from_fractions(*(v / 1000 for v in vals), width_px, height_px)

        return _phrase_box_spans(self._span, self._box, read, text)


class QwenVLParser(_QwenParser):
    """Qwen-VL: ``<ref>phrase</ref><box>(x1,y1),(x2,y2)</box>``."""

    name = "qwen-vl"
    tags = ("<ref>", "</ref>", "<box>", "</box>")


class Qwen2VLParser(_QwenParser):
    """Qwen2-VL: the same with special tokens ``<|object_ref_start|>`` ``<|object_ref_end|>``
    ``<|box_start|>`` ``<|box_end|>`` (give ``token_ids`` and the tokenizer: ordinary decoding drops them)."""

    name = "qwen2-vl"
    tags = ("<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>", "<|box_end|>")


# ---- Shikra ------------------------------------------------------------------------------------------
_NUM = r"\d*\.?\d+"
_SHIKRA_BOX = rf"{_NUM}(?:\s*,\s*{_NUM}){{3}}"
_SHIKRA_SPAN = re.compile(rf"\[\s*(?P<boxes>{_SHIKRA_BOX}(?:\s*;\s*{_SHIKRA_BOX})*)\s*\]")
_SENTENCE_BREAK = re.compile(r"[.,;:!?\n]")


class ShikraParser(GroundingParser):
    """Shikra: boxes written right after the words they ground, ``The man[0.226,0.204,0.462,0.862]``; several
    boxes of one phrase joined by ``;``. Values are fractions (0-1) of the image padded to a square of side
    S = max(W, H), the image centred (pad (S - W) // 2 left, (S - H) // 2 top). Shikra marks no phrase: the
    phrase is the words before the box, back to the previous box or punctuation mark."""

    name = "shikra"
    frame = "0-1 of the image padded to a centred square of side max(W, H)"

    def spans(self, text: str, width_px: int, height_px: int) -> list[Span]:
        side = max(width_px, height_px)
        pad_x, pad_y = (side - width_px) // 2, (side - height_px) // 2
        out = []
        boundary = 0
        for m in _SHIKRA_SPAN.finditer(text):
            boxes = []
            for chunk in m.group("boxes").split(";"):
                vals = [float(v) for v in chunk.split(",")]
                if any(v > 1.0 for v in vals):
                    boxes = []
                    break
                x1, y1, x2, y2 = vals
                box = box_from_fractions((x1 * side - pad_x) / width_px, (y1 * side - pad_y) / height_px,
                                         (x2 * side - pad_x) / width_px, (y2 * side - pad_y) / height_px,
                                         width_px, height_px)
                if box is None:
                    boxes = []
                    break
                boxes.append(box)
            if not boxes:
                continue
            before = text[boundary:m.start()]
            cut = [b.end() for b in _SENTENCE_BREAK.finditer(before)]
            before_start = boundary + (cut[-1] if cut else 0)
            before = text[before_start:m.start()]
            phrase = before.strip()
            phrase_start = before_start + len(before) - len(before.lstrip())
            out.append(Span(m.start(), m.end(), "", phrase, tuple(boxes), phrase_start - m.start() if phrase else None))
            boundary = m.end()
        return out


# ---- MiniGPT-v2 ------------------------------------------------------------------------------------
_MGPT_BOX = r"\{<\d+><\d+><\d+><\d+>\}"


class MiniGPTv2Parser(GroundingParser):
    """MiniGPT-v2: ``<p>phrase</p> {<x1><y1><x2><y2>}``, boxes of one phrase joined by ``<delim>``; integers
    normalised to [0, 100] of W and H (a referring answer may be the box alone)."""

    name = "minigpt-v2"
    frame = "integers 0-100, fractions x/100 of W and y/100 of H"
    _span = re.compile(rf"(?:<p>(?P<phrase>{_not_inside('<p>', '</p>')})</p>\s*)?"
                       rf"(?P<boxes>{_MGPT_BOX}(?:\s*<delim>\s*{_MGPT_BOX})*)", re.DOTALL)
    _box = re.compile(r"\{<(\d+)><(\d+)><(\d+)><(\d+)>\}")

    def spans(self, text: str, width_px: int, height_px: int) -> list[Span]:
        def read(b: re.Match) -> BoxPx | None:
            vals = [int(v) for v in b.groups()]
            return box_from_fractions(*(v / 100 for v in vals), width_px, height_px) if max(vals) <= 100 else None

        return _phrase_box_spans(self._span, self._box, read, text)


# ---- PaliGemma -------------------------------------------------------------------------------------
class PaliGemmaParser(GroundingParser):
    """PaliGemma: four location tokens ``<ymin><xmin><ymax><xmax>`` (``<loc0000>..<loc1023>``, value / 1024 of
    H and W), optional ``<segNNN>`` mask tokens (dropped), then the label; detections joined by `` ; ``.
    A run of location tokens that is not exactly four stays text."""

    name = "paligemma"
    frame = "y first (y1 x1 y2 x2), n/1024 of H and W"
    _span = re.compile(r"(?<!<loc\d{4}>)(?P<locs>(?:<loc\d{4}>){4})(?!<loc\d{4}>)(?P<segs>(?:<seg\d{3}>)*)"
                       r"(?P<label>[ \t]*[^;<\n]*)")
    _loc = re.compile(r"<loc(\d{4})>")

    def spans(self, text: str, width_px: int, height_px: int) -> list[Span]:
        out = []
        for m in self._span.finditer(text):
            y1, x1, y2, x2 = (int(v) / 1024 for v in self._loc.findall(m.group("locs")))
            box = box_from_fractions(x1, y1, x2, y2, width_px, height_px)
            if box is None:
                continue
            label = m.group("label").rstrip()
            end = m.start("label") + len(label)
            label = label.lstrip()
            out.append(_phrase_span(m.start(), end, label, label, [box]))
        return out


GROUNDING_FORMATS: dict[str, type[GroundingParser]] = {
    "loc": LocParser,
    "kosmos2": Kosmos2Parser,
    "qwen-vl": QwenVLParser,
    "qwen2-vl": Qwen2VLParser,
    "shikra": ShikraParser,
    "minigpt-v2": MiniGPTv2Parser,
    "paligemma": PaliGemmaParser,
}


def build_parser(name: str, *, grid: LocGrid | None = None) -> GroundingParser:
    """The parser of a format (``grid``: our location tokens, for ``loc``).

    Raises:
        ValueError: an unknown format (lists the choices).
    """
    if name not in GROUNDING_FORMATS:
        raise ValueError(f"unknown grounding format {name!r}; choose from: {', '.join(GROUNDING_FORMATS)}")
    cls = GROUNDING_FORMATS[name]
    return cls(grid) if cls is LocParser else cls()


def parse_grounding(name: str, text: str | None = None, *, image_sizes: ImageSizes = (), token_ids=None,
                    tokenizer=None, grid: LocGrid | None = None) -> GroundingOutput:
    """One call: :func:`build_parser` then :meth:`GroundingParser.parse`."""
    return build_parser(name, grid=grid).parse(text, image_sizes=image_sizes, token_ids=token_ids, tokenizer=tokenizer)
