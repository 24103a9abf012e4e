"""Prometheus metrics for one proxy process, in a registry of its own.

Label values come from closed sets only (catalog model names, status codes, the
rejection reasons and throttle scopes below), never from what a client sent, so no
content and no unbounded cardinality reach a label.

The hot path updates plain in-process metrics (no files, no locks across processes);
one scrape of a process group sums its workers' registries (``proxy.metrics_group``).
Gauges summed that way must mean "how many, in this process"; those that are a state
instead are listed in ``MAX_GAUGES`` and combined with ``max``.
"""

from __future__ import annotations

from typing import Any, Literal, get_args

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

_LATENCY_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300,
)

RejectReason = Literal[
    "head_timeout", "body_rate", "url_too_long", "head_too_large", "too_many_headers",
    "conn_limit_ip", "conn_limit_process", "body_buffer_full", "bad_request",
    "pipeline_limit",
]
ThrottleScope = Literal["key_id", "client_ip", "queue"]
REJECT_REASONS: tuple[str, ...] = get_args(RejectReason)
THROTTLE_SCOPES: tuple[str, ...] = get_args(ThrottleScope)
# Gauges that are a state (0/1), not a quantity: a process group reports the worst.
MAX_GAUGES = frozenset({"qnp_admission_degraded"})


class UnknownLabel(ValueError):
    """A rejection reason or throttle scope outside its closed set (a caller's bug)."""


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

        self.inflight_streams = Gauge(
            "qnp_inflight_streams",
            "Streamed responses open now (admitted, first token awaited or relaying).",
            registry=self.registry,
        )
        self.streams_open = 0  # a plain int on the hot path; the gauge reads it
        self.inflight_streams.set_function(lambda: self.streams_open)
        rejections = Counter(
            "qnp_http_rejections",
            "Connections or requests the HTTP server refused or closed, by reason.",
            ["reason"], registry=self.registry,
        )
        throttled = Counter(
            "qnp_auth_throttled",
            "Key verifications refused by the failed-verification throttle, by scope.",
            ["scope"], registry=self.registry,
        )
        # Every label of a closed set exists from the start (0 until it happens).
        self._rejections = {r: rejections.labels(r) for r in REJECT_REASONS}
        self._throttled = {s: throttled.labels(s) for s in THROTTLE_SCOPES}

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

    def rejected(self, reason: RejectReason | str) -> None:
        """Count one HTTP-level rejection (``reason`` from ``REJECT_REASONS``)."""
        child = self._rejections.get(reason)
        if child is None:
            raise UnknownLabel(f"unknown rejection reason {reason!r}")
        child.inc()

    def auth_throttled(self, scope: ThrottleScope | str) -> None:
        """Count one verification refused by the throttle: scope key_id or client_ip
        (over its failure budget), or queue (too many verifications waiting)."""
        child = self._throttled.get(scope)
        if child is None:
            raise UnknownLabel(f"unknown throttle scope {scope!r}")
        child.inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
