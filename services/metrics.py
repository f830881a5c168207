"""Prometheus metrics of the HTTP API (``/metrics``).

Ingress metrics live in a registry per app (several apps can share a process in tests); decoder counters
come from the backend (:meth:`services.protocol.Backend.stats`: on Ray, summed over every decoder replica
by the stats deployment) and are exposed with the same text format:

- ``polymodal_requests_total{endpoint,status}``, ``polymodal_request_duration_seconds{endpoint}``
- ``polymodal_inflight_requests``; ``polymodal_rejected_total{reason}`` (overloaded, timeout, disconnect,
  unauthorized, too_large)
- ``polymodal_media_total{modality}`` media returned
- streaming latencies, named as the field names them (vLLM / vLLM-Omni's bench vocabulary), measured in the ingress
  from the moment a chat plan starts (the request read and validated):
  ``polymodal_time_to_first_token_seconds`` (the first text reached the ingress) and
  ``polymodal_time_per_output_token_seconds`` (from the first to the last token, per token after the first) for
  answers whose text streams (``stream: true``, spoken answers: the text of a whole answer crosses from the LLM
  with its signal groups, ``LLMRequest.stream_text``, so it has no time per token); for every chat answer:
  ``polymodal_time_to_first_medium_seconds{modality}`` (the answer's first medium of that modality was ready),
  ``polymodal_e2e_request_latency_seconds`` (the whole answer ready)
- ``polymodal_decoder_steps_total{modality}`` denoising steps run (stops growing when a request is
  cancelled), ``polymodal_decoder_batches_total``, ``polymodal_decoder_batch_items_total``,
  ``polymodal_decoder_max_batch_size``, ``polymodal_decoder_cancelled_total``, ``polymodal_decoder_failed_total``,
  ``polymodal_decoder_retried_total`` (renders sent again after their replica died)
"""

from __future__ import annotations

import time
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
LATENCY_BUCKETS_S = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
TOKEN_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)

STREAMING_METRICS = {
    "time_to_first_token": "polymodal_time_to_first_token_seconds",
    "time_per_output_token": "polymodal_time_per_output_token_seconds",
    "time_to_first_medium": "polymodal_time_to_first_medium_seconds",
    "e2e_request_latency": "polymodal_e2e_request_latency_seconds",
}
"""The streaming latencies' names in the field's vocabulary -> their histograms here."""


def histogram_means(text: str) -> dict[str, dict[str, float]]:
    """From an exposition text (``/metrics``): each :data:`STREAMING_METRICS` histogram's ``{label or "": mean
    seconds}`` (``_sum / _count``; labels joined as ``k=v``), only those observed at least once."""
    import re

    out: dict[str, dict[str, float]] = {}
    for key, name in STREAMING_METRICS.items():
        sums: dict[str, float] = {}
        counts: dict[str, float] = {}
        for m in re.finditer(rf"^{name}_(sum|count)(?:{{([^}}]*)}})? (\S+)$", text, re.M):
            label = ",".join(x.replace('"', "") for x in (m.group(2) or "").split(",") if x)
            (sums if m.group(1) == "sum" else counts)[label] = float(m.group(3))
        means = {k: sums[k] / c for k, c in counts.items() if c > 0 and k in sums}
        if means:
            out[key] = means
    return out


class APIMetrics:
    """The ingress's own metrics, in their own registry."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter("polymodal_requests", "HTTP API requests", ["endpoint", "status"], registry=r)
        self.duration = Histogram("polymodal_request_duration_seconds", "Request latency", ["endpoint"],
                                  buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300), registry=r)
        self.inflight = Gauge("polymodal_inflight_requests", "Generation requests running", registry=r)
        self.rejected = Counter("polymodal_rejected", "Requests refused or stopped", ["reason"], registry=r)
        self.media = Counter("polymodal_media", "Media returned", ["modality"], registry=r)
        self.ttft = Histogram("polymodal_time_to_first_token_seconds", "Time to first token (chat answers)",
                              buckets=LATENCY_BUCKETS_S, registry=r)
        self.tpot = Histogram("polymodal_time_per_output_token_seconds",
                              "Time per output token after the first (chat answers)",
                              buckets=TOKEN_BUCKETS_S, registry=r)
        self.ttfm = Histogram("polymodal_time_to_first_medium_seconds",
                              "Time to the answer's first medium of a modality (chat answers)", ["modality"],
                              buckets=LATENCY_BUCKETS_S, registry=r)
        self.e2e = Histogram("polymodal_e2e_request_latency_seconds", "Whole chat answer ready",
                             buckets=LATENCY_BUCKETS_S, registry=r)

    def render(self, decoder_stats: dict[str, dict[str, float]]) -> bytes:
        """The exposition text: own metrics, then the decoder counters."""
        extra = CollectorRegistry(auto_describe=False)
        extra.register(_DecoderCollector(decoder_stats))
        return generate_latest(self.registry) + generate_latest(extra)


_COUNTERS = {
    "steps": "Decoder denoising steps run",
    "batches": "Decoder pipeline calls",
    "batch_items": "Items rendered in decoder pipeline calls",
    "cancelled": "Decoder items cancelled",
    "failed": "Decoder items that could not be rendered",
    "retried": "Renders sent again because their decoder replica died (Ray host; counted by the ingress)",
}


class _DecoderCollector:
    def __init__(self, stats: dict[str, dict[str, float]]):
        self.stats = stats

    def collect(self):
        for key, doc in _COUNTERS.items():
            fam = CounterMetricFamily(f"polymodal_decoder_{key}", doc, labels=["modality"])
            for modality, values in sorted(self.stats.items()):
                fam.add_metric([modality], float(values.get(key, 0)))
            yield fam
        g = GaugeMetricFamily("polymodal_decoder_max_batch_size", "Largest decoder batch so far",
                              labels=["modality"])
        for modality, values in sorted(self.stats.items()):
            g.add_metric([modality], float(values.get("max_batch_size", 0)))
        yield g


class StreamLatencies:
    """The streaming latencies of one run (:mod:`services.metrics`: time to first token, time per output token,
    time to first medium per modality, end to end), from ``started_s`` (``time.monotonic()``); ``medium`` takes
    a :class:`polymodal.modality.Modality`."""

    def __init__(self, started_s: float):
        self.started_s = started_s
        self.first_token_s: float | None = None
        self.last_token_s: float | None = None
        self.first_medium_s: dict[Any, float] = {}

    def token(self) -> None:
        now = time.monotonic()
        if self.first_token_s is None:
            self.first_token_s = now
        self.last_token_s = now

    def llm_done(self) -> None:
        if self.first_token_s is not None:
            self.last_token_s = time.monotonic()

    def medium(self, modality: Any) -> None:
        self.first_medium_s.setdefault(modality, time.monotonic())

    def observe(self, metrics: APIMetrics, completion_tokens: int) -> None:
        now = time.monotonic()
        metrics.e2e.observe(now - self.started_s)
        if self.first_token_s is not None:
            metrics.ttft.observe(self.first_token_s - self.started_s)
            if completion_tokens > 1 and self.last_token_s is not None:
                metrics.tpot.observe((self.last_token_s - self.first_token_s) / (completion_tokens - 1))
        for m, t in self.first_medium_s.items():
            metrics.ttfm.labels(m.value).observe(t - self.started_s)
