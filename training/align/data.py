"""Training data: readers for NExT-GPT's on-disk formats and our own, into two record kinds.

Records:

- :class:`CaptionPair`: one medium (or only its caption) and its caption. NExT-GPT's T-X pair data
  (``cc3m.json``, ``webvid.json``, ``audiocap.json``), a plain JSONL of ``{path, caption, modality}``,
  and caption lists (text or CSV with a ``caption`` column, e.g. AudioCaps) read into pairs. Each stage
  turns a pair into a dialogue with its template (see :mod:`training.align.stages`).
- :class:`Dialogue`: user / assistant messages whose parts are text and :class:`MediaRef`; a medium in a
  user message is an *input* (encoded, input projector), in an assistant message an *output* (signal
  group, output projector, caption target). NExT-GPT's ``*_comprehension.json`` /
  ``*_generation.json``, its text-to-X instruction JSON, and MosIT records read into dialogues.

Readers (registry :data:`READERS`; ``format="auto"`` picks one from the file's suffix and first record):

- ``pairs`` (aliases ``cc3m``, ``webvid``, ``audiocap``): a JSON list of ``{"caption", "image_name" |
  "video_name" | "audio_name", "id"?}``; files in the sibling ``images/`` / ``videos/`` / ``audios/``
  folder (or next to the JSON).
- ``comprehension``: ``{"input_image" | "input_video" | "input_audio", "conversations": [{"from",
  "value"}]}`` with a ``<image>`` / ``<video>`` / ``<audio>`` placeholder in the human turn.
- ``generation``: ``{"output_image" | ..., "image_captions", "image_caption_embeddings"?, "conversations"}``
  with the placeholder in the gpt turn.
- ``t2x``: NExT-GPT's T-T+X instruction data: ``{"image_captions": [..], "image_caption_embeddings":
  [..], "conversations": [{"from", "value", "caption"?, "output_modality"?}]}`` (likewise audio/video),
  placeholders in gpt turns filled, in order, with the record's captions.
- ``mosit``: MosIT records: ``{"image_list" | "audio_list" | "video_list": [{"name" (or "image_name"
  ...), "data_source"?, "caption", "caption_embedding"?}], "conversation" (or "conversations"):
  [{"from": "human" | "gpt", "value"}]}``; a message refers to a medium by its file name (optionally inside
  ``<Image>...</Image>`` tags): in a human message it is an input, in a gpt message an output; an optional
  ``"system"`` string replaces the chat format's system text for that dialogue.
- ``jsonl``: one ``{"path"?, "caption", "modality"}`` object per line (``path`` relative to the file).
- ``captions``: a caption per line (``.txt``) or a CSV with a ``caption`` column; needs a modality.
- ``builtin``: the caption list shipped in :mod:`training.align.captions` (path ``builtin``).
- ``grounding``: RefCOCO-style rows, one ``{"image", "phrase", "box", "box_format", "task"?, "question"?}``
  per line (``.jsonl``) or a JSON list; see :func:`read_grounding`. Each becomes an instruct dialogue whose
  answer is the phrase and its boxes in the preset's location tokens (:mod:`polymodal.grounding.loc`).

A row whose medium is needed (see :func:`check_media`) but missing raises :class:`MissingMediaError`
naming the file, the row and the path.
"""

from __future__ import annotations

import csv
import json
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from polymodal.modality import Modality

IMAGE, AUDIO, VIDEO = Modality.IMAGE, Modality.AUDIO, Modality.VIDEO
# Media folders are the specs' answer_field (images/, audios/, videos/); <image> placeholders and <Image> tags name
# a registered modality (any case).
_PLACEHOLDER_RE = re.compile(r"<([A-Za-z][A-Za-z0-9_]*)>")  # a registered modality's name: letters, then digits too


def _placeholders(text: str) -> list[tuple[re.Match, Modality]]:
    """The ``<image>`` / ``<audio>`` / ``<video>`` placeholders of ``text`` (any registered modality, any case)."""
    names = {m.value: m for m in Modality}
    return [(x, names[x.group(1).lower()]) for x in _PLACEHOLDER_RE.finditer(text) if x.group(1).lower() in names]
_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}


class DataFormatError(ValueError):
    """A data file that cannot be read as the format asked (names the file and the row)."""


class MissingMediaError(DataFormatError):
    """A row refers to a medium file that does not exist (names the data file, the row and the path)."""


