"""Response building: the shape of every answer, in one place.

- :meth:`Responses.completion_body`: a ``chat.completion``: ``content`` (a string: the text with a markdown
  reference per medium, see :mod:`~services.ingress.content`), the media arrays (``images``, ``audios``,
  ``videos``), OpenAI's ``audio`` slot, the ordered ``parts`` (the one placement rule,
  :func:`polymodal.types.interleave`), ``boxes``, usage.
- :class:`StreamChunks`: the ``chat.completion.chunk`` SSE frames of a streamed answer, in order.
- :meth:`Responses.array_item` / :meth:`~Responses.media_part` / :meth:`~Responses.audio_message`: how one stored
  medium appears (data URL or artifact URL).
- :meth:`Responses.generation_body`: the images / audio endpoints' ``data`` list.

What the answer looks like is decided here and nowhere else (the routes and the SSE driver only pass what was
produced; the per-modality names are each modality's spec), so a change of the
answer's shape is a change of this module.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import time
from typing import Any

from polymodal import media_io
from polymodal.config import PresetConfig
from polymodal.modality import Modality
from polymodal.types import LLMResult, interleave

from services.errors import APIError
from services.ingress.content import ContentStream, compose
from services.ingress.media_refs import artifact_url, markdown_ref
from services.ingress.planning import ChatPlan
from services.ingress.running import ChatOutcome, Reserved, Stored
from services.metrics import APIMetrics
from services.settings import ServerSettings
from services.store import Artifact, FileStore

FINISH = {"stop": "stop", "length": "length"}
"""The LLM's finish reasons OpenAI knows; any other (``signal_loop``) is reported as ``stop``."""
DONE = b"data: [DONE]\n\n"


def sse_event(body: dict[str, Any], *, compact: bool = True) -> bytes:
    """One server-sent event ``data: <json>``."""
    text = json.dumps(body, separators=(",", ":")) if compact else json.dumps(body)
    return b"data: " + text.encode() + b"\n\n"


