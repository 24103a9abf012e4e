"""Error monitoring (Sentry) for both services: the one ``init`` their start-up calls,
and the scrubbing every event and breadcrumb passes through before it leaves.

What may leave is an allowlist, not a blocklist: an event keeps its level, logger,
timestamps, release/environment/server name, the exception *types* and stack frames
(file, function, line: our code, never local variables), a log record's *template*
(never its arguments, never the formatted message) and breadcrumbs reduced to the same.
Everything else is dropped: request (headers, cookies, query string, body), user,
``extra``, tags other than ours, exception messages (``str(exc)`` may quote a prompt, a
reply, a key or an address), log arguments. An event tagged ``RESTRICTED_TAG`` (the
control plane sets it for a restricted account's request, issue 14) is not sent at all.

The SDK's integrations are chosen here too: none that auto-enables (aiohttp, asyncpg,
redis, openai… would wrap the proxy's hot path and attach requests, queries and
commands), only logging (records at ERROR become events), the excepthook, dedupe and
atexit (flush on exit). No tracing, profiling, logs, metrics or sessions.

The only module of ``shared`` that imports a third-party package with I/O (the SDK's
transport thread); it is imported by the services' start-up only. Must not import
``proxy`` or ``control_plane``.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, cast

import sentry_sdk
from sentry_sdk.integrations.atexit import AtexitIntegration
from sentry_sdk.integrations.dedupe import DedupeIntegration
from sentry_sdk.integrations.excepthook import ExcepthookIntegration
from sentry_sdk.integrations.logging import LoggingIntegration
from sentry_sdk.utils import BadDsn, Dsn

if TYPE_CHECKING:
    from sentry_sdk._types import DataCollectionUserOptions, Event

RESTRICTED_TAG = "qnp.restricted"
SERVICE_TAG = "service"

NOTHING_COLLECTED: DataCollectionUserOptions = {
    "user_info": False,
    "cookies": {"mode": "off"},
    "http_headers": {"request": {"mode": "off"}},
    "http_bodies": [],
    "url_query_params": {"mode": "off"},
    "graphql": {"document": False, "variables": False},
    "gen_ai": {"inputs": False, "outputs": False},
    "database_query_data": False,
    "queues": False,
    "stack_frame_variables": False,
    "frame_context_lines": 0,
}
_EVENT_KEYS = frozenset({
    "event_id", "timestamp", "start_timestamp", "level", "platform", "logger",
    "server_name", "release", "environment", "dist", "sdk", "fingerprint", "type",
})
_CONTEXTS = frozenset({"runtime", "os", "trace"})
_TRACE_KEYS = frozenset({"trace_id", "span_id", "parent_span_id", "op", "status"})
_FRAME_KEYS = frozenset({"filename", "abs_path", "function", "module", "lineno", "colno",
                         "in_app"})
_MECHANISM_KEYS = frozenset({"type", "handled", "synthetic", "exception_id", "parent_id",
                             "is_exception_group"})
_BREADCRUMB_KEYS = frozenset({"type", "category", "level", "timestamp", "message"})


class MonitoringError(ValueError):
    """A setting of error monitoring is invalid (the caller names the variable)."""


def dsn_origin(raw: str) -> str:
    """The ``scheme://host[:port]`` a DSN's events go to (for the CSP's connect-src);
    MonitoringError if it is not a DSN."""
    try:
        dsn = Dsn(raw)
    except BadDsn as e:
        raise MonitoringError(f"is not a Sentry DSN ({e})") from None
    return f"{dsn.scheme}://{dsn.netloc}"


def init(dsn: str | None, *, service: str, environment: str | None = None) -> bool:
    """Start the SDK for this process if a DSN is configured; False (and nothing
    started) without one."""
    if not dsn:
        return False
    sentry_sdk.init(
        dsn=dsn,
        environment=environment,
        # The SDK's successor of send_default_pii=False (deprecated since 2.75, with a
        # warning): every category of automatically collected data, off.
        data_collection=NOTHING_COLLECTED,
        max_request_body_size="never",
        include_local_variables=False,
        include_source_context=False,
        default_integrations=False,
        auto_enabling_integrations=False,
        integrations=[
            # INFO and up as breadcrumbs (templates only, see scrub_breadcrumb), ERROR
            # and up as events. Levels below the logger's own never reach the handler.
            LoggingIntegration(level=logging.INFO, event_level=logging.ERROR),
            ExcepthookIntegration(),
            DedupeIntegration(),
            AtexitIntegration(),
        ],
        traces_sample_rate=None,
        profiles_sample_rate=None,
        auto_session_tracking=False,
        enable_logs=False,
        enable_metrics=False,
        attach_stacktrace=False,
        max_breadcrumbs=30,
        before_send=scrub_event,
        before_send_transaction=_drop,
        before_breadcrumb=scrub_breadcrumb,
    )
    sentry_sdk.get_global_scope().set_tag(SERVICE_TAG, service)  # every thread, task
    return True


def close(timeout: float = 2.0) -> None:
    """Flush what is queued and stop the SDK (tests and orderly shutdown)."""
    client = sentry_sdk.get_client()
    if client.is_active():
        client.close(timeout=timeout)
    sentry_sdk.get_global_scope().set_client(None)


def _drop(event: Any, hint: Any) -> None:
    return None


def _frames(stacktrace: Any) -> dict[str, Any] | None:
    if not isinstance(stacktrace, Mapping):
        return None
    frames = stacktrace.get("frames")
    if not isinstance(frames, list):
        return None
    return {"frames": [{k: v for k, v in f.items() if k in _FRAME_KEYS}
                       for f in frames if isinstance(f, Mapping)]}


def _exception(value: Any) -> dict[str, Any]:
    """An exception entry without its message: type, module, frames, mechanism."""
    kept: dict[str, Any] = {}
    if isinstance(value.get("type"), str):
        kept["type"] = value["type"]
    if isinstance(value.get("module"), str):
        kept["module"] = value["module"]
    if (frames := _frames(value.get("stacktrace"))) is not None:
        kept["stacktrace"] = frames
    mechanism = value.get("mechanism")
    if isinstance(mechanism, Mapping):
        kept["mechanism"] = {k: v for k, v in mechanism.items() if k in _MECHANISM_KEYS}
    return kept


def _values(section: Any, keep: Any) -> dict[str, Any] | None:
    if not isinstance(section, Mapping) or not isinstance(section.get("values"), list):
        return None
    return {"values": [keep(v) for v in section["values"] if isinstance(v, Mapping)]}


def _thread(value: Any) -> dict[str, Any]:
    kept = {k: value[k] for k in ("id", "current", "crashed", "main") if k in value}
    if (frames := _frames(value.get("stacktrace"))) is not None:
        kept["stacktrace"] = frames
    return kept


def _crumb(crumb: Any) -> dict[str, Any]:
    return {k: v for k, v in crumb.items() if k in _BREADCRUMB_KEYS}


def scrub_event(event: Event, hint: dict[str, Any]) -> Event | None:
    """``before_send``: the event as it may leave, or None (a restricted account's)."""
    tags = event.get("tags")
    if isinstance(tags, Mapping) and tags.get(RESTRICTED_TAG):
        return None
    kept: dict[str, Any] = {k: v for k, v in event.items() if k in _EVENT_KEYS}
    if isinstance(tags, Mapping) and isinstance(tags.get(SERVICE_TAG), str):
        kept["tags"] = {SERVICE_TAG: tags[SERVICE_TAG]}
    if (exceptions := _values(event.get("exception"), _exception)) is not None:
        kept["exception"] = exceptions
    if (threads := _values(event.get("threads"), _thread)) is not None:
        kept["threads"] = threads
    logentry = event.get("logentry")
    if isinstance(logentry, Mapping) and isinstance(logentry.get("message"), str):
        # The template as written in our code, e.g. "web request failed: %s (%s)".
        kept["logentry"] = {"message": logentry["message"]}
    contexts = event.get("contexts")
    if isinstance(contexts, Mapping):
        kept["contexts"] = {
            name: ({k: v for k, v in ctx.items() if k in _TRACE_KEYS} if name == "trace"
                   else dict(ctx))
            for name, ctx in contexts.items()
            if name in _CONTEXTS and isinstance(ctx, Mapping)
        }
    crumbs: Any = event.get("breadcrumbs")
    if isinstance(crumbs, Mapping):
        crumbs = crumbs.get("values")
    if isinstance(crumbs, list):
        kept["breadcrumbs"] = {"values": [_crumb(c) for c in crumbs
                                          if isinstance(c, Mapping)]}
    return cast("Event", kept)


def scrub_breadcrumb(crumb: Any, hint: Any) -> dict[str, Any] | None:
    """``before_breadcrumb``: a log record's template instead of its formatted message,
    no ``data``; anything but a log breadcrumb (none expected: no integration adds
    them) is dropped."""
    if not isinstance(crumb, Mapping) or crumb.get("type") != "log":
        return None
    kept = {k: v for k, v in crumb.items() if k in _BREADCRUMB_KEYS and k != "message"}
    record = hint.get("log_record") if isinstance(hint, Mapping) else None
    if isinstance(record, logging.LogRecord) and isinstance(record.msg, str):
        kept["message"] = record.msg
    return kept