@dataclass(frozen=True)
class MediaRef:
    """A medium in a record.

    Attributes:
        modality: image / audio / video.
        path: the medium's file, or ``None`` when only its caption is known (text-to-X data).
        caption: its caption (the decoding-side target); ``None`` for an input medium without one.
        embedding_path: a cached caption embedding of the decoder's text encoder (NumPy ``.npy``,
            (Q, D_cond) or (D_cond,)), used instead of encoding ``caption`` when its shape fits.
    """

    modality: Modality
    path: Path | None = None
    caption: str | None = None
    embedding_path: Path | None = None


@dataclass(frozen=True)
class CaptionPair:
    """One (medium, caption) pair; ``source`` names the file and row (``"cc3m.json row 3"``)."""

    media: MediaRef
    source: str

    @property
    def modality(self) -> Modality:
        return self.media.modality

    @property
    def caption(self) -> str:
        return self.media.caption or ""


@dataclass(frozen=True)
class TaskRef:
    """A grounding task identifier in a user message (``grounding``, ``refer``, ...): the preset's identifier
    token goes there, as :meth:`polymodal.pipeline.LLMStage.segments` puts it at inference."""

    name: str


@dataclass(frozen=True)
class GroundedSpan:
    """An answer part: a phrase and its boxes, written in the preset's grounding tokens when the sequence is
    built (``<p>phrase</p><loc_a><loc_b>...``), so the data does not depend on the grid size.

    Attributes:
        phrase: the words. boxes_px: (x1, y1, x2, y2) boxes in pixels of the image.
        image_size: (width_px, height_px) of the image the boxes are in.
    """

    phrase: str
    boxes_px: tuple[tuple[float, float, float, float], ...]
    image_size: tuple[int, int]


@dataclass(frozen=True)
class Message:
    """``role`` is ``"user"`` or ``"assistant"``; ``parts`` are ``str``, :class:`MediaRef` and, in grounding
    data, :class:`TaskRef` (user) and :class:`GroundedSpan` (assistant), in order."""

    role: str
    parts: tuple[str | MediaRef | TaskRef | GroundedSpan, ...]


@dataclass(frozen=True)
class Dialogue:
    """A conversation; ``source`` names the file and row; ``system``: its own system text instead of the chat
    format's (a MosIT record's ``system``, e.g. the skill listing a served model reads when skills are offered)."""

    messages: tuple[Message, ...]
    source: str
    system: str | None = None

    def media(self, role: str | None = None) -> list[MediaRef]:
        return [p for m in self.messages if role in (None, m.role) for p in m.parts if isinstance(p, MediaRef)]


Record = CaptionPair | Dialogue


@dataclass(frozen=True)
class DataSpec:
    """Where to read: ``path`` (or ``"builtin"``), ``format`` (a :data:`READERS` key or ``auto``), the
    modality of rows that do not state one, and a folder to resolve media names against."""

    path: str
    format: str = "auto"
    modality: Modality | None = None
    media_root: str | None = None


# --------------------------------------------------------------------------------------------------
# helpers


def _load_json_list(path: Path) -> list:
    try:
        body = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as e:
        raise DataFormatError(f"cannot read {path}: {e}") from e
    except json.JSONDecodeError as e:
        raise DataFormatError(f"{path} is not valid JSON: {e}") from e
    if isinstance(body, dict):
        for key in ("data", "records", "items"):
            if isinstance(body.get(key), list):
                return body[key]
        body = [body]
    if not isinstance(body, list):
        raise DataFormatError(f"{path}: expected a JSON list of records")
    return body


def _row(path: Path, i: int) -> str:
    return f"{path} row {i}"


def _need(rec: dict, key: str, where: str, kinds=(str,)):
    if key not in rec:
        raise DataFormatError(f"{where}: missing field {key!r} (fields: {', '.join(sorted(rec)) or 'none'})")
    val = rec[key]
    if not isinstance(val, kinds):
        raise DataFormatError(f"{where}: field {key!r} must be {' or '.join(k.__name__ for k in kinds)}, "
                              f"got {type(val).__name__}")
    return val


def _roots(path: Path, spec: DataSpec, modality: Modality | None) -> list[Path]:
    base = [Path(spec.media_root)] if spec.media_root else []
    base.append(path.parent)
    out: list[Path] = []
    for b in base:
        if modality is not None:
            out.append(b / modality.spec.answer_field)
        out.extend([b / "media", b])
    return out


