"""Dialogue LLM backends (one registry): ``preset`` (in-process polymodal LLM), ``openai`` (any
OpenAI-compatible chat endpoint), ``scripted`` (no model; deterministic, for dry runs and tests),
``factory`` (your own ``module:callable``).

Every backend has ``chat(messages, *, max_new_tokens, temperature, top_p, seed) -> str`` over
OpenAI-style ``{"role", "content"}`` messages, like :meth:`polymodal.pipeline.LLMStage.chat`, and a
``max_concurrency`` (how many dialogues a shard may write at once).
"""

from __future__ import annotations

import hashlib
import importlib
import logging
import os
import random
import re
import threading
import time
from collections.abc import Callable
from typing import Protocol

from mosit.config import LLMBackendConfig

log = logging.getLogger(__name__)


class ChatLLM(Protocol):
    max_concurrency: int

    def chat(self, messages: list[dict[str, str]], *, max_new_tokens: int = 128, temperature: float = 0.7,
             top_p: float = 0.9, seed: int | None = None) -> str: ...


class LLMRequestError(RuntimeError):
    """A chat request failed for good (a non-retryable answer, or retries exhausted)."""


def import_object(spec: str):
    """``"package.module:attr"`` -> the object.

    Raises:
        ValueError: malformed spec, missing module or attribute.
    """
    mod, sep, attr = spec.partition(":")
    if not sep or not mod or not attr:
        raise ValueError(f"expected 'module:attribute', got {spec!r}")
    try:
        obj = importlib.import_module(mod)
    except ImportError as e:
        raise ValueError(f"cannot import {mod!r} for {spec!r}: {e}") from e
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"{mod!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    return obj


class PresetLLM:
    """A polymodal preset's LLM in this process (``build_llm_stage(get_preset(name)).chat``); one call at
    a time (``max_concurrency = 1``)."""

    max_concurrency = 1

    def __init__(self, preset: str = "smol"):
        from polymodal.pipeline import build_llm_stage
        from polymodal.presets import get_preset

        self.stage = build_llm_stage(get_preset(preset))
        self._lock = threading.Lock()

    def chat(self, messages, *, max_new_tokens=128, temperature=0.7, top_p=0.9, seed=None) -> str:
        with self._lock:
            return self.stage.chat(messages, max_new_tokens=max_new_tokens, temperature=temperature,
                                   top_p=top_p, seed=seed)


RETRY_STATUS = frozenset({408, 409, 425, 429, 500, 502, 503, 504})


class OpenAIChatLLM:
    """``POST {base_url}/chat/completions`` with at most ``max_concurrency`` requests in flight and
    retries with exponential backoff (``backoff_s * 2**attempt``, capped at ``max_backoff_s``; a
    ``Retry-After`` header wins) on connection errors, timeouts and 408/409/425/429/5xx.

    Raises (from ``chat``):
        LLMRequestError: a non-retryable status (e.g. 400, 401) or retries exhausted.
    """

    def __init__(self, base_url: str, model: str, *, api_key: str | None = None, max_concurrency: int = 4,
                 max_retries: int = 5, backoff_s: float = 0.5, max_backoff_s: float = 30.0,
                 timeout_s: float = 120.0, sleep: Callable[[float], None] = time.sleep):
        import httpx

        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model = model
        self.max_concurrency = max_concurrency
        self.max_retries = max_retries
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        self._sleep = sleep
        self._slots = threading.BoundedSemaphore(max_concurrency)
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._httpx = httpx
        self._client = httpx.Client(timeout=timeout_s, headers=headers,
                                    limits=httpx.Limits(max_connections=max_concurrency))
        self.retries = 0  # total retries made (for the summary)

    def _delay(self, attempt: int, retry_after: str | None) -> float:
        if retry_after:
            try:
                return min(float(retry_after), self.max_backoff_s)
            except ValueError:
                pass
        return min(self.backoff_s * (2 ** attempt), self.max_backoff_s)

    def chat(self, messages, *, max_new_tokens=128, temperature=0.7, top_p=0.9, seed=None) -> str:
        body = {"model": self.model, "messages": list(messages), "max_tokens": max_new_tokens,
                "temperature": temperature, "top_p": top_p}
        if seed is not None:
            body["seed"] = int(seed)
        last = ""
        for attempt in range(self.max_retries + 1):
            retry_after = None
            with self._slots:
                try:
                    r = self._client.post(self.url, json=body)
                except (self._httpx.TransportError,) as e:
                    last = f"{type(e).__name__}: {e}"
                else:
                    if r.status_code == 200:
                        try:
                            return str(r.json()["choices"][0]["message"]["content"] or "").strip()
                        except (ValueError, KeyError, IndexError, TypeError) as e:
                            raise LLMRequestError(f"{self.url}: malformed chat completion: {e}") from e
                    last = f"HTTP {r.status_code}: {r.text[:200]}"
                    if r.status_code not in RETRY_STATUS:
                        raise LLMRequestError(f"{self.url}: {last}")
                    retry_after = r.headers.get("retry-after")
            if attempt < self.max_retries:
                self.retries += 1
                delay = self._delay(attempt, retry_after)
                log.warning("chat request failed (%s); retry %d/%d in %.2fs", last, attempt + 1, self.max_retries, delay)
                self._sleep(delay)
        raise LLMRequestError(f"{self.url}: gave up after {self.max_retries + 1} attempts; last error: {last}")


