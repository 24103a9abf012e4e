"""The hot path: one request, top to bottom, as DESIGN.md tells it.

authenticate → (admit) → route → stream → record. Each step is a call into a small
collaborator (auth, upstream, openai_wire, emitter); this module only sequences them,
turns their errors into responses, and builds exactly one event per request in a
``finally:``. Nothing here is computed per request that could be computed at start-up.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import time
import traceback
from dataclasses import dataclass

import aiohttp
from aiohttp import web

from proxy import errors
from proxy.admission import Admission, Ticket
from proxy.auth import Authenticator, bearer_token
from proxy.catalog import Catalog, Model
from proxy.emitter import EventEmitter
from proxy.metrics import Metrics
from proxy.openai_wire import (
    StreamScanner,
    Usage,
    parse_request,
    upstream_body,
    usage_from_response,
)
from proxy.settings import Network, Settings
from proxy.upstream import UpstreamClient
from shared.events import Event, uuid7

log = logging.getLogger("qnp.proxy")

CHAT_ENDPOINT = "/v1/chat/completions"
_SSE_HEADERS = {
    "Content-Type": "text/event-stream",
    "Cache-Control": "no-cache",
    "X-Accel-Buffering": "no",
}
_CLIENT_GONE = 499  # nginx's convention: the client closed the request
_BYTES_PER_TOKEN = 4  # rough estimate used only when an upstream reports no usage


def _now_us() -> int:
    return time.time_ns() // 1000


@dataclass(slots=True)
class _Facts:
    """What is known about one request so far; becomes its event."""

    id: str
    received_at_us: int
    source_ip: str | None
    status: int = 0
    outcome: str = "ok"
    error_code: str | None = None
    account_id: str | None = None
    key_id: str | None = None
    requested_model: str | None = None
    model: Model | None = None
    stream: bool = False
    first_byte_at_us: int | None = None
    body_bytes: int = 0
    usage: Usage | None = None
    scanner: StreamScanner | None = None
    ticket: Ticket | None = None

    def fail(self, err: errors.ProxyError) -> None:
        self.status = err.status
        self.outcome = err.outcome
        self.error_code = err.code


class ChatHandler:
    def __init__(
        self,
        settings: Settings,
        auth: Authenticator,
        admission: Admission,
        upstream: UpstreamClient,
        emitter: EventEmitter,
        metrics: Metrics,
    ) -> None:
        self._catalog: Catalog = settings.catalog
        self._max_body = settings.max_body_bytes
        self._node = settings.node_id
        self._trusted: tuple[Network, ...] = settings.trusted_proxies
        self._auth = auth
        self._admission = admission
        self._default_max_tokens = settings.default_max_tokens
        self._upstream = upstream
        self._emitter = emitter
        self._metrics = metrics

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        facts = _Facts(str(uuid7()), _now_us(), self._client_ip(request))
        headers = {"x-request-id": facts.id}
        try:
            key = await self._auth.authenticate(
                bearer_token(request.headers.get("Authorization"))
            )
            facts.key_id, facts.account_id = key.key_id, key.account_id
            body = await self._read_body(request)
            facts.body_bytes = len(body)
            chat = parse_request(body)
            facts.requested_model, facts.stream = chat.model, chat.stream
            model = self._catalog.get(chat.model)
            if model is None:
                raise errors.ModelNotFound(chat.model)
            facts.model = model
            # Reserve the most this request can use: estimated prompt + max tokens.
            prompt = max(1, len(body) // _BYTES_PER_TOKEN)
            completion = chat.max_tokens or self._default_max_tokens
            facts.ticket = await self._admission.admit(
                key, facts.id, prompt + completion,
                model.price.cost_micros(prompt, completion),
            )
            headers.update(facts.ticket.headers)
            resp, deadline = await self._upstream.open(
                model, upstream_body(chat, model.upstream_model)
            )
            try:
                first = await self._upstream.first_chunk(resp, deadline)
                if chat.stream:
                    scanner = StreamScanner(forward_usage=chat.client_wants_usage)
                    facts.scanner = scanner
                    return await self._relay_stream(request, resp, first, scanner, facts,
                                                    headers)
                facts.first_byte_at_us = _now_us()
                body = first + await resp.content.read()
                facts.usage = usage_from_response(body)
                facts.status = 200
                return web.Response(body=body, content_type=errors.JSON, headers=headers)
            finally:
                # An unfinished upstream body (client gone, error) closes the connection,
                # so the upstream stops generating; a finished one goes back to the pool.
                if resp.content.at_eof():
                    resp.release()
                else:
                    resp.close()
        except errors.ProxyError as e:
            facts.fail(e)
            return errors.error_response(e, headers)
        except (aiohttp.ClientError, TimeoutError) as e:
            # The upstream failed while its body was being read (non-stream).
            err: errors.ProxyError = (
                errors.UpstreamTimeout() if isinstance(e, TimeoutError)
                else errors.UpstreamUnavailable()
            )
            facts.fail(err)
            return errors.error_response(err, headers)
        except asyncio.CancelledError:
            facts.status, facts.outcome = _CLIENT_GONE, "client_cancelled"
            raise
        except Exception as e:  # the request's top level: log the bug, answer cleanly
            log.error(
                "unhandled %s in chat_completions request_id=%s\n%s", type(e).__name__,
                facts.id, "".join(traceback.format_tb(e.__traceback__)),
            )
            err = errors.Internal()
            facts.fail(err)
            return errors.error_response(err, headers)
        finally:
            self._record(facts)

    async def _relay_stream(
        self,
        request: web.Request,
        resp: aiohttp.ClientResponse,
        first: bytes,
        scanner: StreamScanner,
        facts: _Facts,
        headers: dict[str, str],
    ) -> web.StreamResponse:
        out = web.StreamResponse(headers={**_SSE_HEADERS, **headers})
        await out.prepare(request)
        facts.status = 200
        facts.first_byte_at_us = _now_us()
        data = first
        try:
            while data:
                chunk = scanner.feed(data)
                if chunk:
                    await out.write(chunk)
                data = await resp.content.readany()
            tail = scanner.finish()
            if tail:
                await out.write(tail)
        except ConnectionResetError:
            facts.status, facts.outcome = _CLIENT_GONE, "client_cancelled"
            return out
        except (aiohttp.ClientError, OSError, TimeoutError) as e:
            # Headers are gone: the error travels inside the stream, in OpenAI's shape.
            err: errors.ProxyError = (
                errors.UpstreamTimeout() if isinstance(e, TimeoutError)
                else errors.UpstreamUnavailable()
            )
            facts.outcome, facts.error_code = err.outcome, err.code
            try:
                await out.write(b"data: " + err.body() + b"\n\n")
            except ConnectionResetError:
                facts.status, facts.outcome = _CLIENT_GONE, "client_cancelled"
                return out
        await out.write_eof()
        return out

    async def _read_body(self, request: web.Request) -> bytes:
        length = request.content_length
        if length is not None and length > self._max_body:
            raise errors.BodyTooLarge()
        try:
            return await request.read()
        except web.HTTPRequestEntityTooLarge:
            raise errors.BodyTooLarge() from None

    def _client_ip(self, request: web.Request) -> str | None:
        peer = request.remote
        forwarded = request.headers.get("CF-Connecting-IP")
        if forwarded is None or peer is None:
            return peer
        try:
            trusted = any(ipaddress.ip_address(peer) in net for net in self._trusted)
            return str(ipaddress.ip_address(forwarded.strip())) if trusted else peer
        except ValueError:
            return peer

    def _record(self, facts: _Facts) -> None:
        done = _now_us()
        model = facts.model
        usage, source = facts.usage, "upstream"
        if usage is None and facts.scanner is not None and facts.scanner.usage is not None:
            usage = facts.scanner.usage
        if usage is None and model is not None and facts.first_byte_at_us is not None:
            # Generation happened but no usage came back: estimate, never silently zero.
            chunks = facts.scanner.events if facts.scanner is not None else 0
            usage = Usage(
                prompt_tokens=max(1, facts.body_bytes // _BYTES_PER_TOKEN),
                completion_tokens=chunks,
            )
            source = "estimated"
        if usage is None:
            usage, source = Usage(), "none"
        cost = model.price.cost_micros(usage.prompt_tokens, usage.completion_tokens) \
            if model is not None else 0
        if facts.ticket is not None:
            self._admission.settle(
                facts.ticket, usage.prompt_tokens + usage.completion_tokens, cost
            )
        self._emitter.emit(
            Event(
                id=facts.id,
                received_at_us=facts.received_at_us,
                done_at_us=done,
                endpoint=CHAT_ENDPOINT,
                status=facts.status,
                outcome=facts.outcome,
                node_id=self._node,
                first_byte_at_us=facts.first_byte_at_us,
                account_id=facts.account_id,
                key_id=facts.key_id,
                requested_model=facts.requested_model,
                served_model=model.upstream_model if model is not None else None,
                provider=model.provider.name if model is not None else None,
                stream=facts.stream,
                prompt_tokens=usage.prompt_tokens,
                completion_tokens=usage.completion_tokens,
                cached_tokens=usage.cached_tokens,
                reasoning_tokens=usage.reasoning_tokens,
                usage_source=source,
                cost_micros=cost,
                source_ip=facts.source_ip,
                error_code=facts.error_code,
            )
        )
        label = model.name if model is not None else "-"
        m = self._metrics
        m.requests.labels(label, str(facts.status)).inc()
        m.latency.labels(label).observe((done - facts.received_at_us) / 1e6)
        if facts.first_byte_at_us is not None:
            m.ttft.labels(label).observe((facts.first_byte_at_us - facts.received_at_us) / 1e6)
