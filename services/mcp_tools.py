"""polymodal's generation, chat and skills as MCP tools (issue #24): the tool catalogue and how a call becomes a
request to polymodal's HTTP API and its answer MCP content. No MCP transport here (:mod:`services.mcp_server`).

Every tool talks to the OpenAI-compatible REST API (:mod:`services.ingress`) through one ``httpx.AsyncClient``:
a running service (by URL) or the in-process app (``build_app`` over a :class:`services.local.LocalBackend`,
reached through ``httpx.ASGITransport``), so both behave as the API documents (the same validation, errors,
limits and cancellation: a call cancelled here closes its HTTP request, and the ingress cancels the LLM and the
renders of a request whose client went away).

Tools
-----
- ``generate_image`` -> ``POST /v1/images/generations``, ``generate_audio`` -> ``POST /v1/audio/generations``:
  the prompt goes through the LLM with the medium's signal group required; ``n`` variants (seeds ``seed + k``).
- ``generate_video`` -> ``POST /v1/chat/completions`` with ``modalities: ["video"]`` (the floor and the ceiling:
  exactly one video). Not ``POST /v1/videos``: that is an asynchronous job the API cannot cancel, and a cancelled
  tool call must stop its work.
- ``chat`` -> ``POST /v1/chat/completions``: text plus input media (data URLs, bare base64, or this server's
  artifact URLs), any output media (``modalities``), enabled server-side ``skills``.
- one tool per skill of ``GET /v1/skills`` (``detect``, ``ocr``, ``segment``, ...) -> ``POST /v1/skills/{name}``:
  its input schema is the skill's own parameters plus ``image`` / ``images`` when the skill reads images. A skill
  named like one of the tools above (the ``generate_*`` skills) is not listed twice: the tool above wins.

Results (``CallToolResult``): a text block first (the answer's text, or what was made), then images as
``ImageContent`` (PNG), sounds as ``AudioContent`` (WAV), videos as ``EmbeddedResource`` with a blob (MP4; ``uri``
the artifact URL); ``structuredContent`` carries seeds, boxes (pixels of the input image), masks (RLE) and the
skill's ``data``. Bad arguments, requests the service refuses and failures are results with ``isError`` and the
reason (the API's message, naming the field); nothing here raises for a caller's mistake.
"""

from __future__ import annotations

import base64
import json
import logging
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import anyio
import httpx
import mcp_types as types
from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model

from polymodal.config import MAX_DURATION_S, MAX_FPS, MAX_GUIDANCE_SCALE, MAX_INFERENCE_STEPS, MAX_NEW_TOKENS, \
    MAX_NUM_FRAMES
from polymodal.modality import Modality

from services.schemas import MAX_SEED

log = logging.getLogger(__name__)

Progress = Callable[[float, float | None, str | None], Awaitable[None]]
"""``report_progress(progress, total, message)`` of the call's MCP request (a no-op when the caller sent no
progress token)."""

PROGRESS_PERIOD_S = 0.5
"""How often a running call reports progress (seconds elapsed, with what it is waiting for)."""


class ToolError(Exception):
    """A call that cannot be answered: its message is the tool result's text (``isError``)."""


class StartError(RuntimeError):
    """The polymodal service cannot be used (unreachable, refuses the key, not a polymodal API)."""


# ---- arguments of the fixed tools (pydantic: bounds, clear messages, the JSON schema the host sees) -------------
class _Args(BaseModel):
    model_config = ConfigDict(extra="forbid")


_SIZE = Field(None, pattern=r"^[0-9]+x[0-9]+$", description="WxH in pixels, multiples of 8 (default: the model's)")
_SEED = Field(None, ge=0, le=MAX_SEED, description="seed of the first medium (medium k uses seed + k); random if unset")
_STEPS = Field(None, ge=1, le=MAX_INFERENCE_STEPS, description="denoising steps (default: the model's)")
_GUIDANCE = Field(None, ge=0.0, le=MAX_GUIDANCE_SCALE, description="classifier-free guidance (default: the model's)")