_QUOTED = re.compile(r'"([^"]{3,})"')
_ABOUT = re.compile(r"\babout (.+?)\.? Write only", re.IGNORECASE)
_OPENERS = ("", "I think ", "Maybe ", "Well, ", "Honestly, ")
_QUESTIONS = ("What can you tell me about {}?", "I keep wondering about {}. Any thoughts?", "Tell me about {}.",
              "Do you know anything about {}?", "How would you explain {}?", "Why do people care about {}?")


def _cap(text: str) -> str:
    return text[:1].upper() + text[1:]


class ScriptedLLM:
    """No model: an offline, deterministic writer for dry runs and tests.

    It echoes the subject of the last user message (what a question prompt asks ``about``, else the last
    double-quoted phrase - the per-turn prompts quote their topic or caption - else the last words) inside
    a template chosen by ``hash(messages, seed)``. ``delay_s`` simulates latency per call.
    """

    def __init__(self, delay_s: float = 0.0, max_concurrency: int = 1):
        self.delay_s = float(delay_s)
        self.max_concurrency = int(max_concurrency)

    def chat(self, messages, *, max_new_tokens=128, temperature=0.7, top_p=0.9, seed=None) -> str:
        if self.delay_s:
            time.sleep(self.delay_s)
        last = next((m["content"] for m in reversed(messages) if m["role"] == "user"), "")
        about, quoted = _ABOUT.search(last), _QUOTED.findall(last)
        key = repr((messages, seed)).encode()
        rng = random.Random(int.from_bytes(hashlib.sha256(key).digest()[:8], "big"))
        low = last.lower()
        if "question" in low and about:
            return _cap(rng.choice(_QUESTIONS).format(about.group(1).replace('"', "")))
        subject = quoted[-1] if quoted else " ".join(last.split()[-8:])
        if "caption" in low or "describe" in low:
            return _cap(subject.rstrip(".") + ".")
        m = re.search(r"about (.+?)[?.!]", last)
        subject = m.group(1) if m else subject.rstrip(".?!")
        return _cap(f"{rng.choice(_OPENERS)}{subject} is a lovely thing to talk about. Ask me more.")


def build_chat_llm(cfg: LLMBackendConfig) -> ChatLLM:
    """Instantiate the configured backend.

    Raises:
        ValueError: unknown kind (lists the choices) or a factory that cannot be imported.
    """
    if cfg.kind == "preset":
        return PresetLLM(cfg.preset)
    if cfg.kind == "openai":
        key = os.environ.get(cfg.api_key_env) if cfg.api_key_env else None
        if cfg.api_key_env and not key:
            raise ValueError(f"llm.api_key_env names {cfg.api_key_env!r} but that variable is not set")
        return OpenAIChatLLM(cfg.base_url, cfg.model, api_key=key, max_concurrency=cfg.max_concurrency,
                             max_retries=cfg.max_retries, backoff_s=cfg.backoff_s, max_backoff_s=cfg.max_backoff_s,
                             timeout_s=cfg.timeout_s)
    if cfg.kind == "scripted":
        return ScriptedLLM(**{"max_concurrency": cfg.max_concurrency, **cfg.options})
    if cfg.kind == "factory":
        llm = import_object(cfg.factory)(**cfg.options)
        if not hasattr(llm, "max_concurrency"):
            llm.max_concurrency = cfg.max_concurrency
        return llm
    raise ValueError(f"unknown llm kind {cfg.kind!r}; choose from: preset, openai, scripted, factory")
