"""Host-independent stage runners: the blocking model calls, off the event loop, with cancellation.

- :class:`LLMWorker` runs ``LLMStage.stream`` in a thread and hands its items to asyncio; cancelling the
  consumer sets a flag the LLM checks after every token.
- :class:`AdaptiveBatcher` forms decoder batches without a timer: a call that finds the decoder idle starts at
  once; calls that arrive while a batch runs go together into the next one (the wait is the busy time only).
- :class:`DecoderWorker` renders a batch of :class:`~services.protocol.RenderRequest` items: grouped by
  compatible settings (the whole :class:`~polymodal.config.DecoderDefaults`: size, steps, guidance,
  frames, fps, duration, strength; and for edits the source's shape and whether it has a mask), one seed per item, encoded to files. A pipeline call that raises is retried item
  by item, so only the bad item fails. A group stops at the next denoising step once every item in it is
  cancelled (an item cancelled while others of its group still want their result simply has its output
  dropped).

Both the Ray deployments (:mod:`services.deployments`) and the in-process backend (:mod:`services.local`)
use these, so batching, seeds, failure isolation and cancellation behave the same on both hosts.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import os
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from polymodal.modality import Modality
from polymodal.types import LLMResult, TextDelta

from services.errors import Cancelled, RenderFailed
from services.protocol import (
    DecoderStageLike,
    EncodedMedium,
    LLMEvent,
    LLMRequest,
    LLMStageLike,
    RenderRequest,
)

log = logging.getLogger(__name__)

_END = object()

STREAM_WINDOW_S = 0.03
"""Text of a streamed answer reaches the consumer at most this long after it was generated, in one list
(:meth:`LLMWorker.stream_chunks`; the LLM deployment sends one list per Ray stream item)."""


class LLMWorker:
    """Streams an ``LLMStage`` (blocking iterator) into asyncio, one generation at a time per worker.

    Args:
        stage: the LLM stage (:class:`~services.protocol.LLMStageLike`: ``stream(turns, *, modalities,
            max_new_tokens, temperature, top_p, seed, should_cancel, system, task, allowed_modalities, and the output
            formats of ``LLMRequest.format_kwargs``)`` yielding ``TextDelta | SignalGroup | ToolCall`` and finally
            ``LLMResult``).
        max_concurrency: generations run at once (the model is shared; 1 keeps the KV cache loop simple).
    """

    def __init__(self, stage: LLMStageLike, max_concurrency: int = 1):
        self.stage = stage
        self._slots = threading.Semaphore(max_concurrency)
        self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=64, thread_name_prefix="llm")
        self.healthy = True

    def _run(self, req: LLMRequest, cancel: threading.Event, put: Callable[[Any], None]) -> None:
        with self._slots:
            if cancel.is_set():
                put(_END)
                return
            try:
                kwargs = dict(
                    modalities=list(req.modalities),
                    max_new_tokens=req.max_new_tokens,
                    temperature=req.temperature,
                    top_p=req.top_p,
                    seed=req.seed,
                    should_cancel=cancel.is_set,
                )
                if req.system is not None:
                    kwargs["system"] = req.system
                if req.task is not None:
                    kwargs["task"] = req.task
                if req.allowed_modalities is not None:
                    kwargs["allowed_modalities"] = list(req.allowed_modalities)
                kwargs.update(req.format_kwargs())
                for item in self.stage.stream(list(req.turns), **kwargs):
                    put(item)
                    if cancel.is_set():
                        break
            except BaseException as e:  # handed to the consumer, which re-raises it
                if is_fatal(e):
                    self.healthy = False
                put(e)
            put(_END)

    async def stream(self, req: LLMRequest) -> AsyncIterator[LLMEvent]:
        """Yield the stage's items; cancelling the consumer (or closing the generator) stops the LLM.

        Raises:
            whatever the stage raises (``ValueError`` for a bad conversation).
        """
        async for chunk in self.stream_chunks(req, window_s=0.0):
            for item in chunk:
                yield item

    async def stream_chunks(self, req: LLMRequest, window_s: float) -> AsyncIterator[list[LLMEvent]]:
        """The items of :meth:`stream` in lists, gathered on the generating thread: the first text delta goes out
        alone at once (time to first token); later ones gather for up to ``window_s`` seconds (a list goes out with
        the first delta after its window closed); any other item (a signal group, a tool call, the result) sends
        its list at once. ``window_s=0``: one item per list. Gathering before the hand-over, not after it, wakes
        the event loop once per list instead of once per token (~0.25 ms per token on one CPU thread, issue #30).
        A request with ``stream_text=False`` (a whole answer) sends text only with the next other item.

        Raises:
            whatever the stage raises (``ValueError`` for a bad conversation).
        """
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        cancel = threading.Event()
        chunk: list[Any] = []
        opened = 0.0
        first = req.stream_text
        if not req.stream_text:
            window_s = float("inf")

        def send(x: Any) -> None:
            try:
                loop.call_soon_threadsafe(queue.put_nowait, x)
            except RuntimeError:  # loop closed: the consumer is gone
                cancel.set()

        def put(item: Any) -> None:  # on the generating thread
            nonlocal chunk, opened, first
            if item is _END or isinstance(item, BaseException):
                if chunk:
                    send(chunk)
                    chunk = []
                send(item)
                return
            if not chunk:
                opened = time.monotonic()
            chunk.append(item)
            if first or not isinstance(item, TextDelta) or time.monotonic() - opened >= window_s:
                send(chunk)
                chunk = []
                first = False

        loop.run_in_executor(self._executor, self._run, req, cancel, put)
        try:
            while True:
                got = await queue.get()
                if got is _END:
                    return
                if isinstance(got, BaseException):
                    raise got
                yield got
                if isinstance(got[-1], LLMResult):
                    return
        finally:
            cancel.set()

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)


@dataclass
class DecoderCounters:
    """Monotonic counters of one decoder (thread-safe), exported at ``/metrics``.

    ``steps``: denoising steps run (one per pipeline step, whatever the batch size); ``batches`` /
    ``batch_items``: pipeline calls and the items they carried; ``max_batch_size``; ``cancelled``: items
    cancelled; ``failed``: items that could not be rendered.
    """

    steps: int = 0
    batches: int = 0
    batch_items: int = 0
    max_batch_size: int = 0
    cancelled: int = 0
    failed: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def add(self, **deltas: int) -> None:
        with self._lock:
            for k, v in deltas.items():
                if k == "max_batch_size":
                    self.max_batch_size = max(self.max_batch_size, v)
                else:
                    setattr(self, k, getattr(self, k) + v)

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return {k: getattr(self, k) for k in ("steps", "batches", "batch_items", "max_batch_size",
                                                   "cancelled", "failed")}


@dataclass
class BatchItem:
    """One render request waiting in a batch, with its own cancellation flag."""

    request: RenderRequest
    cancel: threading.Event = field(default_factory=threading.Event)


def _batch_key(request: RenderRequest) -> tuple:
    """What the items of one pipeline call share: every option, and the edit source's shape and mask-ness (edits
    and generations never share a call)."""
    source = None if request.source is None else request.source.signature
    return tuple(sorted(request.options.model_dump().items())), source


class DecoderWorker:
    """Renders batches with a ``DecoderStage`` (blocking; call from a worker thread).

    Args:
        stage: the decoder stage (:class:`~services.protocol.DecoderStageLike`: ``modality``, ``defaults`` and
            ``render(groups, seeds, options, should_cancel, on_step) -> list[Medium | DecodeError]``;
            ``decoders``: ``Medium.encode() -> (bytes, mime, ext)``, ``DecodeError.cancelled``).
        counters: where steps and batches are counted.
    """

    def __init__(self, stage: DecoderStageLike, counters: DecoderCounters | None = None):
        self.stage = stage
        self.modality: Modality = Modality.parse(stage.modality)
        self.counters = counters or DecoderCounters()
        self.healthy = True
        self.last_error: str | None = None

    def run_batch(self, items: list[BatchItem]) -> list[EncodedMedium | Exception]:
        """Render ``items`` -> one result per item, in order: an :class:`EncodedMedium`, a
        :class:`~services.errors.RenderFailed` or :class:`~services.errors.Cancelled`. Never raises for
        one item's failure."""
        results: list[EncodedMedium | Exception | None] = [None] * len(items)
        groups: dict[tuple, list[int]] = {}
        for i, it in enumerate(items):
            groups.setdefault(_batch_key(it.request), []).append(i)
        for idx in groups.values():
            live = [i for i in idx if not items[i].cancel.is_set()]
            for i in idx:
                if items[i].cancel.is_set():
                    results[i] = Cancelled("cancelled before rendering")
                    self.counters.add(cancelled=1)
            if not live:
                continue
            out = self._render([items[i] for i in live])
            if out is None:  # the whole call raised: retry one by one so only the bad item fails
                out = []
                for i in live:
                    single = self._render([items[i]])
                    out.extend(single if single is not None else [RenderFailed(
                        f"the {self.modality.value} decoder failed on this item: {self.last_error}")])
            for i, r in zip(live, out):
                results[i] = r
        return results  # type: ignore[return-value]

    def _render(self, batch: list[BatchItem]) -> list[EncodedMedium | Exception] | None:
        """One pipeline call; ``None`` if it raised (the error is kept in ``last_error``)."""
        reqs = [b.request for b in batch]
        self.counters.add(batches=1, batch_items=len(batch), max_batch_size=len(batch))
        edits = {} if reqs[0].source is None else {"sources": [r.source for r in reqs]}
        try:
            raw = self.stage.render(
                [r.group for r in reqs],
                [r.seed for r in reqs],
                reqs[0].options,
                should_cancel=lambda: all(b.cancel.is_set() for b in batch),
                on_step=lambda i: self.counters.add(steps=1),
                **edits,
            )
            if len(raw) != len(batch):
                raise RuntimeError(f"decoder returned {len(raw)} results for {len(batch)} items")
        except Exception as e:  # noqa: BLE001 - isolated per item by the caller
            self.last_error = f"{type(e).__name__}: {e}"
            log.warning("%s decoder batch of %d failed: %s", self.modality.value, len(batch), self.last_error)
            self._note_fatal(e)
            return None
        out: list[EncodedMedium | Exception] = []
        live = [not (b.cancel.is_set() or getattr(r, "cancelled", False) or isinstance(r, Exception))
                for b, r in zip(batch, raw)]
        encoded = _encode_all([r if ok else None for r, ok in zip(raw, live)])
        for b, r, enc in zip(batch, raw, encoded):
            req = b.request
            if b.cancel.is_set() or getattr(r, "cancelled", False):
                self.counters.add(cancelled=1)
                out.append(Cancelled("cancelled"))
            elif isinstance(r, Exception):
                self.counters.add(failed=1)
                out.append(RenderFailed(f"the {self.modality.value} decoder could not render this item "
                                        f"(seed {req.seed}): {getattr(r, 'reason', r)}"))
            elif isinstance(enc, Exception):
                self.counters.add(failed=1)
                out.append(RenderFailed(f"encoding the {self.modality.value} failed: {enc}"))
            else:
                data, mime, ext = enc
                out.append(EncodedMedium(
                    modality=self.modality, data=data, mime_type=mime, ext=ext, seed=req.seed,
                    index=req.group.index, text_offset=req.group.text_offset, batch_size=len(batch),
                    duration_s=getattr(r, "duration_s", None),
                ))
        return out

    def _note_fatal(self, e: Exception) -> None:
        if is_fatal(e):
            self.healthy = False


