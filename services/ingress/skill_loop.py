"""The skill loop's pieces (issue #23): which skills a request enables, the next round's LLM request, the result
turn the model reads, and how the rounds' outputs make one answer.

A request enables server-side skills by name (``skills: ["detect", "ocr"]``, the names of ``GET /v1/skills``); they
are added after the client's ``tools`` (the preset's tool-call format lists them to the model), and ``tool_choice``
may name one (forced; ``required`` forces some call). :class:`~services.ingress.running.Runner` runs the loop:
generate until the model calls a skill, run the call(s), append the assistant's call turn and one ``tool`` turn per
result (:func:`result_text`), generate again (:func:`next_round`). ``max_skill_rounds`` rounds offer the skills; the
generation after the last offers only the client's tools, so the model answers. The floor of ``modalities``
applies from the round after a forced skill call (the forced round is a call, not an answer).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any

from polymodal.constrained.grammars import ToolChoice
from polymodal.constrained.tools import Tool
from polymodal.modality import Modality
from polymodal.types import LLMResult, SignalGroup, ToolCall, Turn

from services.errors import bad_request
from services.protocol import Backend, LLMRequest, SkillOutput
from services.schemas import ChatCompletionRequest

MEDIA = {m.value for m in Modality}


@dataclass(frozen=True)
class SkillPlan:
    """The skills a request enabled.

    Attributes:
        names: the enabled skills, in the request's order (deduplicated).
        tools: their tools (each skill's JSON schema as the function's parameters), added after the client's.
        max_rounds: rounds that offer the skills (the request's ``max_skill_rounds`` within the server's).
        forced: ``tool_choice`` forces a skill call in the first round (named, or ``required``).
        client_tools: the names of the client's own ``tools`` (their calls go back to the client).
    """

    names: tuple[str, ...] = ()
    tools: tuple[Tool, ...] = ()
    max_rounds: int = 0
    forced: bool = False
    client_tools: tuple[str, ...] = ()

    def runs(self, name: str) -> bool:
        """Whether the loop runs a call of ``name``: every call but the client's tools' once skills are enabled (a
        name that is neither, which only an unconstrained brain writes, gets an ``unknown_skill`` error result)."""
        return bool(self.names) and name not in self.client_tools


def plan_skills(backend: Backend, req: ChatCompletionRequest, allowed: tuple[Modality, ...],
                server_max_rounds: int) -> tuple[SkillPlan, ChatCompletionRequest]:
    """The request's ``skills`` -> a :class:`SkillPlan` (empty without skills) and the request with the skills'
    tools after its own ``tools`` (so ``tool_choice`` may name them and the grammar lists them).

    Args:
        allowed: the media the answer may contain (a skill that makes other media is refused; a generator is only
            served where its decoder is, so without ``modalities`` the preset's policy decides as for signal tokens).

    Raises:
        APIError: 400 naming ``skills[k]``: a skill this server does not run (lists the ones it does), a skill that
        makes a medium outside the answer's media; or ``tools[i].function.name`` equal to an enabled skill's name.
    """
    if not req.skills:
        return SkillPlan(), req
    specs = backend.skill_specs()
    names: list[str] = []
    for k, n in enumerate(req.skills):
        if n not in specs:
            raise bad_request(f"skills[{k}]: unknown skill {n!r}; this server runs: {', '.join(specs) or 'none'} "
                              "(see GET /v1/skills)", param=f"skills[{k}]", code="unknown_skill")
        makes = [Modality.parse(r) for r in specs[n].returns if r in MEDIA]
        outside = [m.value for m in makes if m not in allowed]
        if outside:
            raise bad_request(f"skills[{k}]: {n!r} makes {', '.join(outside)}, which this answer may not contain "
                              f"(its media: {', '.join(x.value for x in allowed) or 'text only'})",
                              param=f"skills[{k}]", code="unsupported_modality")
        if n not in names:
            names.append(n)
    for i, t in enumerate(req.tools or ()):
        fn = t.get("function") if isinstance(t, dict) else None
        if isinstance(fn, dict) and fn.get("name") in names:
            raise bad_request(f"tools[{i}].function.name: {fn.get('name')!r} is also an enabled skill; rename the "
                              "function or leave the skill out", param=f"tools[{i}].function.name",
                              code="invalid_value")
    choice = req.tool_choice
    named = choice.get("function", {}).get("name") if isinstance(choice, dict) and isinstance(
        choice.get("function"), dict) else None
    forced = named in names or (choice == "required" and not req.tools)
    rounds = min(req.max_skill_rounds or server_max_rounds, server_max_rounds)
    tools = tuple(Tool(n, specs[n].parameters, specs[n].description) for n in names)
    with_skills = req.model_copy(update={"tools": [*(req.tools or ()), *(t.openai_dict() for t in tools)]})
    theirs = tuple(t["function"]["name"] for t in req.tools or () if isinstance(t, dict)
                   and isinstance(t.get("function"), dict) and isinstance(t["function"].get("name"), str))
    return SkillPlan(tuple(names), tools, rounds, forced, theirs), with_skills


def next_round(llm: LLMRequest, skills: tuple[str, ...], turns: tuple[Turn, ...], requested: tuple[Modality, ...],
               *, offer_skills: bool) -> LLMRequest:
    """The LLM request of the loop's next generation: the conversation so far; the skills still offered
    (``tool_choice`` back to auto: the forced call was made) or only the client's tools (the model answers); the
    media floor (``requested``) in force."""
    tools = llm.tools if offer_skills else tuple(t for t in llm.tools if t.name not in skills)
    choice = llm.tool_choice
    if tools and choice is not None and choice.mode in ("required", "function"):
        choice = ToolChoice("auto")
    return dataclasses.replace(llm, turns=turns, modalities=requested, tools=tools,
                               tool_choice=choice if tools else None)


@dataclass(frozen=True)
class SkillCall:
    """One skill call the loop ran: the model's call, the skill's output, its media (``Stored`` s of
    :mod:`~services.ingress.running`: ``index`` among the answer's media, ``text_offset`` where the call was made),
    the round (0-based), the deployment that ran it."""

    call: ToolCall
    output: SkillOutput
    media: tuple[Any, ...]
    round: int
    deployment: str | None


def skill_failure(name: str, message: str, code: str = "failed") -> SkillOutput:
    """An error :class:`SkillOutput` made in the ingress (timeout, deployment down)."""
    from skills.base import SkillResult

    r = SkillResult.failure(name, message, code)
    return SkillOutput(r, r.to_dict())


def result_text(call: SkillCall) -> str:
    """The ``tool`` turn the model reads after a call: a compact JSON object (the result's text, boxes, masks'
    boxes, media made; or the error and its code)."""
    out = call.output
    d: dict[str, Any] = {"skill": call.call.name}
    if out.ok:
        d["result"] = out.result.text
        if out.result.boxes:
            d["boxes"] = [{"label": b.phrase, "box": [round(float(v), 1) for v in b.box_px]}
                          for b in out.result.boxes[:20]]
        if out.result.masks:
            d["masks"] = [{"label": m.label, "bbox": [round(float(v), 1) for v in m.bbox_px], "area_px": m.area_px}
                          for m in out.result.masks[:20]]
        if out.media:
            d["media"] = [f"{m.medium.modality.value} {k + 1}" for k, m in enumerate(call.media)]
    else:
        d["error"] = out.result.error
        d["error_code"] = out.result.error_code
    return json.dumps(d, ensure_ascii=False)


def shown_answer(text: str, tool_format: str) -> tuple[str, int]:
    """The answer text a client sees (``message.content``) -> (text, characters of the model's text dropped before
    it).

    ``llava-plus`` (a preset that learned LLaVA-Plus's rendering, e.g. ``toy-skills``): the model's text of all the
    rounds is ``"thoughts🤔" <why> "thoughts🤔" <reading of the result>\n"value👉" <answer>`` (a skill_use turn's
    actions block is parsed into the call; its thoughts stay in the text); the client gets the answer alone, the text
    after the last ``"value👉"`` (LLaVA-Plus's ``value``, what its demo shows), the thoughts and markers dropped (the
    calls and their results are in ``message.skill_calls``). A text without the marker (an ordinary request's
    answer, media included) is shown as it is. Other formats: unchanged. Streams and spoken answers: :class:`ShownText`.
    """
    if tool_format != "llava-plus":
        return text, 0
    from polymodal.constrained.tools import LLAVA_PLUS_VALUE

    at = text.rfind(LLAVA_PLUS_VALUE)
    if at < 0:
        return text, 0
    cut = at + len(LLAVA_PLUS_VALUE)
    rest = text[cut:]
    cut += len(rest) - len(rest.lstrip())
    return text[cut:].rstrip(), cut


class ShownText:
    """:func:`shown_answer` as the text arrives (a streamed answer's deltas, the text a spoken answer speaks).

    ``llava-plus``: a round whose text opens with ``"thoughts🤔"`` is held until its ``"value👉"``; what follows the
    marker (leading spaces dropped) is shown as it comes; a round that does not open with the marker is shown as it
    comes; :meth:`next_round` after each skill call (a new round may open with thoughts again); :meth:`finish`
    returns what is still held (thoughts without a value marker are shown as written, as :func:`shown_answer` shows
    a text without the marker). :meth:`offset` maps a character offset of the model's text to the shown text (an
    offset inside a dropped part maps to where the shown text is at that point). Other formats: everything is
    shown, offsets unchanged.
    """

    def __init__(self, tool_format: str):
        self.active = tool_format == "llava-plus"
        self.mode = "probe" if self.active else "show"
        self.text = ""  # the model's text so far
        self.pos = 0  # characters of it decided (shown or dropped)
        self.kept: list[tuple[int, int]] = []  # shown ranges [start, end) of the model's text

    def _show(self, end: int) -> str:
        piece = self.text[self.pos:end]
        if piece:
            self.kept.append((self.pos, end))
        self.pos = end
        return piece

    def feed(self, piece: str) -> str:
        """The model's next text -> the part to show now (maybe ``""``)."""
        from polymodal.constrained.tools import LLAVA_PLUS_THOUGHTS, LLAVA_PLUS_VALUE

        self.text += piece
        while True:
            if self.mode == "show":
                return self._show(len(self.text))
            rest = self.text[self.pos:]
            if self.mode == "probe":
                opening = rest.lstrip()
                if opening.startswith(LLAVA_PLUS_THOUGHTS.strip()):
                    self.mode = "hold"
                elif LLAVA_PLUS_THOUGHTS.startswith(opening):
                    return ""  # too short to tell
                else:
                    self.mode = "show"
            elif self.mode == "hold":
                at = rest.find(LLAVA_PLUS_VALUE)
                if at < 0:
                    return ""
                self.pos += at + len(LLAVA_PLUS_VALUE)
                self.mode = "lead"
            else:  # lead: the spaces after the value marker
                skip = len(rest) - len(rest.lstrip())
                self.pos += skip
                if self.pos == len(self.text):
                    return ""
                self.mode = "show"

    def next_round(self) -> None:
        """A skill call ended the round (its thoughts, still held, are dropped): the next may open with thoughts."""
        if self.active:
            if self.mode != "show":
                self.pos = len(self.text)
            self.mode = "probe"

    def finish(self) -> str:
        """What is still held, shown as written (a round of thoughts that never reached a value marker)."""
        if self.mode in ("probe", "hold"):
            return self._show(len(self.text))
        return ""

    def offset(self, raw: int) -> int:
        """A character offset of the model's text -> the offset in the shown text."""
        return sum(min(end, raw) - start for start, end in self.kept if start < raw)


def shown_media(media: list, cut: int, shown: str) -> list:
    """The answer's stored media (each with ``.medium.text_offset``) with their places moved to the shown text
    (:func:`shown_answer` dropped ``cut`` characters before it; a medium inside the dropped part goes to 0)."""
    if not cut:
        return media
    return [dataclasses.replace(m, medium=dataclasses.replace(
        m.medium, text_offset=min(max(0, m.medium.text_offset - cut), len(shown)))) for m in media]


class Shift:
    """Where a round's output goes in the whole answer: media indices after ``index_base``, text offsets after
    ``text_offset`` (both 0 in the first round, so a plan without skills is unchanged)."""

    def __init__(self) -> None:
        self.index_base = 0
        self.text_offset = 0

    def group(self, g: SignalGroup) -> SignalGroup:
        if not (self.index_base or self.text_offset):
            return g
        return dataclasses.replace(g, index=g.index + self.index_base, text_offset=g.text_offset + self.text_offset)

    def result(self, r: LLMResult) -> LLMResult:
        if not self.text_offset:
            return r
        boxes = tuple(dataclasses.replace(b, text_span=(b.text_span[0] + self.text_offset,
                                                        b.text_span[1] + self.text_offset))
                      if b.text_span is not None else b for b in r.boxes)
        return dataclasses.replace(r, boxes=boxes)


def unknown_call(call: ToolCall, plan: SkillPlan) -> SkillOutput:
    """The error result of a call that names no enabled skill and no client tool (an unconstrained brain's)."""
    return skill_failure(call.name, f"unknown tool {call.name!r}; the tools are: "
                                    f"{', '.join((*plan.names, *plan.client_tools))}", "unknown_skill")


def merge(results: list[LLMResult], logprobs: bool, plan: SkillPlan) -> LLMResult:
    """The rounds' results as one: texts joined, tokens summed, the last round's finish reason and its calls of
    client tools (the skills' calls are the loop's: ``message.skill_calls``)."""
    last = results[-1]
    theirs = tuple(c for c in last.tool_calls if not plan.runs(c.name))
    finish = last.finish_reason if theirs or last.finish_reason != "tool_calls" else "stop"
    if len(results) == 1:
        return dataclasses.replace(last, tool_calls=theirs, finish_reason=finish)
    return LLMResult(
        text="".join(r.text for r in results),
        groups=tuple(g for r in results for g in r.groups),
        prompt_tokens=sum(r.prompt_tokens for r in results),
        completion_tokens=sum(r.completion_tokens for r in results),
        finish_reason=finish,
        notes=tuple(n for r in results for n in r.notes),
        boxes=tuple(b for r in results for b in r.boxes),
        tool_calls=theirs,
        logprobs=tuple(e for r in results for e in (r.logprobs or ())) if logprobs else None,
    )
