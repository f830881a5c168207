"""Stand-in stages for the serving tests (no torch, no model): same interfaces as
``polymodal.pipeline.LLMStage`` / ``DecoderStage``, deterministic, instrumented.

- :class:`FakeLLMStage` answers with text derived from the conversation (so tests see what reached it),
  emits one signal group per required modality (or none when ``force_groups=False``) and, like a model that
  draws unasked, one per ``volunteer`` modality its ceiling (``allowed_modalities``) allows (the real engine
  masks the others' signal tokens), honours ``should_cancel`` between tokens, and records every call.
- :class:`FakeDecoderStage` renders real files (PNG via Pillow, WAV via soundfile, bytes for video) whose
  content depends on the seed and the options, sleeping ``step_s`` per denoising step, calling ``on_step``
  and stopping when ``should_cancel()``; ``poison_seeds`` make a whole pipeline call raise; edits' ``sources`` are
  recorded in ``calls`` (the rendered content does not read them).
"""

from __future__ import annotations

import io
import threading
import time
from dataclasses import dataclass

import numpy as np

from polymodal.config import DecoderDefaults
from polymodal.modality import Modality
from polymodal.presets import get_preset
from polymodal.types import LLMResult, MediaPart, SignalGroup, TextDelta, TextPart

D_LLM = 16


class FakeLLMStage:
    def __init__(self, force_groups: bool = True, token_s: float = 0.0, fail_with: Exception | None = None,
                 volunteer: tuple[Modality, ...] = ()):
        self.force_groups = force_groups
        self.volunteer = tuple(volunteer)
        self.token_s = token_s
        self.fail_with = fail_with
        self.calls: list[dict] = []
        self.cancelled = 0
        self._lock = threading.Lock()

    def stream(self, turns, *, modalities=(), max_new_tokens=None, temperature=None, top_p=None, seed=None,
               should_cancel=None, system=None, allowed_modalities=None):
        with self._lock:
            self.calls.append(dict(turns=list(turns), modalities=list(modalities), max_new_tokens=max_new_tokens,
                                   temperature=temperature, top_p=top_p, seed=seed, system=system,
                                   allowed_modalities=None if allowed_modalities is None else list(allowed_modalities)))
        if self.fail_with is not None:
            raise self.fail_with
        last = turns[-1]
        media = [p for p in last.parts if isinstance(p, MediaPart)]
        words = " ".join(p.text for p in last.parts if isinstance(p, TextPart)).split()
        reply = ["Seen", str(len(media)), "media."] + [w.upper() for w in words][: (max_new_tokens or 24)]
        text = ""
        for w in reply:
            if should_cancel is not None and should_cancel():
                self.cancelled += 1
                return
            if self.token_s:
                time.sleep(self.token_s)
            delta = (" " if text else "") + w
            text += delta
            try:
                yield TextDelta(delta)
            except GeneratorExit:  # the consumer stopped early (cancelled)
                self.cancelled += 1
                raise
        index = 0
        rng = np.random.default_rng(seed)
        own = [m for m in self.volunteer if allowed_modalities is None or m in allowed_modalities]
        for m in own:  # the model's own groups, within its ceiling (the engine masks the rest)
            n = {Modality.IMAGE: 4, Modality.AUDIO: 8, Modality.VIDEO: 24}.get(m, m.spec.default_signal_count)
            yield SignalGroup(m, rng.standard_normal((n, D_LLM)).astype(np.float32),
                              np.zeros((n, D_LLM), np.float32), index=index, text_offset=len(text))
            index += 1
        if self.force_groups:
            for m in [m for m in modalities if m not in own]:
                n = {Modality.IMAGE: 4, Modality.AUDIO: 8, Modality.VIDEO: 24}.get(m, m.spec.default_signal_count)
                yield SignalGroup(m, rng.standard_normal((n, D_LLM)).astype(np.float32),
                                  np.zeros((n, D_LLM), np.float32), index=index, text_offset=len(text),
                                  forced=True)
                index += 1
        yield LLMResult(text=text, groups=(), prompt_tokens=7, completion_tokens=len(reply), finish_reason="stop")

    def describe(self):
        return {"llm": {"init_state": "random"}, "encoders": {}, "fake": True}


@dataclass(frozen=True)
class FakeMedium:
    modality: Modality
    data: np.ndarray
    seed: int
    sample_rate_hz: int | None = None
    fps: float | None = None

    @property
    def duration_s(self):
        if self.modality is Modality.AUDIO:
            return len(self.data) / self.sample_rate_hz
        if self.modality is Modality.VIDEO:
            return len(self.data) / self.fps
        return None

    def encode(self):
        if self.modality is Modality.IMAGE:
            from PIL import Image

            buf = io.BytesIO()
            Image.fromarray(self.data).save(buf, format="PNG")
            return buf.getvalue(), "image/png", "png"
        if self.modality is Modality.AUDIO:
            import soundfile as sf

            buf = io.BytesIO()
            sf.write(buf, self.data, self.sample_rate_hz, format="WAV", subtype="FLOAT")
            return buf.getvalue(), "audio/wav", "wav"
        return b"FAKEMP4" + self.data.tobytes()[:64], "video/mp4", "mp4"


class FakeDecodeError(Exception):
    def __init__(self, seed, reason):
        super().__init__(seed, reason)
        self.seed, self.reason = seed, reason

    @property
    def cancelled(self):
        return self.reason == "cancelled"