# the files of one batch are encoded side by side: PNG's zlib, soundfile and PyAV release the GIL, and a batch of
# eight 512 px PNGs one after another cost ~0.6 s on an H200 machine's CPU next to ~2.7 s of diffusion
_ENCODERS = concurrent.futures.ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1),
                                                  thread_name_prefix="encode")


def _encode_all(media: list) -> list[tuple[bytes, str, str] | Exception | None]:
    """``Medium.encode()`` of each medium of a batch, side by side -> per item its ``(bytes, mime, ext)``, the
    exception it raised, or ``None`` where the item is ``None`` (failed or cancelled: nothing to encode)."""
    def one(m):
        if m is None:
            return None
        try:
            return m.encode()
        except Exception as e:  # noqa: BLE001 - this item fails, the others are kept
            return e

    return [one(media[0])] if len(media) == 1 else list(_ENCODERS.map(one, media))


def is_fatal(e: BaseException) -> bool:
    """An accelerator fault (CUDA error, device-side assert) leaves a replica unusable: its health check
    fails so Ray Serve replaces it. A CUDA out-of-memory error is not fatal (the next, smaller batch may fit)."""
    text = str(e).lower()
    return "cuda error" in text or "device-side assert" in text


BATCH_POLICIES = ("adaptive", "timeout")
"""How a decoder deployment forms batches: ``adaptive`` (:class:`AdaptiveBatcher`: no timer, a lone request
starts at once, requests arriving while the decoder is busy share the next call) or ``timeout`` (Ray's
``@serve.batch``: a batch waits up to ``batch_wait_timeout_s`` after its first item to fill)."""


