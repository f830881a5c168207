"""Bounded admission: at most ``max_concurrent_requests`` generation requests at once per ingress replica;
one more is refused with :class:`services.errors.Overloaded` (503 + ``Retry-After``), never queued without
bound."""

from __future__ import annotations

from services.errors import Overloaded
from services.metrics import APIMetrics


class Admission:
    """At most ``limit`` generation requests at once, else :class:`Overloaded`.

    Args:
        limit: slots (``ServerSettings.max_concurrent_requests``).
        retry_after_s: the ``Retry-After`` sent with the 503.
        metrics: ``inflight`` follows the slots held; ``rejected{reason="overloaded"}`` counts refusals.
    """

    def __init__(self, limit: int, retry_after_s: int, metrics: APIMetrics):
        self.limit, self.retry_after_s, self.metrics = limit, retry_after_s, metrics
        self.active = 0

    def acquire(self) -> Slot:
        """Take a slot (release it however the request ends).

        Raises:
            Overloaded: every slot is taken.
        """
        if self.active >= self.limit:
            self.metrics.rejected.labels("overloaded").inc()
            raise Overloaded(f"the server is at capacity ({self.limit} requests running); retry later",
                             self.retry_after_s)
        self.active += 1
        self.metrics.inflight.set(self.active)
        return Slot(self)


class Slot:
    """One held admission slot; :meth:`release` is idempotent."""

    def __init__(self, adm: Admission):
        self._adm, self._held = adm, True

    def release(self) -> None:
        if self._held:
            self._held = False
            self._adm.active -= 1
            self._adm.metrics.inflight.set(self._adm.active)
