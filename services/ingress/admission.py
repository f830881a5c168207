"""Admission by what the service can finish: a generation request is refused up front (503 + ``Retry-After``)
when it would not finish within the request timeout, instead of being run and cancelled with a 504.

The estimate, per ingress replica (every request of a replica goes through the same stages):

- Each request that runs to its end reports its latency ``L`` and how many requests were in flight when it was
  admitted (``ahead``). ``L / (ahead + 1)`` is how long one place in the queue took: the seconds per place.
  An exponentially weighted moving average (EWMA, weight :data:`EWMA_WEIGHT` for the newest) is kept per *kind*
  (the endpoint and the media asked for: ``chat``, ``chat:image``, ``images``, ...) and over all kinds.
- A new request of kind ``k`` with ``ahead`` requests in flight is predicted to finish in
  ``(ahead + 1) * seconds_per_place[k]`` (the kind's EWMA, else the overall one). Over
  ``admission_target * request_timeout_s`` it is refused; ``Retry-After`` is the time the queue needs to drain
  to where it would fit (at least ``retry_after_s``).
- Before any request has finished (a cold start) nothing is known: at most ``admission_cold_start`` requests
  are let in, so a burst at start-up cannot fill the queue with work that would time out.
- Never more than ``max_concurrent_requests`` at once, whatever the estimate (a bounded queue).

503, not 429: the refusal is the server's state (overload), not the caller's rate; OpenAI answers 503 when its
engine is overloaded and 429 for a key's rate limits. Requests that end in an error (4xx, 5xx, cancelled) do not
feed the estimate.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

from services.errors import Overloaded
from services.metrics import APIMetrics

EWMA_WEIGHT = 0.2
"""Weight of the newest measurement in the seconds-per-place averages."""


class Admission:
    """Admits generation requests by their predicted latency (see the module docstring).

    Args:
        limit: most requests at once (``ServerSettings.max_concurrent_requests``).
        retry_after_s: the least ``Retry-After`` sent with the 503.
        metrics: ``inflight`` follows the slots held; ``rejected{reason="overloaded"|"predicted_timeout"}``.
        timeout_s: the request timeout (``request_timeout_s``).
        target: admit while the predicted latency is at most ``target * timeout_s``.
        cold_start: requests let in at once before any has finished.
        clock: monotonic seconds (tests).
    """

    def __init__(self, limit: int, retry_after_s: int, metrics: APIMetrics, timeout_s: float = 120.0,
                 target: float = 0.8, cold_start: int = 8, clock: Callable[[], float] = time.monotonic):
        self.limit, self.retry_after_s, self.metrics = limit, retry_after_s, metrics
        self.timeout_s, self.target, self.cold_start, self.clock = timeout_s, target, cold_start, clock
        self.active = 0
        self.per_place_s: dict[str, float] = {}
        self.overall_per_place_s: float | None = None

    @property
    def budget_s(self) -> float:
        """The latency a request may be predicted to take and still be admitted."""
        return self.target * self.timeout_s

    def seconds_per_place(self, kind: str) -> float | None:
        """The kind's EWMA of seconds per queue place (the overall one for a kind not seen yet; ``None`` before
        any request finished)."""
        return self.per_place_s.get(kind, self.overall_per_place_s)

    def predicted_s(self, kind: str, ahead: int | None = None) -> float | None:
        """Predicted latency of a request of ``kind`` admitted now (``None``: nothing measured yet)."""
        per_place = self.seconds_per_place(kind)
        ahead = self.active if ahead is None else ahead
        return None if per_place is None else (ahead + 1) * per_place

    def acquire(self, kind: str = "chat") -> Slot:
        """Take a slot for a request of ``kind`` (release it however the request ends).

        Raises:
            Overloaded: 503 with ``Retry-After``: every slot is taken, the request would not finish within the
            timeout, or (cold start) ``cold_start`` requests already run.
        """
        ahead = self.active
        if ahead >= self.limit:
            self._refuse("overloaded", f"the server is at capacity ({self.limit} requests running); retry later",
                         self.retry_after_s)
        per_place = self.seconds_per_place(kind)
        if per_place is None:
            if ahead >= self.cold_start:
                self._refuse("overloaded", f"the server is starting up ({ahead} requests running, none finished "
                             "yet); retry later", self.retry_after_s)
        elif (ahead + 1) * per_place > self.budget_s:
            fits = max(0, math.floor(self.budget_s / per_place) - 1)  # places ahead that still fit the budget
            wait_s = (ahead - fits) * per_place
            self._refuse("predicted_timeout",
                         f"the server is busy: with {ahead} requests ahead this one would take about "
                         f"{(ahead + 1) * per_place:.0f} s, over the {self.timeout_s:g} s request timeout; "
                         f"retry in about {math.ceil(wait_s)} s", max(self.retry_after_s, math.ceil(wait_s)))
        self.active += 1
        self.metrics.inflight.set(self.active)
        return Slot(self, kind, ahead)

    def _refuse(self, reason: str, message: str, retry_after_s: int) -> None:
        self.metrics.rejected.labels(reason).inc()
        raise Overloaded(message, retry_after_s)

    def record(self, kind: str, latency_s: float, ahead: int) -> None:
        """A request of ``kind`` admitted with ``ahead`` in flight finished after ``latency_s``."""
        sample = max(0.0, latency_s) / (ahead + 1)
        old = self.per_place_s.get(kind)
        self.per_place_s[kind] = sample if old is None else (1 - EWMA_WEIGHT) * old + EWMA_WEIGHT * sample
        old = self.overall_per_place_s
        self.overall_per_place_s = sample if old is None else (1 - EWMA_WEIGHT) * old + EWMA_WEIGHT * sample

    def snapshot(self) -> dict[str, float | int | dict[str, float]]:
        """The estimator's state (for ``/metrics`` readers and tests)."""
        return {"active": self.active, "per_place_s": dict(self.per_place_s),
                "overall_per_place_s": self.overall_per_place_s or 0.0}


class Slot:
    """One held admission slot. :meth:`completed` (once the work ran to its end) feeds the estimate;
    :meth:`release` frees the slot and is idempotent."""

    def __init__(self, adm: Admission, kind: str = "chat", ahead: int = 0):
        self._adm, self._held = adm, True
        self.kind, self.ahead = kind, ahead
        self.started = adm.clock()
        self._recorded = False

    def completed(self) -> None:
        """The request's work ran to its end now: record its latency (once)."""
        if not self._recorded:
            self._recorded = True
            self._adm.record(self.kind, self._adm.clock() - self.started, self.ahead)

    def release(self) -> None:
        if self._held:
            self._held = False
            self._adm.active -= 1
            self._adm.metrics.inflight.set(self._adm.active)
