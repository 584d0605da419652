"""Prometheus metrics of one service (its own registry, so several services in one process never collide).

=================================  =========  ===========================================================
metric                             type       labels / meaning
=================================  =========  ===========================================================
m4oe_requests_total                counter    endpoint, modality, status (HTTP code)
m4oe_request_seconds               histogram  modality: end-to-end latency of segment requests (seconds)
m4oe_batch_tiles                   histogram  tiles per forward pass
m4oe_batch_modalities              histogram  distinct modalities per forward pass
m4oe_forward_seconds               histogram  duration of one forward pass
m4oe_queue_tiles                   gauge      tiles waiting for a forward pass
m4oe_requests_in_flight            gauge      segment requests being served
m4oe_adapters_loaded               gauge      adapters served
m4oe_adapter_changes_total         counter    action (add, replace, remove), outcome (ok, refused)
=================================  =========  ===========================================================
"""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from .batching import BatchStats

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


class ServiceMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("m4oe_requests", "HTTP requests answered", ["endpoint", "modality", "status"],
                                registry=r)
        self.latency = Histogram("m4oe_request_seconds", "segment request latency (seconds)", ["modality"],
                                 buckets=LATENCY_BUCKETS, registry=r)
        self.batch_tiles = Histogram("m4oe_batch_tiles", "tiles per forward pass", buckets=SIZE_BUCKETS, registry=r)
        self.batch_modalities = Histogram("m4oe_batch_modalities", "distinct modalities per forward pass",
                                          buckets=SIZE_BUCKETS, registry=r)
        self.forward = Histogram("m4oe_forward_seconds", "duration of one forward pass (seconds)",
                                 buckets=LATENCY_BUCKETS, registry=r)
        self.queue = Gauge("m4oe_queue_tiles", "tiles waiting for a forward pass", registry=r)
        self.in_flight = Gauge("m4oe_requests_in_flight", "segment requests being served", registry=r)
        self.adapters = Gauge("m4oe_adapters_loaded", "adapters served", registry=r)
        self.adapter_changes = Counter("m4oe_adapter_changes", "adapter add/replace/remove requests",
                                       ["action", "outcome"], registry=r)

    def on_batch(self, stats: BatchStats) -> None:
        self.batch_tiles.observe(stats.tiles)
        self.batch_modalities.observe(stats.modalities)
        self.forward.observe(stats.seconds)

    def exposition(self) -> bytes:
        """The text format Prometheus scrapes."""
        return generate_latest(self.registry)