class GenerateImageArgs(_Args):
    prompt: str = Field(min_length=1, max_length=32000, description="what to draw (it goes through the LLM)")
    n: int = Field(1, ge=1, le=8, description="how many variants of the one image group (seeds seed + k)")
    size: str | None = _SIZE
    seed: int | None = _SEED
    num_inference_steps: int | None = _STEPS
    guidance_scale: float | None = _GUIDANCE


class GenerateAudioArgs(_Args):
    prompt: str = Field(min_length=1, max_length=32000, description="the sound to make (it goes through the LLM)")
    n: int = Field(1, ge=1, le=8, description="how many variants (seeds seed + k)")
    duration_s: float | None = Field(None, gt=0.0, le=MAX_DURATION_S, description="length in seconds")
    seed: int | None = _SEED
    num_inference_steps: int | None = _STEPS
    guidance_scale: float | None = _GUIDANCE


class GenerateVideoArgs(_Args):
    prompt: str = Field(min_length=1, max_length=32000, description="the clip to make (it goes through the LLM)")
    size: str | None = _SIZE
    num_frames: int | None = Field(None, ge=1, le=MAX_NUM_FRAMES, description="frames (default: the model's)")
    fps: int | None = Field(None, ge=1, le=MAX_FPS, description="frames per second of the MP4")
    seed: int | None = _SEED
    num_inference_steps: int | None = _STEPS
    guidance_scale: float | None = _GUIDANCE


class ChatArgs(_Args):
    """The chat tool's arguments; :func:`chat_args_model` adds one list of input media per modality (``images``,
    ``audios``, ``videos``: the modality's ``answer_field``)."""

    prompt: str = Field(min_length=1, max_length=32000, description="the user's message")
    modalities: list[str] | None = Field(
        None, description="the media the answer must contain and may contain, e.g. [\"image\"] or [\"text\"] "
        "(absent: the model decides)")
    skills: list[str] | None = Field(None, max_length=32, description="server-side skills the model may call "
                                     "(e.g. detect, ocr)")
    system: str | None = Field(None, max_length=32000, description="a system message")
    seed: int | None = _SEED
    max_tokens: int | None = Field(None, ge=1, le=MAX_NEW_TOKENS)
    temperature: float | None = Field(None, ge=0.0, le=2.0)


def media_input_schema(m: Modality) -> dict[str, Any]:
    """One input medium as a tool argument: a data URL, bare base64 of a file, or one of the server's artifact URLs."""
    mime = m.spec.codec.mime_type
    return {"type": "string", "description": f"the {m.spec.label}: a data URL (data:{mime};base64,...), bare base64 "
                                             "of the file, or one of this server's artifact URLs"}


def chat_args_model() -> type[ChatArgs]:
    """:class:`ChatArgs` with ``<answer_field>: list[str]`` (input media) for every registered modality."""
    fields = {m.spec.answer_field: (list[str], Field(default_factory=list, max_length=16, description=(
        f"input {m.spec.label}s: " + media_input_schema(m)["description"].split(": ", 1)[1])))
        for m in Modality}
    return create_model("ChatArguments", __base__=ChatArgs, **fields)


@dataclass(frozen=True)
class Generator:
    """A ``generate_<modality>`` tool: its arguments, description, and the one-medium endpoint it calls
    (``None``: a chat request with ``modalities: [<modality>]``, for a modality whose endpoint is an async job)."""

    args: type[_Args]
    description: str
    endpoint: str | None


GENERATORS: dict[Modality, Generator] = {
    Modality.IMAGE: Generator(GenerateImageArgs, "Generate images (PNG) from a prompt. The prompt goes through "
                              "polymodal's LLM with an image required; n variants of that image group.",
                              "/v1/images/generations"),
    Modality.AUDIO: Generator(GenerateAudioArgs, "Generate sounds (WAV) from a prompt. The prompt goes through "
                              "polymodal's LLM with a sound required; n variants.", "/v1/audio/generations"),
    Modality.VIDEO: Generator(GenerateVideoArgs, "Generate a video (MP4) from a prompt. The prompt goes through "
                              "polymodal's LLM with a video required.", None),
}
"""The generation tools by output modality (a modality the service renders and that is listed here gets one)."""

