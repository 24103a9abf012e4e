"""Prometheus metrics of one control-plane process, in a registry of its own.

Each app gets its own ``CollectorRegistry`` rather than the global one, so tests and
several apps in one process never collide. Labels never carry content or key ids.
Imports only prometheus-client; never ``proxy``.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest


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

        self.debits = Counter(
            "qnp_ingest_debits", "Credit-ledger debits written with their usage rows.",
            registry=r,
        )
        self.lag_seconds = Histogram(
            "qnp_ingest_lag_seconds",
            "Per batch, the most seconds between a request's end and its row's commit.",
            buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 3600),
            registry=r,
        )
        self.stream_length = Gauge(
            "qnp_stream_length", "Entries in the event stream.", registry=r
        )
        self.pending = Gauge(
            "qnp_stream_pending", "Entries delivered to the ingest group but not acked.",
            registry=r,
        )
        self.trimmed = Counter(
            "qnp_stream_trimmed", "Acknowledged entries trimmed from the stream.", registry=r
        )
        self.trimmed_unacked = Counter(
            "qnp_stream_trimmed_unacked",
            "Entries trimmed (by the MAXLEN cap) before ingest had stored them: lost.",
            registry=r,
        )
        self.privacy_overdue = Gauge(
            "qnp_privacy_requests_overdue",
            "Open privacy requests past their legal (or extended) due time.", registry=r,
        )
        self.partitions_dropped = Counter(
            "qnp_retention_partitions_dropped", "usage_logs day partitions dropped.",
            registry=r,
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)