class Responses:
    """Builds response bodies.

    Args:
        preset: the served preset (its name in ``system_fingerprint``; ``grounding`` adds ``message.boxes``).
        settings: ``artifact_ttl_s``.
        store: the artifact store (media are stored by the runner; bodies only name them).
        metrics: ``media{modality}`` counts every generated medium returned.
        model_name: the ``model`` of every body.
    """

    def __init__(self, preset: PresetConfig, settings: ServerSettings, store: FileStore, metrics: APIMetrics,
                 model_name: str):
        self.preset = preset
        self.settings = settings
        self.store = store
        self.metrics = metrics
        self.model_name = model_name

    # ---- one medium ------------------------------------------------------------------------------
    @staticmethod
    def url(s: Stored, fmt: str, base_url: str) -> str:
        """The medium as a data URL (``inline``) or its artifact URL (``url``)."""
        if fmt == "url":
            return artifact_url(base_url, s.artifact.id, s.artifact.ext)
        return media_io.encode_data_url(s.medium.data, s.medium.mime_type)

    @staticmethod
    def reference(modality: Modality, number: int, art: Artifact, base_url: str) -> str:
        """Its markdown reference in ``content`` (always the artifact URL)."""
        return markdown_ref(modality, number, artifact_url(base_url, art.id, art.ext))

    @staticmethod
    def array_item(modality: Modality, url: str, number: int) -> dict[str, Any]:
        """An item of ``images`` / ``audios`` / ``videos``: ``{"type": "image_url", "image_url": {"url"},
        "index"}`` (``index``: its place in that array, ``number - 1``)."""
        key = modality.spec.content_part
        return {"type": key, key: {"url": url}, "index": number - 1}

    @staticmethod
    def media_part(s: Stored, base_url: str) -> dict[str, Any]:
        """A medium of ``parts``: ``{"type": "image_url", "image_url": {"url": artifact URL}, "artifact_id",
        "mime_type", "seed", "index", "text_offset"[, "duration_s"]}``."""
        m, key = s.medium, s.medium.modality.spec.content_part
        part = {"type": key, key: {"url": artifact_url(base_url, s.artifact.id, s.artifact.ext)},
                "artifact_id": s.artifact.id, "mime_type": m.mime_type, "seed": m.seed, "index": m.index,
                "text_offset": m.text_offset}
        if m.duration_s is not None:
            part["duration_s"] = m.duration_s
        return part

    @staticmethod
    def audio_message(s: Stored, transcript: str) -> dict[str, Any]:
        """OpenAI's ``message.audio`` / ``delta.audio``: {id (the artifact id), data (base64), format, expires_at,
        transcript}."""
        return {"id": s.artifact.id, "data": base64.b64encode(s.medium.data).decode("ascii"), "format": s.medium.ext,
                "expires_at": s.artifact.expires_at, "transcript": transcript}

    @staticmethod
    def boxes_json(result: LLMResult) -> list[dict[str, Any]]:
        """``message.boxes``: phrase, box (pixels of the sent image, 2 decimals), image_index, text_span."""
        return [{"phrase": b.phrase, "box": [round(float(v), 2) for v in b.box_px], "image_index": b.image_index,
                 "text_span": list(b.text_span) if b.text_span is not None else None} for b in result.boxes]

    @staticmethod
    def usage(r: LLMResult) -> dict[str, int]:
        return {"prompt_tokens": r.prompt_tokens, "completion_tokens": r.completion_tokens,
                "total_tokens": r.prompt_tokens + r.completion_tokens}

    @property
    def fingerprint(self) -> str:
        return f"polymodal-{self.preset.name}"

    # ---- chat ------------------------------------------------------------------------------------
    def completion_body(self, plan: ChatPlan, out: ChatOutcome, base_url: str) -> dict[str, Any]:
        """The ``chat.completion`` object of a whole answer (see the contract, "The answer's shape")."""
        r, text = out.result, out.text
        media = sorted(out.media, key=lambda s: s.medium.index)
        counts: dict[Modality, int] = {}
        numbered: list[tuple[Stored, int]] = []
        for s in media:
            counts[s.medium.modality] = counts.get(s.medium.modality, 0) + 1
            numbered.append((s, counts[s.medium.modality]))
            self.metrics.media.labels(s.medium.modality.value).inc()
        refs = [(s.medium.text_offset, self.reference(s.medium.modality, n, s.artifact, base_url)) for s, n in numbered]
        arrays: dict[Modality, list[dict[str, Any]]] = {}
        for s, n in numbered:
            arrays.setdefault(s.medium.modality, []).append(
                self.array_item(s.medium.modality, self.url(s, plan.media_format, base_url), n))
        placed = [s.medium for s in media]
        media_parts = [self.media_part(s, base_url) for s in media]
        if out.overlay is not None:
            ov, k = out.overlay
            n = counts.get(Modality.IMAGE, 0) + 1
            refs.append((len(text), self.reference(Modality.IMAGE, n, ov.artifact, base_url)))
            arrays.setdefault(Modality.IMAGE, []).append(
                {**self.array_item(Modality.IMAGE, self.url(ov, plan.media_format, base_url), n), "overlay": True})
            placed.append(dataclasses.replace(ov.medium, index=len(media), text_offset=len(text)))
            part = {**self.media_part(ov, base_url), "index": len(media), "text_offset": len(text), "overlay": True,
                    "image_index": k}
            part.pop("seed")
            media_parts.append(part)
        message: dict[str, Any] = {"role": "assistant", "content": compose(text, refs)}
        for modality in Modality:  # registration order: images, audios, videos, then any plug-in
            if modality in arrays:
                message[modality.spec.answer_field] = arrays[modality]
        for s in media:  # OpenAI's slot (message.audio): the first medium of a modality that has one
            slot = s.medium.modality.spec.message_slot
            if slot is not None and slot not in message:
                message[slot] = self.audio_message(s, text)
        message["parts"] = interleave(text, placed, media_parts, text_part=lambda t: {"type": "text", "text": t})
        if self.preset.grounding is not None:
            message["boxes"] = self.boxes_json(r)
        return {
            "id": plan.request_id,
            "object": "chat.completion",
            "created": int(time.time()),
            "model": self.model_name,
            "system_fingerprint": self.fingerprint,
            "seed": plan.base_seed,
            "choices": [{"index": 0, "message": message, "finish_reason": FINISH.get(r.finish_reason, "stop"),
                         "logprobs": None}],
            "usage": self.usage(r),
        }

    def chunk(self, plan: ChatPlan, created: int, delta: dict | None, finish: str | None = None,
              usage: dict | None = None) -> bytes:
        """One ``chat.completion.chunk`` SSE frame (``delta=None``: no choices, e.g. the usage chunk)."""
        body: dict[str, Any] = {"id": plan.request_id, "object": "chat.completion.chunk", "created": created,
                                "model": self.model_name, "system_fingerprint": self.fingerprint,
                                "choices": [] if delta is None else
                                [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}]}
        if usage is not None:
            body["usage"] = usage
        return sse_event(body)

    # ---- one-medium endpoints --------------------------------------------------------------------
    def generation_body(self, request_id: str, modality: Modality, revised_prompt: str, media: list[Stored],
                        fmt: str, base_url: str) -> dict[str, Any]:
        """The images / audio endpoints' answer: ``{"created", "id", "model", "data": [...]}``, one item per
        medium (``b64_json``, or ``url`` and ``expires_at``; with ``revised_prompt``, ``seed``, ``mime_type``[,
        ``duration_s``])."""
        data = []
        for s in media:
            m = s.medium
            item: dict[str, Any] = {"revised_prompt": revised_prompt, "seed": m.seed, "mime_type": m.mime_type}
            if fmt == "url":
                item.update(url=self.url(s, "url", base_url), expires_at=s.artifact.expires_at)
            else:
                item["b64_json"] = base64.b64encode(m.data).decode("ascii")
            if m.duration_s is not None:
                item["duration_s"] = m.duration_s
            self.metrics.media.labels(modality.value).inc()
            data.append(item)
        return {"created": int(time.time()), "id": request_id, "model": self.model_name, "data": data}