MCP_CONTENT: dict[Modality, type] = {Modality.IMAGE: types.ImageContent, Modality.AUDIO: types.AudioContent}
"""The MCP content type of a generated medium; a modality not listed (video) is an ``EmbeddedResource`` blob."""


@dataclass(frozen=True)
class ToolDef:
    """One tool: its MCP description and how a call runs (``kind``: ``generate`` | ``chat`` | ``skill``);
    ``args``: the pydantic model of a fixed tool's arguments (``None`` for a skill: the service checks them against
    the skill's own schema); ``modality``: a ``generate`` tool's; ``accepts``: the input media of a skill."""

    name: str
    description: str
    input_schema: dict[str, Any]
    kind: str
    args: type[_Args] | None = None
    modality: Modality | None = None
    accepts: tuple[Modality, ...] = ()

    def to_mcp(self) -> types.Tool:
        return types.Tool(name=self.name, description=self.description, input_schema=self.input_schema)


def fixed_tools(output_modalities: list[Modality]) -> list[ToolDef]:
    """``generate_<modality>`` for the modalities the service renders (:data:`GENERATORS`), and ``chat``."""
    out = [ToolDef(f"generate_{m.value}", g.description, g.args.model_json_schema(), "generate", g.args, m)
           for m, g in GENERATORS.items() if m in output_modalities]
    chat = chat_args_model()
    media = ", ".join(m.value for m in output_modalities) or "none"
    out.append(ToolDef("chat", "Chat with polymodal's any-to-any model: text plus media in (images, sounds, "
                       f"videos); text and media out (this server renders: {media}). Returns the answer's text (with "
                       "a reference where each medium belongs) and the media.", chat.model_json_schema(), "chat",
                       chat))
    return out


def skill_tool(card: dict[str, Any]) -> ToolDef:
    """A tool for one skill of ``GET /v1/skills``: its ``parameters`` schema, plus per input modality it accepts
    ``<modality>`` (one medium) and ``<answer_field>`` (several; the skill's ``image_index`` counts them)."""
    params = json.loads(json.dumps(card.get("parameters") or {"type": "object", "properties": {}}))
    params.setdefault("type", "object")
    props = params.setdefault("properties", {})
    accepts = tuple(Modality.parse(a) for a in card.get("accepts") or () if a in Modality)
    desc = card.get("description") or card["name"]
    for m in accepts:
        props[m.value] = media_input_schema(m)
        props[m.spec.answer_field] = {"type": "array", "items": media_input_schema(m), "maxItems": 16,
                                      "description": f"several {m.spec.label}s instead of one"}
        desc += f" Pass the {m.spec.label} as `{m.value}` (or several as `{m.spec.answer_field}`)."
    return ToolDef(card["name"], desc, params, "skill", accepts=accepts)


# ---- media ---------------------------------------------------------------------------------------------------------
_DATA_URL = re.compile(r"^data:([\w.+-]+/[\w.+-]+)?(;[\w-]+=[^;,]*)*;base64,(.*)$", re.S)


def split_data_url(url: str) -> tuple[str, str]:
    """``data:MIME;base64,DATA`` -> ``(MIME, DATA)`` (base64 as sent).

    Raises:
        ToolError: not a base64 data URL.
    """
    m = _DATA_URL.match(url)
    if m is None:
        raise ToolError("expected a base64 data URL in polymodal's answer")
    return m.group(1) or "application/octet-stream", m.group(3)


def content_part(m: Modality, value: Any, field: str) -> dict[str, Any]:
    """An input medium as a chat / skill content part (``{"type": "image_url", "image_url": {"url"}}``): a data URL
    or an http(s) URL as given (the service reads only its own artifact URLs and allow-listed hosts); bare base64 ->
    a data URL of the modality's file type.

    Raises:
        ToolError: not a string, or neither a URL nor base64 (a path, prose).
    """
    v = value.strip() if isinstance(value, str) else None
    if not v:
        raise ToolError(f"{field}: expected a string (a data URL, base64 of the file, or an artifact URL)")
    if not v.startswith(("data:", "http://", "https://")):
        try:
            base64.b64decode(v, validate=True)
        except ValueError:
            raise ToolError(f"{field}: give a data URL (data:{m.spec.codec.mime_type};base64,...), bare base64 of "
                            "the file, or one of this server's artifact URLs") from None
        v = f"data:{m.spec.codec.mime_type};base64,{v}"
    key = m.spec.content_part
    return {"type": key, key: {"url": v}}