class FakeDecoderStage:
    def __init__(self, modality: Modality, defaults: DecoderDefaults, step_s: float = 0.0,
                 poison_seeds: tuple[int, ...] = (), degenerate_seeds: tuple[int, ...] = ()):
        self.modality = modality
        self.defaults = defaults
        self.init_state = "random"
        self.step_s = step_s
        self.poison_seeds = set(poison_seeds)
        self.degenerate_seeds = set(degenerate_seeds)
        self.calls: list[dict] = []
        self.steps = 0
        self._lock = threading.Lock()

    def describe(self):  # the edit kinds of the real decoders of each modality (tests/test_editing.py checks them)
        kinds = {Modality.IMAGE: ["whole", "masked"], Modality.VIDEO: ["whole"]}.get(self.modality, [])
        return {"init_state": self.init_state, "fake": True, "edit_kinds": kinds,
                "edit_options": ["strength"] if kinds else []}

    def render(self, groups, seeds, options=None, should_cancel=None, on_step=None, sources=None):
        options = options or self.defaults
        with self._lock:
            self.calls.append(dict(seeds=list(seeds), options=options, n=len(groups), sources=sources))
        for g in groups:
            if g.modality is not self.modality:
                raise ValueError(f"{g.modality.value} group sent to the {self.modality.value} decoder")
        if self.poison_seeds & set(seeds):
            raise RuntimeError("poisoned batch")
        for i in range(options.num_inference_steps):
            if should_cancel is not None and should_cancel():
                return [FakeDecodeError(s, "cancelled") for s in seeds]
            if self.step_s:
                time.sleep(self.step_s)
            self.steps += 1
            if on_step is not None:
                on_step(i)
        out = []
        for s in seeds:
            if s in self.degenerate_seeds:
                out.append(FakeDecodeError(s, "degenerate output: all black"))
                continue
            rng = np.random.default_rng(s)
            if self.modality is Modality.IMAGE:
                data = rng.integers(0, 256, (options.height_px, options.width_px, 3), dtype=np.uint8)
                out.append(FakeMedium(self.modality, data, s))
            elif self.modality is Modality.AUDIO:
                n = int(round(options.duration_s * 16000))
                out.append(FakeMedium(self.modality, (rng.random(n, dtype=np.float32) - 0.5), s, sample_rate_hz=16000))
            else:
                data = rng.integers(0, 256, (options.num_frames, options.height_px, options.width_px, 3), dtype=np.uint8)
                out.append(FakeMedium(self.modality, data, s, fps=options.fps))
        return out


def fake_stages(modalities=(Modality.IMAGE, Modality.AUDIO, Modality.VIDEO), step_s: float = 0.0, **decoder_kw):
    """(preset, FakeLLMStage, {modality: FakeDecoderStage}) for the tiny preset's decoder defaults."""
    preset = get_preset("tiny")
    preset = preset.model_copy(update={"decoders": {m: preset.decoders[m] for m in modalities}})
    decoders = {m: FakeDecoderStage(m, preset.decoders[m].defaults, step_s=step_s, **decoder_kw) for m in modalities}
    return preset, FakeLLMStage(), decoders


class ScriptedToolLLMStage:
    """A stand-in LLM that uses tools as a trained one would (the tiny preset's random LLM writes valid but random
    arguments): when the request offers tools and the last turn is the user's, it calls ``tool_choice``'s function
    (or the first tool) with ``script[name]`` as arguments; after ``tool`` turns it answers in text quoting the
    results it read. Records every call (tools offered, tool_choice, turns)."""

    def __init__(self, script: dict[str, dict]):
        self.script = dict(script)
        self.calls: list[dict] = []
        self._lock = threading.Lock()

    def stream(self, turns, *, modalities=(), max_new_tokens=None, temperature=None, top_p=None, seed=None,
               should_cancel=None, system=None, allowed_modalities=None, tools=(), tool_choice=None,
               parallel_tool_calls=True, response_format=None, logprobs=None, constraint_limits=None, task=None):
        import json

        from polymodal.types import ToolCall

        with self._lock:
            self.calls.append(dict(turns=list(turns), tools=[t.name for t in tools], tool_choice=tool_choice,
                                   modalities=list(modalities)))
            k = len(self.calls)
        last = turns[-1]
        if tools and last.role == "user" and (tool_choice is None or tool_choice.mode != "none"):
            name = tool_choice.name if tool_choice is not None and tool_choice.mode == "function" else tools[0].name
            call = ToolCall(f"call_{k}", name, json.dumps(self.script.get(name, {})))
            yield call
            yield LLMResult("", (), 10, 5, "tool_calls", tool_calls=(call,))
            return
        read = [p.text for t in turns if t.role == "tool" for p in t.parts if isinstance(p, TextPart)]
        text = "I read: " + " | ".join(read) if read else "No tool was used."
        yield TextDelta(text)
        yield LLMResult(text, (), 10, len(text.split()), "stop")

    def describe(self):
        return {"init_state": "scripted"}


class LargeMedium:
    """A rendered medium whose file is ``data`` as given (no encoding work): stands for real-size video or audio."""

    def __init__(self, data: bytes, seed: int):
        self.data, self.seed, self.duration_s = data, seed, None

    def encode(self):
        return self.data, "video/mp4", "mp4"


class LargeMediumStage(FakeDecoderStage):
    """A decoder stage whose every medium is the same ``size_bytes`` of random bytes (built once), so the ingress's
    own handling of a large answer (storing it, base64, JSON, sending) is all the work a request makes."""

    def __init__(self, modality: Modality, defaults: DecoderDefaults, size_bytes: int = 20 * 1024 * 1024):
        super().__init__(modality, defaults)
        self.payload = np.random.default_rng(0).integers(0, 256, size_bytes, dtype=np.uint8).tobytes()

    def render(self, groups, seeds, options=None, should_cancel=None, on_step=None):
        with self._lock:
            self.calls.append(dict(seeds=list(seeds), options=options, n=len(groups)))
        return [LargeMedium(self.payload, s) for s in seeds]
