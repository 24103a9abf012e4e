"""The hot path: one request, top to bottom, as DESIGN.md tells it.

authenticate → admit → route → stream → record. Each step is a call into a small
collaborator (auth, admission, routing, upstream, the client's and the upstream's
wires, relay, record); a request refused before admission once its key is known (bad
body, unknown model) is still counted against the key's request limits. This module
only sequences them, fills in the request's ``Facts``, turns errors into responses in
the client's own API format, and hands the facts to ``record`` exactly once, in a
``finally:``. Every endpoint (OpenAI, Anthropic, Gemini) runs the same straight line:
what differs is data (an ``Endpoint``), never a branch per provider.

Must not import the control plane or Redis, nor build events itself: settlement, the
event and metrics are ``proxy.record``'s.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import traceback
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from proxy import errors
from proxy.admission import Admission
from proxy.auth import Authenticator, bearer_token
from proxy.catalog import Catalog, Deployment, Model
from proxy.connections import Response, UpstreamIOError
from proxy.emitter import EventEmitter
from proxy.http_server import Reply, Request, StreamReply
from proxy.metrics import Metrics
from proxy.providers.base import BYTES_PER_TOKEN, Chat, Wire
from proxy.providers.registry import WIRES, refusal_for, stream_relay, translate_reply
from proxy.record import Facts, Recorder, now_us
from proxy.relay import ClientGone, keepalive, pump
from proxy.routing import Router
from proxy.settings import Settings
from proxy.upstream import UpstreamClient
from shared.apikeys import KeyRecord
from shared.events import uuid7_str

log = logging.getLogger("qnp.proxy")

_SSE_HEADERS = {
    "Content-Type": "text/event-stream",
    "Cache-Control": "no-cache",
    "X-Accel-Buffering": "no",
}
_CLIENT_GONE = 499  # nginx's convention: the client closed the request
# Failures worth another deployment: the next one may well answer.
_RETRYABLE = (errors.UpstreamUnavailable, errors.UpstreamFailed)

UrlArgs = Callable[[Request], tuple[str | None, bool | None]]


def _no_url_args(_request: Request) -> tuple[str | None, bool | None]:
    return None, None


@dataclass(frozen=True, slots=True)
class Endpoint:
    """One public API: its event label, its wire, and what its URL carries."""

    path: str
    wire: Wire
    operation: str = "chat"
    url_args: UrlArgs = _no_url_args


def _gemini_url_args(request: Request) -> tuple[str | None, bool | None]:
    model, _, action = request.match_info.get("call", "").partition(":")
    if action not in ("generateContent", "streamGenerateContent") or not model:
        raise errors.RouteNotFound()
    stream = action == "streamGenerateContent"
    if stream and request.query.get("alt") != "sse":
        raise errors.BadRequest("streamGenerateContent is served as SSE: add ?alt=sse.")
    return model, stream


# (route, endpoint) for every public API; app.py adds one route per entry.
ROUTES: tuple[tuple[str, Endpoint], ...] = (
    ("/v1/chat/completions", Endpoint("/v1/chat/completions", WIRES["openai"])),
    ("/v1/completions", Endpoint("/v1/completions", WIRES["openai"], "completions")),
    ("/v1/embeddings", Endpoint("/v1/embeddings", WIRES["openai"], "embeddings")),
    ("/v1/messages", Endpoint("/v1/messages", WIRES["anthropic"])),
    ("/v1beta/models/{call}", Endpoint("/v1beta/models:generateContent", WIRES["gemini"],
                                       url_args=_gemini_url_args)),
)


@dataclass(frozen=True, slots=True)
class _Attempt:
    deployment: Deployment
    resp: Response
    first: bytes


@dataclass(slots=True)
class _ClientStream:
    """The client's response: committed (status 200, SSE headers) on first use."""

    request: Request
    headers: dict[str, str]
    facts: Facts
    out: StreamReply | None = None

    async def response(self) -> StreamReply:
        if self.out is None:
            self.out = StreamReply(200, {**_SSE_HEADERS, **self.headers})
            await self.out.prepare(self.request)
            self.facts.status = 200
        return self.out