def media_block(m: Modality, url: str, mime_type: str | None = None, uri: str | None = None):
    """A medium of an answer (a data URL) -> MCP content: :data:`MCP_CONTENT` (image, audio) or an
    ``EmbeddedResource`` blob (``uri``: its artifact URL when known)."""
    mime, data = split_data_url(url)
    mime = mime_type or mime
    kind = MCP_CONTENT.get(m)
    if kind is not None:
        return kind(data=data, mime_type=mime)
    return types.EmbeddedResource(resource=types.BlobResourceContents(uri=uri or f"polymodal://{m.value}",
                                                                      mime_type=mime, blob=data))


def _modality_of_part(part_type: str) -> Modality | None:
    return next((m for m in Modality if m.spec.content_part == part_type), None)


# ---- the tools over one API -----------------------------------------------------------------------------------------
def api_error(r: httpx.Response) -> ToolError:
    """An error answer of the API -> its message (status, code, field)."""
    try:
        err = r.json()["error"]
        code = f" {err['code']}" if err.get("code") else ""
        param = f" (field {err['param']})" if err.get("param") else ""
        return ToolError(f"polymodal answered {r.status_code}{code}{param}: {err.get('message')}")
    except (ValueError, KeyError, TypeError):
        return ToolError(f"polymodal answered {r.status_code}: {r.text[:500]}")


