"""Prometheus metrics of one service instance (its own registry, so apps in one process stay apart)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class ServiceMetrics:
    def __init__(self):
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "fedbpt_requests", "HTTP requests by endpoint and status", ["endpoint", "status"], registry=self.registry
        )
        self.sequences = Counter("fedbpt_sequences", "sequences scored", registry=self.registry)
        self.tokens = Counter("fedbpt_tokens", "real tokens run through the model", registry=self.registry)
        self.key_queries = Counter(
            "fedbpt_key_queries", "accepted score queries per API key id", ["key_id"], registry=self.registry
        )
        self.latency = Histogram(
            "fedbpt_score_latency_seconds",
            "score request latency",
            buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
            registry=self.registry,
        )
        self.engine_latency = Histogram(
            "fedbpt_engine_latency_seconds",
            "engine time per score request",
            buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
            registry=self.registry,
        )

        self.prefix_cache = Gauge(
            "fedbpt_prefix_cache",
            "text-head key/value cache of the engine: bytes held, entries, lookups that hit or missed, evictions",
            ["what"],
            registry=self.registry,
        )

    def observe_prefix_cache(self, cache) -> None:
        """The engine's prefix cache as it stands (an engine without one publishes nothing)."""
        if cache is None:
            return
        for what, value in (
            ("bytes", cache.bytes),
            ("max_bytes", cache.max_bytes),
            ("entries", len(cache)),
            ("hits", cache.hits),
            ("misses", cache.misses),
            ("evictions", cache.evictions),
        ):
            self.prefix_cache.labels(what).set(value)

    def render(self) -> bytes:
        return generate_latest(self.registry)
