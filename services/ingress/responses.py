"""Response building: the shape of every answer, in one place.

- :meth:`Responses.completion_body`: a ``chat.completion`` (text, media parts in output order, ``message.audio``,
  the overlay, ``message.boxes``, usage).
- :class:`StreamChunks`: the ``chat.completion.chunk`` SSE frames of a streamed answer, in order.
- :meth:`Responses.medium_part` / :meth:`medium_ref` / :meth:`audio_message`: how one rendered medium appears
  (data URL or stored artifact URL).
- :meth:`Responses.generation_body`: the images / audio endpoints' ``data`` list.

What the answer looks like is decided here and nowhere else (the routes and the SSE driver only pass what was
produced), so a change of the answer's shape is a change of this module.
"""

from __future__ import annotations

import base64
import json
import time
import uuid
from typing import Any

from polymodal import media_io
from polymodal.config import PresetConfig
from polymodal.modality import Modality
from polymodal.types import LLMResult, interleave

from services.errors import APIError
from services.ingress.planning import ChatPlan
from services.ingress.running import ChatOutcome
from services.metrics import APIMetrics
from services.protocol import EncodedMedium
from services.settings import ServerSettings
from services.store import FileStore

FINISH = {"stop": "stop", "length": "length"}
"""The LLM's finish reasons OpenAI knows; any other (``signal_loop``) is reported as ``stop``."""
DONE = b"data: [DONE]\n\n"


def _text_part(text: str) -> dict[str, str]:
    return {"type": "text", "text": text}


def sse_event(body: dict[str, Any], *, compact: bool = True) -> bytes:
    """One server-sent event ``data: <json>``."""
    text = json.dumps(body, separators=(",", ":")) if compact else json.dumps(body)
    return b"data: " + text.encode() + b"\n\n"


class Responses:
    """Builds response bodies.

    Args:
        preset: the served preset (its name in ``system_fingerprint``; ``grounding`` adds ``message.boxes``).
        settings: ``artifact_ttl_s``.
        store: where ``url``-format media are stored.
        metrics: ``media{modality}`` counts every medium returned.
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
    def medium_ref(self, m: EncodedMedium, fmt: str, base_url: str) -> dict[str, Any]:
        """``{"url": data URL or artifact URL, ["expires_at"]}``."""
        if fmt == "url":
            art = self.store.put(m.data, m.mime_type, m.ext, self.settings.artifact_ttl_s)
            return {"url": f"{base_url}/v1/artifacts/{art.id}.{m.ext}", "expires_at": art.expires_at}
        return {"url": media_io.encode_data_url(m.data, m.mime_type)}

    def medium_part(self, m: EncodedMedium, fmt: str, base_url: str) -> dict[str, Any]:
        """A content part ``{"type": "image_url", "image_url": {...}, "mime_type", "seed", "index"[,
        "duration_s"]}``."""
        key = m.modality.spec.content_part
        self.metrics.media.labels(m.modality.value).inc()
        part = {"type": key, key: self.medium_ref(m, fmt, base_url), "mime_type": m.mime_type, "seed": m.seed,
                "index": m.index}
        if m.duration_s is not None:
            part["duration_s"] = m.duration_s
        return part

    def audio_message(self, m: EncodedMedium, transcript: str) -> dict[str, Any]:
        """OpenAI's ``message.audio`` / ``delta.audio``: {id, data (base64), format, expires_at, transcript}."""
        return {"id": f"audio_{uuid.uuid4().hex}", "data": base64.b64encode(m.data).decode("ascii"),
                "format": m.ext, "expires_at": int(time.time()) + self.settings.artifact_ttl_s,
                "transcript": transcript}

    def overlay_part(self, overlay: tuple[EncodedMedium, int], index: int, fmt: str, base_url: str) -> dict[str, Any]:
        m, k = overlay
        return {"type": "image_url", "image_url": self.medium_ref(m, fmt, base_url), "mime_type": m.mime_type,
                "index": index, "overlay": True, "image_index": k}

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
        """The ``chat.completion`` object of a whole answer."""
        r = out.result
        message: dict[str, Any] = {"role": "assistant", "content": out.text}
        if out.media:
            parts = [self.medium_part(m, plan.media_format, base_url) for m in out.media]
            message["content"] = interleave(out.text, out.media, parts, text_part=_text_part)
            for m in sorted(out.media, key=lambda m: m.index):  # OpenAI's message.audio: the first audio
                slot = m.modality.spec.message_slot
                if slot is not None and slot not in message:
                    message[slot] = self.audio_message(m, out.text)
        if out.overlay is not None:
            content = message["content"]
            if isinstance(content, str):
                content = [_text_part(content.strip())] if content.strip() else []
            message["content"] = [*content, self.overlay_part(out.overlay, len(out.media), plan.media_format,
                                                              base_url)]
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
    def generation_body(self, request_id: str, modality: Modality, revised_prompt: str, media: list[EncodedMedium],
                        fmt: str, base_url: str) -> dict[str, Any]:
        """The images / audio endpoints' answer: ``{"created", "id", "model", "data": [...]}``, one item per
        medium (``b64_json`` or ``url``, with ``revised_prompt``, ``seed``, ``mime_type``[, ``duration_s``])."""
        data = []
        for m in media:
            item: dict[str, Any] = {"revised_prompt": revised_prompt, "seed": m.seed, "mime_type": m.mime_type}
            if fmt == "url":
                item.update(self.medium_ref(m, "url", base_url))
            else:
                item["b64_json"] = base64.b64encode(m.data).decode("ascii")
            if m.duration_s is not None:
                item["duration_s"] = m.duration_s
            self.metrics.media.labels(modality.value).inc()
            data.append(item)
        return {"created": int(time.time()), "id": request_id, "model": self.model_name, "data": data}