class PolymodalTools:
    """The MCP tools over one polymodal HTTP API.

    Args:
        http: a client whose ``base_url`` is the service's root (the ``/v1`` routes hang below it), with its API key
            in the headers; for the in-process pipeline, an ``httpx.ASGITransport`` over the app.
        model: ``GET /v1/models``' first entry (``id``, ``output_modalities``).
        skills: ``GET /v1/skills``' cards.
    """

    def __init__(self, http: httpx.AsyncClient, model: dict[str, Any], skills: list[dict[str, Any]]):
        self.http = http
        self.model = model
        outputs = [Modality.parse(m) for m in model.get("output_modalities", []) if m in Modality]
        self.defs: dict[str, ToolDef] = {t.name: t for t in fixed_tools(outputs)}
        for card in skills:
            if card.get("name") and card["name"] not in self.defs:
                self.defs[card["name"]] = skill_tool(card)

    @classmethod
    async def connect(cls, http: httpx.AsyncClient, timeout_s: float = 10.0) -> "PolymodalTools":
        """Read the served model and skills.

        Raises:
            StartError: the service is unreachable within ``timeout_s``, refuses the key, or is not polymodal.
        """
        where = str(http.base_url)
        try:
            models = await http.get("/v1/models", timeout=timeout_s)
            if models.status_code == 401:
                raise StartError(f"polymodal at {where} refused the API key ({api_error(models)}); set "
                                 "POLYMODAL_API_KEY")
            if models.status_code != 200:
                raise StartError(f"{where} is not a usable polymodal API: GET /v1/models -> {api_error(models)}")
            skills = await http.get("/v1/skills", timeout=timeout_s)
        except httpx.HTTPError as e:
            raise StartError(f"cannot reach polymodal at {where}: {type(e).__name__}: {e}") from None
        try:
            model = models.json()["data"][0]
            cards = skills.json()["data"] if skills.status_code == 200 else []
        except (ValueError, KeyError, IndexError, TypeError):
            raise StartError(f"{where} is not a polymodal API (GET /v1/models answered {models.text[:200]!r})") \
                from None
        return cls(http, model, cards)

    def tools(self) -> list[types.Tool]:
        return [d.to_mcp() for d in self.defs.values()]

    async def call(self, name: str, arguments: dict[str, Any] | None, progress: Progress | None = None
                   ) -> types.CallToolResult:
        """Run one call; every failure that is not a cancellation is an ``isError`` result."""
        d = self.defs.get(name)
        if d is None:
            return error_result(f"unknown tool {name!r}; this server has: {', '.join(self.defs)}")
        try:
            args = d.args.model_validate(arguments or {}) if d.args is not None else dict(arguments or {})
            run = {"generate": self._generate, "chat": self._chat, "skill": self._skill}[d.kind]
            return await _with_progress(progress, f"{name} running on polymodal", run(d, args))
        except ValidationError as e:
            return error_result(f"{name}: invalid arguments: " + "; ".join(
                f"{'.'.join(str(p) for p in err['loc']) or 'arguments'}: {err['msg']}" for err in e.errors()))
        except ToolError as e:
            return error_result(f"{name}: {e}")
        except httpx.HTTPError as e:
            return error_result(f"{name}: polymodal could not be reached: {type(e).__name__}: {e}")
        except Exception as e:  # noqa: BLE001 - an answer this server did not expect: the call fails, not the server
            log.exception("%s failed", name)
            return error_result(f"{name}: internal error: {type(e).__name__}: {e}")

    async def _post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        r = await self.http.post(path, json=body)
        if r.status_code != 200:
            raise api_error(r)
        return r.json()

    async def _generate(self, d: ToolDef, args: _Args) -> types.CallToolResult:
        m = d.modality
        endpoint = GENERATORS[m].endpoint
        if endpoint is None:
            return await self._generate_in_chat(m, args)
        body = args.model_dump(exclude_none=True)
        body.update(model=self.model["id"], response_format="b64_json")
        answer = await self._post(endpoint, body)
        items = answer.get("data") or []
        said = items[0].get("revised_prompt", "") if items else ""
        blocks: list[Any] = [types.TextContent(text=f"{len(items)} {m.spec.label}(s) made by {self.model['id']} "
                                               f"(seeds {', '.join(str(i.get('seed')) for i in items)}); the "
                                               f"model's text: {said!r}")]
        for i in items:
            blocks.append(media_block(m, f"data:{i.get('mime_type') or m.spec.codec.mime_type};base64,"
                                         f"{i['b64_json']}"))
        meta = [{k: v for k, v in i.items() if k != "b64_json"} for i in items]
        return types.CallToolResult(content=blocks, structured_content={"id": answer.get("id"), "media": meta})

    async def _generate_in_chat(self, m: Modality, args: _Args) -> types.CallToolResult:
        """One medium through the chat endpoint: ``modalities: [m]`` (the floor and the ceiling), its options."""
        options = args.model_dump(exclude_none=True, exclude={"prompt", "seed", "size"})
        size = getattr(args, "size", None)
        if size:
            w, h = size.split("x")
            options.update(width_px=int(w), height_px=int(h))
        body = {"model": self.model["id"], "modalities": [m.value], "media_format": "inline",
                "messages": [{"role": "user", "content": args.prompt}], m.value: options or None}
        if args.seed is not None:
            body["seed"] = args.seed
        return self._chat_result(await self._post("/v1/chat/completions", body))

    async def _chat(self, d: ToolDef, args: ChatArgs) -> types.CallToolResult:
        parts: list[dict[str, Any]] = []
        for m in Modality:
            field = m.spec.answer_field
            parts.extend(content_part(m, v, f"{field}[{k}]") for k, v in enumerate(getattr(args, field)))
        parts.append({"type": "text", "text": args.prompt})
        messages = [{"role": "system", "content": args.system}] if args.system else []
        messages.append({"role": "user", "content": parts})
        body = {"model": self.model["id"], "messages": messages, "media_format": "inline",
                **args.model_dump(include={"modalities", "skills", "seed", "max_tokens", "temperature"},
                                  exclude_none=True)}
        return self._chat_result(await self._post("/v1/chat/completions", body))

    @staticmethod
    def _chat_result(answer: dict[str, Any]) -> types.CallToolResult:
        """A chat answer -> its text, then its media as MCP content (in each modality's array order; the box overlay
        left out: the boxes are structured content); ``structuredContent``: the media's artifact URLs and seeds,
        boxes, masks, skill calls."""
        msg = answer["choices"][0]["message"]
        blocks: list[Any] = [types.TextContent(text=msg.get("content") or "")]
        urls: dict[tuple[Modality, int], str] = {}  # artifact URL of the k-th medium of a modality
        media_meta = []
        for p in msg.get("parts") or []:
            m = _modality_of_part(p.get("type", ""))
            if m is not None:
                k = sum(1 for key in urls if key[0] is m)
                urls[(m, k)] = p[p["type"]]["url"]
                media_meta.append({"type": m.value, "url": urls[(m, k)], "mime_type": p.get("mime_type"),
                                   "seed": p.get("seed"), "text_offset": p.get("text_offset")})
        for m in Modality:
            for k, item in enumerate(msg.get(m.spec.answer_field) or []):
                if not item.get("overlay"):
                    blocks.append(media_block(m, item[m.spec.content_part]["url"], uri=urls.get((m, k))))
        structured = {"id": answer.get("id"), "text": msg.get("content") or "", "media": media_meta,
                      "finish_reason": answer["choices"][0].get("finish_reason")}
        for key in ("boxes", "masks", "skill_calls"):
            if msg.get(key):
                structured[key] = msg[key]
        return types.CallToolResult(content=blocks, structured_content=structured)

    async def _skill(self, d: ToolDef, args: dict[str, Any]) -> types.CallToolResult:
        inputs: list[dict[str, Any]] = []
        for m in d.accepts:
            one, many = args.pop(m.value, None), args.pop(m.spec.answer_field, None)
            if one is not None and many is not None:
                raise ToolError(f"give `{m.value}` or `{m.spec.answer_field}`, not both")
            values = [one] if one is not None else many or []
            if not isinstance(values, list):
                raise ToolError(f"`{m.spec.answer_field}` is a list")
            if not values:
                raise ToolError(f"{d.name} reads {m.spec.label}s: pass one as `{m.value}` (a data URL, base64 of the "
                                "file, or one of this server's artifact URLs)")
            inputs.extend(content_part(m, v, f"{m.spec.answer_field}[{k}]") for k, v in enumerate(values))
        answer = await self._post(f"/v1/skills/{d.name}", {"arguments": args, "input": inputs,
                                                           "media_format": "inline"})
        blocks: list[Any] = [types.TextContent(text=answer.get("text") or "")]
        for item in answer.get("media") or []:
            m = _modality_of_part(item.get("type", ""))
            if m is not None:
                blocks.append(media_block(m, item[item["type"]]["url"], item.get("mime_type")))
        structured = {k: answer.get(k) for k in ("skill", "text", "boxes", "masks", "data", "elapsed_s")}
        return types.CallToolResult(content=blocks, structured_content=structured)