def check_batch_policy(name: str) -> str:
    """``name`` if it is one of :data:`BATCH_POLICIES`.

    Raises:
        ValueError: another name (the message lists the choices).
    """
    if name not in BATCH_POLICIES:
        raise ValueError(f"unknown batch policy {name!r}; choices: {', '.join(BATCH_POLICIES)}")
    return name


class AdaptiveBatcher:
    """Batches concurrent calls with no timer: the wait for a batch is the time the decoder is busy.

    A call that finds the runner idle starts at once, alone (a lone request pays no batch wait); calls that arrive
    while a batch runs queue up and go together, up to ``max_batch_size``, as soon as it ends. Right after a batch of
    n > 1 ends, its callers are likely to come back together (closed-loop clients: a chat UI, an agent, a bench);
    the next batch then waits, from that end, at most ``regroup_fraction`` of that batch's run time for the queue
    to hold n again, instead of starting the first comer alone and the rest behind it (on a GPU a batch of 1 costs
    nearly what a batch of 8 does: measured on an H200, 8 clients formed batches of 1 and 7 in turn, and a fixed
    20 ms window was too short for eight 512 px results to travel back). The window scales with the work, so it
    costs at most that fraction of one batch's time. A request after an idle spell, or after a batch of 1, never
    waits. A caller cancelled
    while queued is dropped before its batch starts; one cancelled while its batch runs has its result dropped
    (set ``BatchItem.cancel`` so the step callback can stop the work).

    Args:
        run: ``async run(items) -> one result per item`` (e.g. a :class:`DecoderWorker` batch in a thread); one
            call at a time.
        max_batch_size: most items per call.
        regroup_fraction: after a batch of n > 1, the next batch waits for n callers at most this fraction of the
            last batch's run time (0: never; 0.05 = 5%).

    Raises:
        ValueError: ``max_batch_size`` < 1 or ``regroup_fraction`` outside [0, 1].
    """

    def __init__(self, run: Callable[[list[Any]], Awaitable[list[Any]]], max_batch_size: int,
                 regroup_fraction: float = 0.0):
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        if not 0 <= regroup_fraction <= 1:
            raise ValueError(f"regroup_fraction must be in [0, 1], got {regroup_fraction}")
        self._run = run
        self.max_batch_size = int(max_batch_size)
        self.regroup_fraction = float(regroup_fraction)
        self._last_size = 0  # size, run time and end (loop time) of the last batch
        self._last_run_s = 0.0
        self._last_end = 0.0
        self._queue: deque[tuple[Any, asyncio.Future]] = deque()
        self._wake = asyncio.Event()  # bound to a loop at first use (Python >= 3.10)
        self._task: asyncio.Task | None = None
        self.batch_sizes: list[int] = []  # sizes of the calls made so far (tests, benches)

    async def submit(self, item: Any) -> Any:
        """Queue ``item`` -> its result (raises what ``run`` raised for its batch)."""
        loop = asyncio.get_running_loop()
        if self._task is None or self._task.done():
            self._task = loop.create_task(self._loop())
        fut = loop.create_future()
        self._queue.append((item, fut))
        self._wake.set()
        return await fut

    async def _regroup(self) -> None:
        """Right after a batch of n > 1: wait (until ``regroup_fraction`` of its run time past its end) for n
        queued callers."""
        want = min(self._last_size, self.max_batch_size)
        deadline = self._last_end + self.regroup_fraction * self._last_run_s
        loop = asyncio.get_running_loop()
        while want > 1 and len(self._queue) < want and (left := deadline - loop.time()) > 0:
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), left)
            except asyncio.TimeoutError:
                return

    async def _loop(self) -> None:
        while True:
            while not self._queue:
                self._wake.clear()
                await self._wake.wait()
            await self._regroup()
            batch: list[tuple[Any, asyncio.Future]] = []
            while self._queue and len(batch) < self.max_batch_size:
                item, fut = self._queue.popleft()
                if not fut.done():  # a cancelled caller's item is dropped here
                    batch.append((item, fut))
            if not batch:
                continue
            self.batch_sizes.append(len(batch))
            start = asyncio.get_running_loop().time()
            try:
                try:
                    results = await self._run([item for item, _ in batch])
                finally:
                    self._last_end = asyncio.get_running_loop().time()
                    self._last_size, self._last_run_s = len(batch), self._last_end - start
            except asyncio.CancelledError:
                for _, fut in batch:
                    fut.cancel()
                raise
            except Exception as e:  # noqa: BLE001 - handed to every caller of the batch
                for _, fut in batch:
                    if not fut.done():
                        fut.set_exception(e)
                continue
            for (_, fut), r in zip(batch, results):
                if not fut.done():
                    fut.set_result(r)