def _resolve(name: str | None, path: Path, spec: DataSpec, modality: Modality | None) -> Path | None:
    """The first existing ``root / name`` (see :func:`_roots`); else the most specific candidate."""
    if not name:
        return None
    p = Path(name)
    if p.is_absolute():
        return p
    candidates = [r / p for r in _roots(path, spec, modality)]
    for c in candidates:
        if c.exists():
            return c
    return candidates[0]


def _emb(name: str | None, path: Path, spec: DataSpec, modality: Modality) -> Path | None:
    if not name:
        return None
    p = Path(name)
    if p.is_absolute():
        return p
    base = path.parent
    folders = ("", "embed", "embeddings", f"{modality.spec.answer_field[:-1]}_embeddings")
    for c in (base / f / p for f in folders):
        if c.exists():
            return c
    return None  # a missing cached embedding is not an error: the caption is encoded instead


def _split_placeholders(text: str, media: Sequence[MediaRef], where: str) -> tuple[str | MediaRef, ...]:
    """Replace ``<image>``/``<audio>``/``<video>`` placeholders in order with ``media`` of that modality."""
    queues = {m: [x for x in media if x.modality is m] for m in Modality}
    parts: list[str | MediaRef] = []
    cursor = 0
    for match, m in _placeholders(text):
        if not queues[m]:
            raise DataFormatError(f"{where}: placeholder {match.group(0)} has no {m.value} in the record")
        if text[cursor:match.start()].strip():
            parts.append(text[cursor:match.start()].strip())
        parts.append(queues[m].pop(0))
        cursor = match.end()
    if text[cursor:].strip():
        parts.append(text[cursor:].strip())
    return tuple(parts)


def _messages(convo, where: str, key: str = "conversations") -> list[tuple[str, dict]]:
    if not isinstance(convo, list) or not convo:
        raise DataFormatError(f"{where}: {key!r} must be a non-empty list of {{from, value}} messages")
    out = []
    for j, msg in enumerate(convo):
        ok = isinstance(msg, dict) and str(msg.get("from", "")).lower() in _ROLES and isinstance(msg.get("value"), str)
        if not ok:
            raise DataFormatError(f"{where}: message {j} must be {{\"from\": \"human\"|\"gpt\", \"value\": str}}")
        out.append((_ROLES[str(msg["from"]).lower()], msg))
    return out


# --------------------------------------------------------------------------------------------------
# readers


def read_pairs(path: Path, spec: DataSpec) -> list[Record]:
    """NExT-GPT T-X pair JSON (``cc3m.json`` / ``webvid.json`` / ``audiocap.json``)."""
    out: list[Record] = []
    for i, rec in enumerate(_load_json_list(path)):
        where = _row(path, i)
        if not isinstance(rec, dict):
            raise DataFormatError(f"{where}: expected an object")
        found = [m for m in Modality if f"{m.value}_name" in rec]
        if not found and spec.modality is None:
            raise DataFormatError(f"{where}: no image_name / audio_name / video_name field")
        m = found[0] if found else spec.modality
        caption = _need(rec, "caption", where).strip()
        name = rec.get(f"{m.value}_name")
        out.append(CaptionPair(MediaRef(m, _resolve(name, path, spec, m), caption), where))
    return out


def read_comprehension(path: Path, spec: DataSpec) -> list[Record]:
    """NExT-GPT ``*_comprehension.json``: the medium in the human turn, the caption as the answer."""
    out: list[Record] = []
    for i, rec in enumerate(_load_json_list(path)):
        where = _row(path, i)
        media = [MediaRef(m, _resolve(rec[f"input_{m.value}"], path, spec, m)) for m in Modality
                 if isinstance(rec, dict) and f"input_{m.value}" in rec]
        if not media:
            raise DataFormatError(f"{where}: no input_image / input_audio / input_video field")
        msgs = [Message(role, _split_placeholders(msg["value"], media if role == "user" else [], where))
                for role, msg in _messages(rec.get("conversations"), where)]
        out.append(Dialogue(tuple(msgs), where))
    return out