class StreamChunks:
    """The SSE frames of one streamed answer, in the order of the contract ("Streaming"); keeps what later frames
    need: the content written so far (:class:`~services.ingress.content.ContentStream`), each medium's number, the
    text so far for ``delta.audio``'s transcript, whether the first audio was sent.

    Each method returns the frames to send now (maybe none).

    Args:
        responses: the body builder.
        plan: the running plan (id, media format, ``include_usage``).
        base_url: base of artifact URLs.
    """

    def __init__(self, responses: Responses, plan: ChatPlan, base_url: str):
        self.r, self.plan, self.base_url = responses, plan, base_url
        self.created = int(time.time())
        self.content = ContentStream()
        self._text: list[str] = []
        self._slots_filled: set[str] = set()
        self._counts: dict[Modality, int] = {}
        self._numbers: dict[str, int] = {}

    def _content(self, piece: str) -> list[bytes]:
        return [self.r.chunk(self.plan, self.created, {"content": piece})] if piece else []

    def opening(self) -> bytes:
        """``delta: {"role": "assistant", "content": ""}``."""
        return self.r.chunk(self.plan, self.created, {"role": "assistant", "content": ""})

    def text(self, value: str) -> list[bytes]:
        self._text.append(value)
        return self._content(self.content.text(value))

    def _number(self, modality: Modality, art: Artifact) -> int:
        self._counts[modality] = n = self._counts.get(modality, 0) + 1
        self._numbers[art.id] = n
        return n

    def reserved(self, r: Reserved) -> list[bytes]:
        """A signal group closed: its reference (pending artifact URL) goes into the content where it belongs."""
        frames = []
        for art in r.artifacts:
            n = self._number(r.group.modality, art)
            md = self.r.reference(r.group.modality, n, art, self.base_url)
            frames += self._content(self.content.reference(r.group.text_offset, md))
        return frames

    def medium(self, s: Stored) -> list[bytes]:
        """``delta: {"images": [item]}`` (``audios``, ``videos``; the first audio also ``delta.audio``)."""
        m = s.medium
        self.r.metrics.media.labels(m.modality.value).inc()
        item = self.r.array_item(m.modality, self.r.url(s, self.plan.media_format, self.base_url),
                                 self._numbers[s.artifact.id])
        delta: dict[str, Any] = {m.modality.spec.answer_field: [item]}
        slot = m.modality.spec.message_slot
        if slot is not None and slot not in self._slots_filled:  # OpenAI's slot: the first audio, delta.audio
            self._slots_filled.add(slot)
            delta[slot] = self.r.audio_message(s, "".join(self._text))
        return [self.r.chunk(self.plan, self.created, delta)]

    def overlay(self, overlay: tuple[Stored, int], result: LLMResult) -> list[bytes]:
        """The ``box_overlay`` image: its reference at the end of the text, then ``delta.images``."""
        s, _ = overlay
        n = self._number(Modality.IMAGE, s.artifact)
        frames = self._content(self.content.reference(len(result.text), self.r.reference(Modality.IMAGE, n, s.artifact,
                                                                                          self.base_url)))
        item = self.r.array_item(Modality.IMAGE, self.r.url(s, self.plan.media_format, self.base_url), n)
        return [*frames, self.r.chunk(self.plan, self.created,
                                        {Modality.IMAGE.spec.answer_field: [{**item, "overlay": True}]})]

    def finish(self, result: LLMResult) -> list[bytes]:
        """References still waiting, the closing ``delta`` with ``finish_reason`` (``boxes`` for a grounding model),
        then the usage chunk when the request asked for it."""
        out = self._content(self.content.finish())
        last = {"boxes": self.r.boxes_json(result)} if self.r.preset.grounding is not None else {}
        out.append(self.r.chunk(self.plan, self.created, last, FINISH.get(result.finish_reason, "stop")))
        if self.plan.include_usage:
            out.append(self.r.chunk(self.plan, self.created, None, usage=self.r.usage(result)))
        return out

    @staticmethod
    def error(err: APIError) -> bytes:
        """A failure after the stream started: ``data: {"error": {...}}`` (then the stream ends)."""
        return sse_event(err.body(), compact=False)

    @staticmethod
    def done() -> bytes:
        return DONE