class StreamChunks:
    """The SSE frames of one streamed answer, in the order of the contract ("Streaming"); keeps what later frames
    need (the text so far for ``delta.audio``'s transcript, whether the first audio was sent, the media count).

    Args:
        responses: the body builder.
        plan: the running plan (id, media format, ``box_overlay``, ``include_usage``).
        base_url: base of artifact URLs.
    """

    def __init__(self, responses: Responses, plan: ChatPlan, base_url: str):
        self.r, self.plan, self.base_url = responses, plan, base_url
        self.created = int(time.time())
        self._text: list[str] = []
        self._slots_filled: set[str] = set()
        self._n_media = 0

    def opening(self) -> bytes:
        """``delta: {"role": "assistant", "content": ""}``."""
        return self.r.chunk(self.plan, self.created, {"role": "assistant", "content": ""})

    def text(self, value: str) -> bytes:
        self._text.append(value)
        return self.r.chunk(self.plan, self.created, {"content": value})

    def medium(self, m: EncodedMedium) -> bytes:
        """``delta: {"media": <part + text_offset>}`` (the first audio also ``delta.audio``)."""
        self._n_media += 1
        part = self.r.medium_part(m, self.plan.media_format, self.base_url)
        part["text_offset"] = m.text_offset
        delta: dict[str, Any] = {"media": part}
        slot = m.modality.spec.message_slot
        if slot is not None and slot not in self._slots_filled:  # the first audio also as delta.audio
            self._slots_filled.add(slot)
            delta[slot] = self.r.audio_message(m, "".join(self._text))
        return self.r.chunk(self.plan, self.created, delta)

    def overlay(self, overlay: tuple[EncodedMedium, int], result: LLMResult) -> bytes:
        """The ``box_overlay`` image as a ``delta.media`` frame, placed at the end of the text."""
        part = self.r.overlay_part(overlay, self._n_media, self.plan.media_format, self.base_url)
        part["text_offset"] = len(result.text)
        return self.r.chunk(self.plan, self.created, {"media": part})

    def finish(self, result: LLMResult) -> list[bytes]:
        """The closing ``delta`` with ``finish_reason`` (``boxes`` for a grounding model), then the usage chunk
        when the request asked for it."""
        last = {"boxes": self.r.boxes_json(result)} if self.r.preset.grounding is not None else {}
        out = [self.r.chunk(self.plan, self.created, last, FINISH.get(result.finish_reason, "stop"))]
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