def error_result(message: str) -> types.CallToolResult:
    return types.CallToolResult(content=[types.TextContent(text=message)], is_error=True)


async def _with_progress(progress: Progress | None, label: str, work: Awaitable[types.CallToolResult]
                         ) -> types.CallToolResult:
    """Await ``work`` while reporting progress every :data:`PROGRESS_PERIOD_S` (seconds elapsed; no total: how long
    the LLM writes is not known up front). Cancelling the caller cancels ``work``."""
    if progress is None:
        return await work
    t0 = time.monotonic()

    async def tick() -> None:
        while True:
            elapsed = time.monotonic() - t0
            try:
                await progress(round(elapsed, 3), None, f"{label}: {elapsed:.1f} s")
            except Exception:  # noqa: BLE001 - a notification that cannot be sent does not fail the call
                log.debug("progress notification not sent", exc_info=True)
                return
            await anyio.sleep(PROGRESS_PERIOD_S)

    outcome: dict[str, Any] = {}
    async with anyio.create_task_group() as tg:
        tg.start_soon(tick)
        try:
            outcome["result"] = await work
        except Exception as e:  # noqa: BLE001 - re-raised below, outside the task group (not as a group)
            outcome["error"] = e
        finally:
            tg.cancel_scope.cancel()
    if "error" in outcome:
        raise outcome["error"]
    return outcome["result"]