def read_generation(path: Path, spec: DataSpec) -> list[Record]:
    """NExT-GPT ``*_generation.json``: a request in the human turn, the medium in the gpt turn."""
    out: list[Record] = []
    for i, rec in enumerate(_load_json_list(path)):
        where = _row(path, i)
        found = [m for m in Modality if isinstance(rec, dict) and f"{m.value}_captions" in rec]
        if not found:
            raise DataFormatError(f"{where}: no image_captions / audio_captions / video_captions field")
        m = found[0]
        cap = rec[f"{m.value}_captions"]
        cap = cap[0] if isinstance(cap, list) and cap else cap
        if not isinstance(cap, str):
            raise DataFormatError(f"{where}: {m.value}_captions must be a string")
        emb = rec.get(f"{m.value}_caption_embeddings")
        emb = emb[0] if isinstance(emb, list) and emb else emb
        media = [MediaRef(m, _resolve(rec.get(f"output_{m.value}"), path, spec, m), cap.strip(),
                          _emb(emb if isinstance(emb, str) else None, path, spec, m))]
        msgs = [Message(role, _split_placeholders(msg["value"], media if role == "assistant" else [], where))
                for role, msg in _messages(rec.get("conversations"), where)]
        out.append(Dialogue(tuple(msgs), where))
    return out


def read_t2x(path: Path, spec: DataSpec) -> list[Record]:
    """NExT-GPT T-T+X instruction JSON: gpt turns with placeholders, captions per record or per turn."""
    out: list[Record] = []
    for i, rec in enumerate(_load_json_list(path)):
        where = _row(path, i)
        if not isinstance(rec, dict):
            raise DataFormatError(f"{where}: expected an object")
        pools: dict[Modality, list[MediaRef]] = {}
        for m in Modality:
            caps = rec.get(f"{m.value}_captions") or []
            embs = rec.get(f"{m.value}_caption_embeddings") or []
            caps = [caps] if isinstance(caps, str) else caps
            embs = [embs] if isinstance(embs, str) else embs
            pools[m] = [MediaRef(m, None, str(c).strip(), _emb(embs[k] if k < len(embs) else None, path, spec, m))
                        for k, c in enumerate(caps)]
        msgs = []
        for role, msg in _messages(rec.get("conversations"), where):
            media: list[MediaRef] = []
            if role == "assistant":
                for _match, m in _placeholders(msg["value"]):
                    if isinstance(msg.get("caption"), str) and str(msg.get("output_modality", m.value)) == m.value:
                        media.append(MediaRef(m, None, msg["caption"].strip(),
                                              pools[m][0].embedding_path if pools[m] else None))
                    elif pools[m]:
                        media.append(pools[m].pop(0))
            msgs.append(Message(role, _split_placeholders(msg["value"], media, where)))
        out.append(Dialogue(tuple(msgs), where))
    return out


def read_mosit(path: Path, spec: DataSpec) -> list[Record]:
    """MosIT records (``image_list`` / ``audio_list`` / ``video_list`` + ``conversation``)."""
    out: list[Record] = []
    for i, rec in enumerate(_load_json_list(path)):
        where = _row(path, i)
        if not isinstance(rec, dict):
            raise DataFormatError(f"{where}: expected an object")
        items: list[tuple[str, Modality, dict]] = []
        for m in Modality:
            lst = rec.get(f"{m.value}_list") or []
            if not isinstance(lst, list):
                raise DataFormatError(f"{where}: {m.value}_list must be a list")
            for k, it in enumerate(lst):
                if isinstance(it, str):
                    it = {"name": it}
                if not isinstance(it, dict):
                    raise DataFormatError(f"{where}: {m.value}_list[{k}] must be an object or a file name")
                name = it.get("name") or it.get(f"{m.value}_name") or it.get("path")
                if not isinstance(name, str) or not name:
                    raise DataFormatError(f"{where}: {m.value}_list[{k}] has no name")
                items.append((name, m, it))
        convo_key = "conversation" if "conversation" in rec else "conversations"
        msgs = []
        for role, msg in _messages(rec.get(convo_key), where, convo_key):
            text = msg["value"]
            hits = []
            for name, m, it in items:
                for match in re.finditer(re.escape(name), text):
                    hits.append((match.start(), match.end(), name, m, it))
            hits.sort(key=lambda h: (h[0], -h[1]))
            parts: list[str | MediaRef] = []
            cursor = 0
            for start, end, name, m, it in hits:
                if start < cursor:
                    continue
                tag = m.spec.tag
                before = text[cursor:start]
                after_end = end
                # drop <Image> ... </Image> tags around the name
                tb = re.search(rf"<\s*{tag}\s*>\s*$", before, re.IGNORECASE)
                if tb:
                    before = before[:tb.start()]
                ta = re.match(rf"\s*<\s*/\s*{tag}\s*>", text[end:], re.IGNORECASE)
                if ta:
                    after_end = end + ta.end()
                if before.strip():
                    parts.append(before.strip())
                cap = it.get("caption") if isinstance(it.get("caption"), str) else None
                emb = it.get("caption_embedding") or it.get("embedding")
                parts.append(MediaRef(m, _resolve(name, path, spec, m), cap.strip() if cap else None,
                                      _emb(emb if isinstance(emb, str) else None, path, spec, m)))
                cursor = after_end
            if text[cursor:].strip():
                parts.append(text[cursor:].strip())
            msgs.append(Message(role, tuple(parts)))
        system = rec.get("system")
        if system is not None and not isinstance(system, str):
            raise DataFormatError(f"{where}: system must be a string")
        out.append(Dialogue(tuple(msgs), where, system))
    return out


