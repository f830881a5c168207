"""Response building: the shape of every answer, in one place.

- :meth:`Responses.completion_body`: a ``chat.completion``: ``content`` (a string: the text with a markdown
  reference per medium, see :mod:`~services.ingress.content`), the media arrays (``images``, ``audios``,
  ``videos``), OpenAI's ``audio`` slot, the ordered ``parts`` (the one placement rule,
  :func:`polymodal.types.interleave`), ``boxes``, usage.
- :class:`StreamChunks`: the ``chat.completion.chunk`` SSE frames of a streamed answer, in order.
- :meth:`Responses.array_item` / :meth:`~Responses.media_part` / :meth:`~Responses.audio_message`: how one stored
  medium appears (data URL or artifact URL).
- :meth:`Responses.generation_body`: the images / audio endpoints' ``data`` list.
- Output formats (issue #22): with a JSON ``response_format`` ``content`` is the JSON alone (media only in the
  arrays and ``parts``); ``message.tool_calls`` / streamed ``delta.tool_calls``; ``choices[].logprobs``.
- Skills (issue #23; a request with ``skills``): ``message.skill_calls`` ``[{"id", "type": "skill", "name",
  "arguments", "round", "deployment", "result": {"text", "boxes", "masks", "media", "data", "error", "error_code",
  "elapsed_s"}}]`` (streamed as ``delta.skill_calls``, one chunk per call as it finishes); the skills' boxes join
  ``message.boxes`` (``{"phrase", "box", "image_index", "text_span": null, "skill"}``), their masks are
  ``message.masks`` (``{"label", "image_index", "bbox_px", "area_px", "score", "rle": {"size", "counts"}, "skill"}``,
  COCO uncompressed RLE), their media are media of the answer (referenced in ``content`` where the call was made,
  in the arrays and ``parts``).

What the answer looks like is decided here and nowhere else (the routes and the SSE driver only pass what was
produced; the per-modality names are each modality's spec), so a change of the answer's shape is one of this module.
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
from polymodal.types import LLMResult, LogprobEntry, ToolCall, interleave

from services.errors import APIError
from services.ingress.content import ContentStream, compose
from services.ingress.media_refs import artifact_url, markdown_ref
from services.ingress.payloads import Piece, Splicer
from services.ingress.planning import ChatPlan
from services.ingress.audio_formats import encode_chunks
from services.ingress.running import ChatOutcome, Reserved, SpokenAudio, Stored
from services.ingress.skill_loop import ShownText, SkillCall
from services.ingress.spoken_input import transcripts_json
from services.metrics import APIMetrics
from services.protocol import SpeechAudioChunk
from services.settings import ServerSettings
from services.store import Artifact, FileStore

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
        self.preset, self.settings, self.store, self.metrics = preset, settings, store, metrics
        self.model_name = model_name

    # ---- one medium ------------------------------------------------------------------------------
    @staticmethod
    def url(s: Stored, fmt: str, base_url: str, splicer: Splicer | None = None) -> str:
        """The medium as a data URL (``inline``; a placeholder of ``splicer`` when large) or its artifact URL
        (``url``)."""
        if fmt == "url":
            return artifact_url(base_url, s.artifact.id, s.artifact.ext)
        if splicer is not None:
            media_io.encode_data_url(b"", s.medium.mime_type)  # the same check of the MIME type
            return splicer.inline(s.medium.data, f"data:{s.medium.mime_type};base64,")
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
    def audio_message(s: Stored, transcript: str, splicer: Splicer | None = None) -> dict[str, Any]:
        """OpenAI's ``message.audio`` / ``delta.audio``: {id (the artifact id), data (base64; a placeholder of
        ``splicer`` when large), format, expires_at, transcript}."""
        data = splicer.inline(s.medium.data) if splicer is not None else base64.b64encode(s.medium.data).decode("ascii")
        return {"id": s.artifact.id, "data": data, "format": s.medium.ext,
                "expires_at": s.artifact.expires_at, "transcript": transcript}

    @staticmethod
    def spoken_message(spoken: SpokenAudio, fmt: str) -> dict[str, Any]:
        """``message.audio`` of a spoken answer: {id (its WAV's artifact id), data (base64 WAV, or base64 PCM16 for
        ``pcm16``), format, expires_at, transcript (the text spoken), sample_rate_hz}."""
        data = spoken.pcm16 if fmt == "pcm16" else encode_chunks("wav", [spoken.pcm16], spoken.sample_rate_hz)
        return {"id": spoken.artifact.id, "data": base64.b64encode(data).decode("ascii"), "format": fmt,
                "expires_at": spoken.artifact.expires_at, "transcript": spoken.transcript,
                "sample_rate_hz": spoken.sample_rate_hz}

    @staticmethod
    def boxes_json(result: LLMResult) -> list[dict[str, Any]]:
        """``message.boxes``: phrase, box (pixels of the sent image, 2 decimals), image_index, text_span."""
        return [{"phrase": b.phrase, "box": [round(float(v), 2) for v in b.box_px], "image_index": b.image_index,
                 "text_span": list(b.text_span) if b.text_span is not None else None} for b in result.boxes]

    @staticmethod
    def skill_boxes_json(calls) -> list[dict[str, Any]]:
        """The skills' boxes as ``message.boxes`` entries (``text_span`` null, ``skill`` its name)."""
        return [{"phrase": b.phrase, "box": [round(float(v), 2) for v in b.box_px], "image_index": b.image_index,
                 "text_span": None, "skill": c.call.name} for c in calls for b in c.output.result.boxes]

    @staticmethod
    def masks_json(calls) -> list[dict[str, Any]]:
        """``message.masks``: every skill's masks (COCO uncompressed RLE), with the skill's name."""
        return [{**m.to_dict(), "skill": c.call.name} for c in calls for m in c.output.result.masks]

    def skill_call_json(self, c: SkillCall, fmt: str, base_url: str) -> dict[str, Any]:
        """``message.skill_calls[i]``: the call and its result (media as ``{"type": "image_url", "image_url":
        {"url"}, "artifact_id", "mime_type"}``, ``url`` by ``fmt``)."""
        r, summary = c.output.result, c.output.summary
        media = []
        for st in c.media:
            key = st.medium.modality.spec.content_part
            media.append({"type": key, key: {"url": self.url(st, fmt, base_url)}, "artifact_id": st.artifact.id,
                          "mime_type": st.medium.mime_type})
        return {"id": c.call.id, "type": "skill", "name": c.call.name, "arguments": c.call.arguments_json,
                "round": c.round, "deployment": c.deployment,
                "result": {"text": r.text, "boxes": summary.get("boxes", []), "masks": summary.get("masks", []),
                           "media": media, "data": summary.get("data", {}), "error": r.error,
                           "error_code": r.error_code, "elapsed_s": summary.get("elapsed_s", 0.0)}}

    @staticmethod
    def tool_call_json(call: ToolCall) -> dict[str, Any]:
        """OpenAI's ``tool_calls[i]``: ``{"id", "type": "function", "function": {"name", "arguments"}}``."""
        return {"id": call.id, "type": "function", "function": {"name": call.name, "arguments": call.arguments_json}}

    @staticmethod
    def logprob_json(e: LogprobEntry) -> dict[str, Any]:
        """OpenAI's ``logprobs.content[i]``: ``{"token", "logprob", "bytes", "top_logprobs": [...]}``."""
        return {"token": e.token, "logprob": e.logprob, "bytes": list(e.bytes),
                "top_logprobs": [{"token": t.token, "logprob": t.logprob, "bytes": list(t.bytes)} for t in e.top]}

    @classmethod
    def logprobs_json(cls, entries) -> dict[str, Any]:
        """``choices[].logprobs``: ``{"content": [...], "refusal": None}``."""
        return {"content": [cls.logprob_json(e) for e in entries or ()], "refusal": None}

    @staticmethod
    def usage(r: LLMResult) -> dict[str, int]:
        return {"prompt_tokens": r.prompt_tokens, "completion_tokens": r.completion_tokens,
                "total_tokens": r.prompt_tokens + r.completion_tokens}

    @property
    def fingerprint(self) -> str:
        return f"polymodal-{self.preset.name}"

    # ---- chat ------------------------------------------------------------------------------------
    def completion_body(self, plan: ChatPlan, out: ChatOutcome, base_url: str,
                        splicer: Splicer | None = None) -> dict[str, Any]:
        """The ``chat.completion`` object of a whole answer (see the contract, "The answer's shape"); with
        ``splicer``, large inline media are its placeholders (send the body with ``splicer.response``)."""
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
                self.array_item(s.medium.modality, self.url(s, plan.media_format, base_url, splicer), n))
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
        if plan.json_content:  # the JSON alone: its media only in the arrays and parts
            refs = []
        content: str | None = compose(text, refs)
        if r.tool_calls and not content:
            content = None  # OpenAI: an answer that is only calls has no content
        message: dict[str, Any] = {"role": "assistant", "content": content}
        if r.tool_calls:
            message["tool_calls"] = [self.tool_call_json(c) for c in r.tool_calls]
        for modality in Modality:  # registration order: images, audios, videos, then any plug-in
            if modality in arrays:
                message[modality.spec.answer_field] = arrays[modality]
        if out.spoken is not None:  # the answer spoken (audio.voice) takes OpenAI's slot
            message["audio"] = self.spoken_message(out.spoken, plan.speech.format)
        for s in media:  # OpenAI's slot (message.audio): the first medium of a modality that has one
            slot = s.medium.modality.spec.message_slot
            if slot is not None and slot not in message:
                message[slot] = self.audio_message(s, text, splicer)
        if plan.input_transcripts:  # what the spoken input said (services.ingress.spoken_input)
            message["input_transcripts"] = transcripts_json(plan.input_transcripts)
        message["parts"] = interleave(text, placed, media_parts, text_part=lambda t: {"type": "text", "text": t})
        if self.preset.grounding is not None or plan.skills.names:
            message["boxes"] = self.boxes_json(r) + self.skill_boxes_json(out.skill_calls)
        if plan.skills.names:
            message["masks"] = self.masks_json(out.skill_calls)
            message["skill_calls"] = [self.skill_call_json(c, plan.media_format, base_url) for c in out.skill_calls]
        return {
            "id": plan.request_id,
            "object": "chat.completion",
            "created": int(time.time()),
            "model": self.model_name,
            "system_fingerprint": self.fingerprint,
            "seed": plan.base_seed,
            "choices": [{"index": 0, "message": message, "finish_reason": plan.finish_reason(r.finish_reason),
                         "logprobs": self.logprobs_json(r.logprobs) if plan.llm.logprobs is not None else None}],
            "usage": self.usage(r),
        }

    def chunk(self, plan: ChatPlan, created: int, delta: dict | None, finish: str | None = None,
              usage: dict | None = None, logprobs: dict | None = None) -> bytes:
        """One ``chat.completion.chunk`` SSE frame (``delta=None``: no choices, e.g. the usage chunk)."""
        body: dict[str, Any] = {"id": plan.request_id, "object": "chat.completion.chunk", "created": created,
                                "model": self.model_name, "system_fingerprint": self.fingerprint,
                                "choices": [] if delta is None else
                                [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": logprobs}]}
        if usage is not None:
            body["usage"] = usage
        return sse_event(body)

    # ---- one-medium endpoints --------------------------------------------------------------------
    def generation_body(self, request_id: str, modality: Modality, revised_prompt: str, media: list[Stored],
                        fmt: str, base_url: str, splicer: Splicer | None = None) -> dict[str, Any]:
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
                item["b64_json"] = (splicer.inline(m.data) if splicer is not None
                                    else base64.b64encode(m.data).decode("ascii"))
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
        self._logprobs: list[LogprobEntry] = []  # entries not yet sent (their text is held back)
        self._calls = 0
        self.skill_calls: list[SkillCall] = []
        self.splicer = Splicer()
        # the text a client sees (a LLaVA-Plus answer: after "value👉"); offsets of references follow it
        self.shown = ShownText(responses.preset.chat.tool_format)

    def _content(self, piece: str) -> list[bytes]:
        if not piece:
            return []
        lp = None
        if self._logprobs:
            lp, self._logprobs = self.r.logprobs_json(self._logprobs), []
        return [self.r.chunk(self.plan, self.created, {"content": piece}, logprobs=lp)]

    def logprobs(self, entries) -> list[bytes]:
        """Entries of the text that follows: sent with the next content chunk."""
        self._logprobs.extend(entries)
        return []

    def tool_call(self, call: ToolCall) -> list[bytes]:
        """A call, as OpenAI streams one: ``delta.tool_calls`` ``[{"index", "id", "type", "function": {"name",
        "arguments": ""}}]``, then ``[{"index", "function": {"arguments": "<JSON>"}}]``."""
        k, self._calls = self._calls, self._calls + 1
        head = {"index": k, "id": call.id, "type": "function", "function": {"name": call.name, "arguments": ""}}
        return [self.r.chunk(self.plan, self.created, {"tool_calls": [head]}),
                self.r.chunk(self.plan, self.created,
                             {"tool_calls": [{"index": k, "function": {"arguments": call.arguments_json}}]})]

    def skill_call(self, c: SkillCall) -> list[bytes]:
        """A skill call of the loop finished: ``delta.skill_calls`` ``[call]``, then each medium it made (its
        reference in the content where the call was made, then its array chunk)."""
        self.skill_calls.append(c)
        frames = [self.r.chunk(self.plan, self.created,
                               {"skill_calls": [self.r.skill_call_json(c, self.plan.media_format, self.base_url)]})]
        for st in c.media:
            n = self._number(st.medium.modality, st.artifact)
            if not self.plan.json_content:
                md = self.r.reference(st.medium.modality, n, st.artifact, self.base_url)
                frames += self._content(self.content.reference(self.shown.offset(st.medium.text_offset), md))
            frames += self.medium(st)
        self.shown.next_round()
        return frames

    def opening(self) -> bytes:
        """``delta: {"role": "assistant", "content": ""}`` (and ``input_transcripts`` of spoken input)."""
        heard = self.plan.input_transcripts
        heard = {"input_transcripts": transcripts_json(heard)} if heard else {}
        return self.r.chunk(self.plan, self.created, {"role": "assistant", "content": "", **heard})

    def text(self, value: str) -> list[bytes]:
        """The model's next text: the part a client sees (:class:`~services.ingress.skill_loop.ShownText`)."""
        shown = self.shown.feed(value)
        self._text.append(shown)
        return self._content(self.content.text(shown)) if shown else []

    def _number(self, modality: Modality, art: Artifact) -> int:
        self._counts[modality] = n = self._counts.get(modality, 0) + 1
        self._numbers[art.id] = n
        return n

    def reserved(self, r: Reserved) -> list[bytes]:
        """A signal group closed: its reference (pending artifact URL) goes into the content where it belongs
        (never into a JSON answer's content)."""
        frames = []
        for art in r.artifacts:
            n = self._number(r.group.modality, art)
            if self.plan.json_content:
                continue
            md = self.r.reference(r.group.modality, n, art, self.base_url)
            frames += self._content(self.content.reference(self.shown.offset(r.group.text_offset), md))
        return frames

    def medium(self, s: Stored) -> list[Piece]:
        """``delta: {"images": [item]}`` (``audios``, ``videos``; the first audio also ``delta.audio``); a large
        medium's base64 is a :class:`~services.ingress.payloads.Payload` piece (send with
        :func:`~services.ingress.payloads.stream_pieces`)."""
        m = s.medium
        self.r.metrics.media.labels(m.modality.value).inc()
        item = self.r.array_item(m.modality, self.r.url(s, self.plan.media_format, self.base_url, self.splicer),
                                 self._numbers[s.artifact.id])
        delta: dict[str, Any] = {m.modality.spec.answer_field: [item]}
        slot = m.modality.spec.message_slot
        if slot is not None and slot not in self._slots_filled:  # OpenAI's slot: the first audio, delta.audio
            self._slots_filled.add(slot)
            delta[slot] = self.r.audio_message(s, "".join(self._text), self.splicer)
        return self.splicer.pieces(self.r.chunk(self.plan, self.created, delta))

    def speech(self, chunk: SpeechAudioChunk, art: Artifact) -> list[bytes]:
        """A spoken answer's chunk (``audio.voice``, ``format: pcm16``): ``delta.audio`` {id (the WAV's artifact,
        the same in every chunk), data (base64 PCM16 mono at ``sample_rate_hz``), transcript (this chunk's
        sentence; the deltas join to the whole transcript), sample_rate_hz, index}; the first also
        ``expires_at``."""
        audio: dict[str, Any] = {"id": art.id, "data": base64.b64encode(chunk.pcm16).decode("ascii"),
                                 "transcript": (" " if chunk.index else "") + chunk.text,
                                 "sample_rate_hz": chunk.sample_rate_hz, "index": chunk.index}
        if chunk.index == 0:
            audio["expires_at"] = art.expires_at
        return [self.r.chunk(self.plan, self.created, {"audio": audio})]

    def overlay(self, overlay: tuple[Stored, int], result: LLMResult) -> list[bytes]:
        """The ``box_overlay`` image: its reference at the end of the text, then ``delta.images``."""
        s, _ = overlay
        n = self._number(Modality.IMAGE, s.artifact)
        frames = [] if self.plan.json_content else self._content(self.content.reference(
            self.shown.offset(len(result.text)), self.r.reference(Modality.IMAGE, n, s.artifact, self.base_url)))
        item = self.r.array_item(Modality.IMAGE, self.r.url(s, self.plan.media_format, self.base_url), n)
        return [*frames, self.r.chunk(self.plan, self.created,
                                        {Modality.IMAGE.spec.answer_field: [{**item, "overlay": True}]})]

    def finish(self, result: LLMResult) -> list[bytes]:
        """References still waiting, the closing ``delta`` with ``finish_reason`` (``boxes`` for a grounding model),
        then the usage chunk when the request asked for it (first, text still held: thoughts that never reached
        a value marker, shown as written)."""
        held = self.shown.finish()
        self._text.append(held)
        out = self._content(self.content.text(held)) if held else []
        out += self._content(self.content.finish())
        if self._logprobs:  # entries whose text never came (held-back whitespace)
            out.append(self.r.chunk(self.plan, self.created, {"content": ""},
                                    logprobs=self.r.logprobs_json(self._logprobs)))
            self._logprobs = []
        last = {"boxes": self.r.boxes_json(result)} if self.r.preset.grounding is not None else {}
        if self.plan.skills.names:
            last = {"boxes": self.r.boxes_json(result) + self.r.skill_boxes_json(self.skill_calls),
                    "masks": self.r.masks_json(self.skill_calls)}
        out.append(self.r.chunk(self.plan, self.created, last, self.plan.finish_reason(result.finish_reason)))
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
