"""The record step: what is known about one request, and what it becomes.

Owns ``Facts`` (filled in by the hot path as the request goes), the choice of the usage
to bill (the upstream's report, or an estimate from what passed through; never silently
zero once anything was generated), its price, the settlement of the request's
admission ticket, the request's single event (client-chosen strings in it bounded and
cleaned: ``shared.events.clean_text``), and its metrics. ``Recorder.record`` is called
exactly once per request, from the handler's ``finally:``.

Must not import the handlers, relay, routing, auth or the upstream client: it learns
about a request only through ``Facts``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from proxy import errors
from proxy.admission import Admission, Ticket
from proxy.catalog import Deployment, Model
from proxy.emitter import EventEmitter
from proxy.metrics import Metrics
from proxy.providers.base import BYTES_PER_TOKEN, Chat, Relay, Usage
from shared.events import Event, clean_text


def now_us() -> int:
    return time.time_ns() // 1000


@dataclass(slots=True)
class Facts:
    """What is known about one request so far; becomes its event."""

    id: str
    endpoint: str
    received_at_us: int
    source_ip: str | None
    status: int = 0
    outcome: str = "ok"
    error_code: str | None = None
    account_id: str | None = None
    key_id: str | None = None
    requested_model: str | None = None
    model: Model | None = None
    deployment: Deployment | None = None
    attempts: int = 0
    stream: bool = False
    first_byte_at_us: int | None = None
    body_bytes: int = 0
    reply_bytes: int = 0
    chat: Chat | None = None  # the parsed request, once it parsed
    usage: Usage | None = None
    relay: Relay | None = None
    finished: bool = False  # the upstream ended its answer normally
    ticket: Ticket | None = None

    def fail(self, err: errors.ProxyError) -> None:
        self.status = err.status
        self.outcome = err.outcome
        self.error_code = err.code


def billable_usage(facts: Facts) -> tuple[Usage, str]:
    """Usage to bill, and where it came from; never silently zero once generated."""
    usage = facts.usage or (facts.relay.usage if facts.relay is not None else None)
    if facts.first_byte_at_us is None:
        return (usage, "upstream") if usage is not None else (Usage(), "none")
    if usage is not None and facts.finished:
        return usage, "upstream"
    # Cut short (client gone, idle, error) or no usage reported: what passed through.
    generated = facts.relay.estimated_completion_tokens() if facts.relay \
        else facts.reply_bytes // BYTES_PER_TOKEN
    if usage is not None and usage.completion_tokens >= generated:
        return usage, "upstream"
    # Only now, on this rare path, is the prompt's text counted.
    prompt = facts.chat.prompt_estimate() if facts.chat is not None else 0
    base = usage or Usage(prompt_tokens=prompt)
    return Usage(base.prompt_tokens or prompt, max(generated, 1),
                 base.cached_tokens, 0, base.cache_write_tokens), "estimated"


class Recorder:
    """Settles, emits and counts one finished request."""

    def __init__(self, node_id: str, admission: Admission, emitter: EventEmitter,
                 metrics: Metrics) -> None:
        self._node = node_id
        self._admission = admission
        self._emitter = emitter
        self._metrics = metrics

    def record(self, facts: Facts) -> None:
        done = now_us()
        model, dep = facts.model, facts.deployment
        usage, source = billable_usage(facts)
        price = dep.price if dep is not None else model.price if model is not None else None
        cost = price.cost_of(
            usage.prompt_tokens, usage.completion_tokens, cached_tokens=usage.cached_tokens,
            cache_write_tokens=usage.cache_write_tokens, reasoning_tokens=usage.reasoning_tokens,
        ) if price is not None else 0
        if facts.ticket is not None:
            self._admission.settle(
                facts.ticket, usage.prompt_tokens + usage.completion_tokens, cost
            )
        served = dep or (model.deployments[0] if model is not None else None)
        requested = facts.requested_model  # the client's choice: bounded and cleaned
        self._emitter.emit(
            Event(
                id=facts.id,
                received_at_us=facts.received_at_us,
                done_at_us=done,
                endpoint=facts.endpoint,
                status=facts.status,
                outcome=facts.outcome,
                node_id=self._node,
                first_byte_at_us=facts.first_byte_at_us,
                account_id=facts.account_id,
                key_id=facts.key_id,
                requested_model=clean_text(requested) if requested is not None else None,
                served_model=served.upstream_model if served is not None else None,
                provider=served.provider.name if served is not None else None,
                stream=facts.stream,
                prompt_tokens=usage.prompt_tokens,
                completion_tokens=usage.completion_tokens,
                cached_tokens=usage.cached_tokens,
                reasoning_tokens=usage.reasoning_tokens,
                usage_source=source,
                cost_micros=cost,
                source_ip=facts.source_ip,
                error_code=facts.error_code,
                attempts=facts.attempts,
                cache_write_tokens=usage.cache_write_tokens,
            )
        )
        first = facts.first_byte_at_us
        self._metrics.request_done(
            model.name if model is not None else "-", facts.status,
            (done - facts.received_at_us) / 1e6,
            (first - facts.received_at_us) / 1e6 if first is not None else None,
        )