def read_jsonl(path: Path, spec: DataSpec) -> list[Record]:
    """One ``{"path"?, "caption", "modality"?}`` per line; ``path`` relative to the file."""
    out: list[Record] = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise DataFormatError(f"cannot read {path}: {e}") from e
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        where = f"{path} line {i + 1}"
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataFormatError(f"{where}: not valid JSON: {e}") from e
        if not isinstance(rec, dict):
            raise DataFormatError(f"{where}: expected an object")
        caption = _need(rec, "caption", where).strip()
        if "modality" in rec:
            try:
                m = Modality.parse(rec["modality"])
            except ValueError as e:
                raise DataFormatError(f"{where}: {e}") from None
        elif spec.modality is not None:
            m = spec.modality
        else:
            raise DataFormatError(f"{where}: no 'modality' field and no modality given for {path}")
        p = rec.get("path")
        media_path = None
        if isinstance(p, str) and p:
            root = Path(spec.media_root) if spec.media_root else path.parent
            media_path = Path(p) if Path(p).is_absolute() else root / p
        emb = rec.get("embedding")
        emb_path = _emb(emb if isinstance(emb, str) else None, path, spec, m)
        out.append(CaptionPair(MediaRef(m, media_path, caption, emb_path), where))
    return out


def read_captions(path: Path, spec: DataSpec) -> list[Record]:
    """A caption per line (``.txt``) or a CSV with a ``caption`` column (AudioCaps)."""
    if spec.modality is None:
        raise DataFormatError(f"{path}: a caption list needs a modality (--modality image|audio|video)")
    out: list[Record] = []
    try:
        if path.suffix.lower() == ".csv":
            with path.open(newline="", encoding="utf-8") as f:
                reader = csv.DictReader(f)
                if "caption" not in (reader.fieldnames or []):
                    raise DataFormatError(f"{path}: CSV has no 'caption' column (columns: {reader.fieldnames})")
                rows = [(f"{path} row {i}", (r.get("caption") or "").strip()) for i, r in enumerate(reader)]
        else:
            lines = path.read_text(encoding="utf-8").splitlines()
            rows = [(f"{path} line {i + 1}", line.strip()) for i, line in enumerate(lines)]
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise DataFormatError(f"cannot read {path}: {e}") from e
    seen = set()
    for where, cap in rows:
        if cap and cap not in seen:
            seen.add(cap)
            out.append(CaptionPair(MediaRef(spec.modality, None, cap), where))
    return out


_BOX_FORMATS = ("xyxy", "xywh")


def _rows(path: Path) -> list[tuple[str, object]]:
    """(where, record) of a JSONL file (one object per line) or a JSON list."""
    if path.suffix.lower() != ".jsonl":
        return [(_row(path, i), rec) for i, rec in enumerate(_load_json_list(path))]
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise DataFormatError(f"cannot read {path}: {e}") from e
    out = []
    for i, line in enumerate(lines):
        if line.strip():
            try:
                out.append((f"{path} line {i + 1}", json.loads(line)))
            except json.JSONDecodeError as e:
                raise DataFormatError(f"{path} line {i + 1}: not valid JSON: {e}") from e
    return out


def _first_jsonl_record(path: Path) -> object:
    """The first record of a JSONL file (``None`` if unreadable: its reader reports the problem)."""
    try:
        with path.open(encoding="utf-8") as f:
            for line in f:
                if line.strip():
                    return json.loads(line)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return None


