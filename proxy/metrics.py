"""Prometheus metrics for one proxy process, in a registry of its own.

Label values come from closed sets only (catalog model names, status codes), never
from what a client sent, so no content and no unbounded cardinality reach a label.
"""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

_LATENCY_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300,
)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "qnp_requests", "Requests handled, by model and HTTP status.",
            ["model", "status"], registry=self.registry,
        )
        self.latency = Histogram(
            "qnp_request_duration_seconds", "Time from request received to response done.",
            ["model"], buckets=_LATENCY_BUCKETS, registry=self.registry,
        )
        self.ttft = Histogram(
            "qnp_time_to_first_token_seconds",
            "Time from request received to the first upstream byte sent to the client.",
            ["model"], buckets=_LATENCY_BUCKETS, registry=self.registry,
        )
        self.events_emitted = Counter(
            "qnp_events_emitted", "Metadata events written to the Redis stream.",
            registry=self.registry,
        )
        self.events_dropped = Counter(
            "qnp_events_dropped", "Metadata events lost: buffer full or unsent at shutdown.",
            registry=self.registry,
        )
        self.events_spooled = Counter(
            "qnp_events_spooled", "Metadata events written to the local spool (Redis down).",
            registry=self.registry,
        )
        self.events_replayed = Counter(
            "qnp_events_replayed", "Spooled metadata events sent to Redis after recovery.",
            registry=self.registry,
        )
        self.events_in_spool = Gauge(
            "qnp_events_in_spool", "Metadata events waiting in the local spool.",
            registry=self.registry,
        )
        self.events_buffered = Gauge(
            "qnp_events_buffered", "Metadata events waiting to be sent.",
            registry=self.registry,
        )
        self.admission_degraded = Gauge(
            "qnp_admission_degraded",
            "1 while Redis is unreachable and admission runs on the fallback policy.",
            registry=self.registry,
        )

        # Label children looked up once per (model, status): ``labels()`` takes a lock
        # and formats its arguments on every call, three times per request.
        self._done: dict[tuple[str, int], tuple[Any, Any, Any]] = {}

    def request_done(self, model: str, status: int, latency: float,
                     ttft: float | None) -> None:
        children = self._done.get((model, status))
        if children is None:
            children = self._done[(model, status)] = (
                self.requests.labels(model, str(status)), self.latency.labels(model),
                self.ttft.labels(model))
        children[0].inc()
        children[1].observe(latency)
        if ttft is not None:
            children[2].observe(ttft)

    def render(self) -> bytes:
        return generate_latest(self.registry)
