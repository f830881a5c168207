"""Prometheus metrics of the HTTP API (``/metrics``).

Ingress metrics live in a registry per app (several apps can share a process in tests); decoder counters
come from the backend (:meth:`services.protocol.Backend.stats`: on Ray, summed over every decoder replica
by the stats deployment) and are exposed with the same text format:

- ``polymodal_requests_total{endpoint,status}``, ``polymodal_request_duration_seconds{endpoint}``
- ``polymodal_inflight_requests``; ``polymodal_rejected_total{reason}`` (overloaded, timeout, disconnect,
  unauthorized, too_large)
- ``polymodal_media_total{modality}`` media returned
- ``polymodal_decoder_steps_total{modality}`` denoising steps run (stops growing when a request is
  cancelled), ``polymodal_decoder_batches_total``, ``polymodal_decoder_batch_items_total``,
  ``polymodal_decoder_max_batch_size``, ``polymodal_decoder_cancelled_total``, ``polymodal_decoder_failed_total``,
  ``polymodal_decoder_retried_total`` (renders sent again after their replica died)
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


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