def read_grounding(path: Path, spec: DataSpec) -> list[Record]:
    """RefCOCO-style grounding rows -> instruct dialogues.

    A row: ``{"image": path, "phrase": "the red square", "box": [x1, y1, x2, y2] (or a list of boxes),
    "box_format": "xyxy" | "xywh", "task"?: "grounding", "question"?: "where is {phrase}?", "width"?,
    "height"?}``. Boxes are in pixels of the image; ``box_format`` is required (``xywh`` is COCO's
    [x, y, width, height], RefCOCO's native form). The image size comes from ``width``/``height`` or from the
    file's header. The dialogue: user ``[image, TaskRef(task), question]``, assistant
    ``[GroundedSpan(phrase, boxes)]`` (the preset's tokens, e.g. ``<p>the red square</p><loc_a><loc_b>``).

    Raises:
        DataFormatError: a missing field, an unknown box format, a box outside its image (names the row).
        MissingMediaError: the image file is missing and no size is given.
    """
    out: list[Record] = []
    for where, rec in _rows(path):
        if not isinstance(rec, dict):
            raise DataFormatError(f"{where}: expected an object")
        image = _resolve(_need(rec, "image", where), path, spec, IMAGE)
        phrase = _need(rec, "phrase", where).strip()
        if not phrase:
            raise DataFormatError(f"{where}: empty phrase")
        fmt = rec.get("box_format")
        if fmt not in _BOX_FORMATS:
            raise DataFormatError(f"{where}: box_format must be one of {', '.join(_BOX_FORMATS)} (pixels; xywh is "
                                  f"COCO's [x, y, width, height]), got {fmt!r}")
        box = _need(rec, "box", where, (list,))
        boxes = box if box and all(isinstance(b, list) for b in box) else [box]
        if "width" in rec or "height" in rec:
            w, h = _need(rec, "width", where, (int,)), _need(rec, "height", where, (int,))
        else:
            if image is None or not image.is_file():
                raise MissingMediaError(f"{where}: image file not found: {image}")
            from PIL import Image, UnidentifiedImageError

            try:
                with Image.open(image) as im:
                    w, h = im.size
            except (OSError, UnidentifiedImageError) as e:
                raise DataFormatError(f"{where}: cannot read the image {image}: {e}") from e
        xyxy = []
        for b in boxes:
            if len(b) != 4 or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in b):
                raise DataFormatError(f"{where}: a box is 4 numbers, got {b!r}")
            x1, y1, a, c = (float(v) for v in b)
            x2, y2 = (x1 + a, y1 + c) if fmt == "xywh" else (a, c)
            if not (0 <= x1 <= x2 <= w and 0 <= y1 <= y2 <= h):
                raise DataFormatError(f"{where}: box {b} ({fmt}) is not inside the {w}x{h} image")
            xyxy.append((x1, y1, x2, y2))
        task = rec.get("task", "grounding")
        question = rec.get("question", "where is {phrase}?")
        if not isinstance(task, str) or not isinstance(question, str):
            raise DataFormatError(f"{where}: task and question must be strings")
        user = (MediaRef(IMAGE, image), TaskRef(task), question.replace("{phrase}", phrase))
        answer = (GroundedSpan(phrase, tuple(xyxy), (int(w), int(h))),)
        out.append(Dialogue((Message("user", user), Message("assistant", answer)), where))
    return out


def read_builtin(path: Path, spec: DataSpec) -> list[Record]:
    """The shipped caption list (:data:`training.align.captions.BUILTIN_CAPTIONS`)."""
    from training.align.captions import BUILTIN_CAPTIONS

    mods = [spec.modality] if spec.modality else list(BUILTIN_CAPTIONS)
    return [CaptionPair(MediaRef(m, None, c), f"builtin {m.value} caption {i}")
            for m in mods for i, c in enumerate(BUILTIN_CAPTIONS[m])]


READERS: dict[str, Callable[[Path, DataSpec], list[Record]]] = {
    "pairs": read_pairs,
    "cc3m": read_pairs,
    "webvid": read_pairs,
    "audiocap": read_pairs,
    "comprehension": read_comprehension,
    "generation": read_generation,
    "t2x": read_t2x,
    "mosit": read_mosit,
    "jsonl": read_jsonl,
    "captions": read_captions,
    "builtin": read_builtin,
    "grounding": read_grounding,
}
_FORMAT_MODALITY = {"cc3m": IMAGE, "webvid": VIDEO, "audiocap": AUDIO}