class ChatHandler:
    def __init__(
        self,
        settings: Settings,
        auth: Authenticator,
        admission: Admission,
        upstream: UpstreamClient,
        emitter: EventEmitter,
        metrics: Metrics,
        router: Router,
    ) -> None:
        self._catalog: Catalog = settings.catalog
        self._keepalive = settings.keepalive_interval
        self._auth = auth
        self._admission = admission
        self._default_max_tokens = settings.default_max_tokens
        self._upstream = upstream
        self._router = router
        self._metrics = metrics
        self._recorder = Recorder(settings.node_id, admission, emitter, metrics)

    def check_head(self, request: Request) -> bool | Awaitable[bool]:
        """The server's head check for an API request: verify its key before its body
        is read. The verdict (key record or refusal) waits on ``request.principal`` for
        ``serve``, which answers and records a refusal. A cached key costs no await."""
        try:
            token = _presented_key(request)
            key = self._auth.cached(token)
        except errors.ProxyError as e:
            request.principal = e
            return False
        if key is None:
            return self._verify(request, token)
        request.principal = key
        return True

    async def _verify(self, request: Request, token: str) -> bool:
        try:
            request.principal = await self._auth.authenticate(token, request.client_ip)
        except errors.ProxyError as e:
            request.principal = e
            return False
        return True

    async def _key(self, request: Request) -> KeyRecord:
        """The request's key: the head check's verdict, else verified now (a server
        without the check, as some tests run it)."""
        verdict = request.principal
        if isinstance(verdict, KeyRecord):
            return verdict
        if isinstance(verdict, errors.ProxyError):
            raise verdict
        return await self._auth.authenticate(_presented_key(request), request.client_ip)

    async def serve(self, request: Request, endpoint: Endpoint) -> Reply | StreamReply:
        facts = Facts(uuid7_str(), endpoint.path, now_us(), request.client_ip)
        headers = {"x-request-id": facts.id}
        wire = endpoint.wire
        try:
            key = await self._key(request)
            facts.key_id, facts.account_id = key.key_id, key.account_id
            body = request.body
            try:
                if request.too_large:  # the server read none of it (QNP_MAX_BODY_BYTES)
                    raise errors.BodyTooLarge()
                facts.body_bytes = len(body)
                chat = _parse(request, endpoint, body)
                facts.chat, facts.requested_model = chat, chat.model
                facts.stream = chat.stream
                models = self._models(chat)
            except errors.ProxyError as e:
                # Refused before admission, but the key is known: it still counts
                # against the request limits (429 instead, once over them).
                headers.update(await self._admission.count(key, facts.id))
                raise e from None
            facts.model = models[0]
            # Reserve the most this request can use: the whole body as prompt (an upper
            # bound on its text) + max tokens, at the dearest of the models it may use.
            prompt = max(1, len(body) // BYTES_PER_TOKEN)
            completion = chat.max_tokens or self._default_max_tokens
            facts.ticket = await self._admission.admit(
                key, facts.id, prompt + completion,
                max(m.price.cost_micros(prompt, completion) for m in models),
            )
            headers.update(facts.ticket.headers)
            with self._router.request():
                return await self._respond(request, wire, chat, models, facts, headers)
        except errors.ProxyError as e:
            facts.fail(e)
            return _error_response(wire, e, headers)
        except (UpstreamIOError, TimeoutError) as e:
            # The upstream failed while its body was being read (non-stream).
            err: errors.ProxyError = (
                errors.UpstreamTimeout() if isinstance(e, TimeoutError)
                else errors.UpstreamUnavailable()
            )
            facts.fail(err)
            return _error_response(wire, err, headers)
        except asyncio.CancelledError:
            facts.status, facts.outcome = _CLIENT_GONE, "client_cancelled"
            raise
        except Exception as e:  # the request's top level: log the bug, answer cleanly
            log.error(
                "unhandled %s in %s request_id=%s\n%s", type(e).__name__, endpoint.path,
                facts.id, "".join(traceback.format_tb(e.__traceback__)),
            )
            err = errors.Internal()
            facts.fail(err)
            return _error_response(wire, err, headers)
        finally:
            self._recorder.record(facts)

    def _models(self, chat: Chat) -> list[Model]:
        models = []
        for name in (chat.model, *chat.fallbacks):
            model = self._catalog.get(name)
            if model is None:
                raise errors.ModelNotFound(name)
            models.append(model)
        return models

    async def _respond(self, request: Request, wire: Wire, chat: Chat,
                       models: list[Model], facts: Facts,
                       headers: dict[str, str]) -> Reply | StreamReply:
        client = _ClientStream(request, headers, facts)
        if chat.stream:  # qnp_inflight_streams, for the autoscaler
            self._metrics.streams_open += 1
        try:
            attempt = await self._first_chunk(client, wire, chat, models)
            if attempt is None:  # failed after keep-alives committed the stream
                return await client.response()
            try:
                return await self._deliver(client, wire, chat, attempt)
            finally:
                # An unfinished upstream body (client gone, error) closes the connection,
                # so the upstream stops generating; a finished one goes back to the pool.
                if attempt.resp.at_eof():
                    attempt.resp.release()
                else:
                    attempt.resp.close()
        except ClientGone:
            facts.status, facts.outcome = _CLIENT_GONE, "client_cancelled"
            return await client.response()
        finally:
            if chat.stream:
                self._metrics.streams_open -= 1

    async def _first_chunk(self, client: _ClientStream, wire: Wire, chat: Chat,
                           models: list[Model]) -> _Attempt | None:
        """The first attempt to send a first chunk; keep-alives while a stream waits."""
        if not chat.stream:  # nothing to send meanwhile: no task needed
            return await self._open(wire, chat, models, client.facts)
        opening = asyncio.ensure_future(self._open(wire, chat, models, client.facts))
        try:
            while not opening.done():
                await asyncio.wait({opening}, timeout=self._keepalive)
                if not opening.done():
                    await keepalive(await client.response(), wire)
            try:
                return await opening
            except errors.ProxyError as e:
                if client.out is None:
                    raise
                client.facts.outcome, client.facts.error_code = e.outcome, e.code
                await client.out.write(wire.stream_error(e))
                await client.out.write_eof()
                return None
        finally:
            if not opening.done():
                opening.cancel()  # the client left: closes the upstream connection
                with contextlib.suppress(asyncio.CancelledError):
                    await opening

    async def _deliver(self, client: _ClientStream, wire: Wire, chat: Chat,
                       attempt: _Attempt) -> Reply | StreamReply:
        facts = client.facts
        facts.first_byte_at_us = now_us()
        upstream_wire = attempt.deployment.wire
        if chat.stream:
            out = await client.response()
            facts.relay = stream_relay(wire, upstream_wire, chat)
            ended = await pump(out, attempt.resp, attempt.first, facts.relay, wire)
            if ended.error is not None:
                facts.outcome, facts.error_code = ended.error.outcome, ended.error.code
            elif facts.relay.failed:
                facts.outcome, facts.error_code = "upstream_error", "upstream_stream_error"
            else:
                facts.finished = True
            return out
        raw = attempt.first + await attempt.resp.read()
        facts.reply_bytes = len(raw)
        body, facts.usage = translate_reply(wire, upstream_wire, raw, chat.model)
        facts.status, facts.finished = 200, True
        return Reply(200, body, client.headers, errors.JSON)

    async def _open(self, wire: Wire, chat: Chat, models: list[Model],
                    facts: Facts) -> _Attempt:
        """Try deployments in routing order until one sends its first chunk.

        Retries and fallbacks happen only here, before anything reached the client,
        on connection errors, 5xx and 429, within the router's retry budget.
        """
        plan = [(m, d) for m, d in self._router.plan(models)
                if chat.operation == "chat" or d.wire is wire]
        if not plan:
            raise errors.BadRequest("This model is not served on this endpoint.",
                                    param="model")
        last: errors.ProxyError = errors.UpstreamUnavailable()
        for n, (model, dep) in enumerate(plan):
            if n and not self._router.try_retry():
                break
            try:
                facts.attempts += 1
                facts.model, facts.deployment = model, dep
                return await self._attempt(wire, chat, dep)
            except _RETRYABLE as e:
                self._router.failed(model, dep)
                last = e
            except errors.UpstreamRefused as e:
                if e.status != 429:
                    raise refusal_for(wire, dep.wire, e) from None
                self._router.failed(model, dep)
                last = refusal_for(wire, dep.wire, e)
            finally:
                if n:
                    self._router.retry_done()
        raise last

    async def _attempt(self, wire: Wire, chat: Chat, dep: Deployment) -> _Attempt:
        req = dep.wire.request(chat, dep, same_format=dep.wire is wire)
        resp, first = await self._upstream.open(req, dep.provider.name)
        self._router.succeeded(dep)
        return _Attempt(dep, resp, first)



def _presented_key(request: Request) -> str:
    """The key as each SDK sends it: Bearer, ``x-api-key`` (Anthropic), or Gemini's
    ``x-goog-api-key`` / ``?key=``."""
    h = request.headers
    other = h.get("x-api-key") or h.get("x-goog-api-key") or request.query.get("key")
    return bearer_token(h.get("authorization"), other)


def _parse(request: Request, endpoint: Endpoint, body: bytes) -> Chat:
    if endpoint.operation != "chat":
        return endpoint.wire.parse_operation(body, endpoint.operation)
    model, stream = endpoint.url_args(request)
    return endpoint.wire.parse(body, model=model, stream=stream)


def _error_response(wire: Wire, err: errors.ProxyError,
                    headers: dict[str, str]) -> Reply:
    resp = errors.error_response(err, headers)  # status and headers (Retry-After …)
    resp.body = wire.error_body(err)
    return resp
