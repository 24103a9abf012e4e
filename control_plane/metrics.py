"""Prometheus metrics of one control-plane process, in a registry of its own.

Each app gets its own ``CollectorRegistry`` rather than the global one, so tests and
several apps in one process never collide. Labels never carry content or key ids.
Imports only prometheus-client; never ``proxy``.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.events_ingested = Counter(
            "qnp_ingest_events_ingested", "Events newly written to usage_logs.", registry=r
        )
        self.duplicates = Counter(
            "qnp_ingest_duplicates",
            "Events skipped because usage_logs already held them (re-deliveries).",
            registry=r,
        )
        self.dead_lettered = Counter(
            "qnp_ingest_dead_lettered", "Stream entries moved to the dead-letter stream.",
            registry=r,
        )
        self.errors = Counter(
            "qnp_ingest_errors", "Ingest batches that failed and will be retried.",
            ["store"], registry=r,
        )
        self.batch_size = Histogram(
            "qnp_ingest_batch_size", "Stream entries per ingest batch.",
            buckets=(1, 5, 10, 50, 100, 250, 500, 1000, 5000), registry=r,
        )
        self.insert_seconds = Histogram(
            "qnp_ingest_insert_seconds", "Time to write one batch to Postgres and commit.",
            registry=r,
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)