def detect_format(path: Path) -> str:
    """Pick a reader from the suffix and the first record's fields.

    Raises:
        DataFormatError: a JSON whose first record matches no format (lists the formats).
    """
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        first = _first_jsonl_record(path)
        return "grounding" if isinstance(first, dict) and {"phrase", "box"} <= set(first) else "jsonl"
    if suffix in (".csv", ".txt"):
        return "captions"
    body = _load_json_list(path)
    first = body[0] if body else {}
    if not isinstance(first, dict):
        raise DataFormatError(f"{path}: records must be JSON objects")
    keys = set(first)
    if {"phrase", "box"} <= keys:
        return "grounding"
    if keys & {f"{m.value}_list" for m in Modality}:
        return "mosit"
    if keys & {f"input_{m.value}" for m in Modality}:
        return "comprehension"
    if keys & {f"output_{m.value}" for m in Modality}:
        return "generation"
    if keys & {f"{m.value}_captions" for m in Modality} and ("conversations" in keys):
        caps = next(first[f"{m.value}_captions"] for m in Modality if f"{m.value}_captions" in first)
        return "t2x" if isinstance(caps, list) else "generation"
    if "caption" in keys and keys & {f"{m.value}_name" for m in Modality}:
        return "pairs"
    if "conversation" in keys:
        return "mosit"
    raise DataFormatError(f"{path}: cannot tell its format from fields {sorted(keys)}; pass a format "
                          f"({', '.join(READERS)})")


def read_records(spec: DataSpec) -> list[Record]:
    """Read one data source.

    Raises:
        ValueError: an unknown format (lists the choices).
        DataFormatError: a missing file or a malformed row (names it).
    """
    fmt = spec.format
    if fmt not in READERS and fmt != "auto":
        raise ValueError(f"unknown data format {fmt!r}; choose from: auto, {', '.join(READERS)}")
    if spec.path == "builtin" or fmt == "builtin":
        return read_builtin(Path("builtin"), spec)
    path = Path(spec.path)
    if not path.is_file():
        raise DataFormatError(f"data file not found: {path}")
    if fmt == "auto":
        fmt = detect_format(path)
    if fmt in _FORMAT_MODALITY and spec.modality is None:
        spec = DataSpec(spec.path, fmt, _FORMAT_MODALITY[fmt], spec.media_root)
    return READERS[fmt](path, spec)


def read_all(specs: Iterable[DataSpec]) -> list[Record]:
    out: list[Record] = []
    for spec in specs:
        out.extend(read_records(spec))
    return out


def check_media(records: Iterable[Record], *, inputs: bool, outputs: bool) -> None:
    """Check that the files of the media a stage reads exist.

    Args:
        inputs: media read by an encoder (pairs in the encode stage, user-turn media).
        outputs: output media read by the noise-prediction loss.
    Raises:
        MissingMediaError: naming the row and the path (the first missing one, and how many more).
    """
    missing: list[str] = []
    for rec in records:
        refs: list[MediaRef]
        if isinstance(rec, CaptionPair):
            refs = [rec.media] if (inputs or outputs) else []
        else:
            refs = (rec.media("user") if inputs else []) + (rec.media("assistant") if outputs else [])
        for ref in refs:
            if ref.path is None:
                missing.append(f"{rec.source}: its {ref.modality.value} has no file")
            elif not ref.path.is_file():
                missing.append(f"{rec.source}: {ref.modality.value} file not found: {ref.path}")
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise MissingMediaError(missing[0] + more)


def parse_data_arg(value: str, *, modality: Modality | None = None, media_root: str | None = None,
                   default_format: str = "auto") -> DataSpec:
    """``PATH`` or ``FORMAT:PATH`` (e.g. ``cc3m:data/cc3m/cc3m.json``, ``builtin``, ``builtin:audio``).

    Raises:
        ValueError: an unknown format prefix.
    """
    fmt, path = default_format, value
    head, sep, tail = value.partition(":")
    if sep and head in READERS and len(head) > 1:
        fmt, path = head, tail
    if value == "builtin":
        fmt, path = "builtin", "builtin"
    elif fmt == "builtin":
        modality = Modality.parse(path) if path else modality
        path = "builtin"
    return DataSpec(path=path, format=fmt, modality=modality, media_root=media_root)
