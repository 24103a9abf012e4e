"""The upstream HTTP client: the connection pool's requests, timeouts, error mapping.

``open()`` sends a request and returns once the upstream's status line, headers and
first body bytes are in, all within the first-byte budget. Connection failures,
timeouts and upstream statuses become ``ProxyError``s here, so the handler reads as a
straight line. Upstream error bodies are handed back only to the client they concern,
never logged.

Must not import the handlers, auth or the emitter.
"""

from __future__ import annotations

import asyncio
import logging

from proxy.connections import ConnectionPool, Response, UpstreamIOError
from proxy.errors import UpstreamFailed, UpstreamRefused, UpstreamTimeout, UpstreamUnavailable
from proxy.providers.base import UpstreamRequest

log = logging.getLogger("qnp.proxy.upstream")

# Upstream statuses that concern the client's own request: passed through as they are.
_CLIENT_STATUSES = frozenset({400, 404, 409, 413, 422, 429})
_MAX_ERROR_BODY = 64 * 1024


class UpstreamClient:
    def __init__(
        self,
        pool: ConnectionPool,
        *,
        first_byte_timeout: float,
    ) -> None:
        self._pool = pool
        self._first_byte = first_byte_timeout

    async def open(self, req: UpstreamRequest, provider: str) -> tuple[Response, bytes]:
        """POST ``req`` upstream; the response (status 200) and its first body bytes,
        both within the first-byte budget."""
        deadline = asyncio.get_running_loop().time() + self._first_byte
        try:
            resp = await self._pool.post(req.url, req.headers, req.body, deadline)
            if resp.status != 200:
                await self._refuse(resp, provider, deadline)
            try:
                return resp, await resp.readany(deadline)
            except BaseException:
                resp.close()
                raise
        except TimeoutError:  # the pool's connect timeout included
            raise UpstreamTimeout() from None
        except (UpstreamIOError, OSError) as e:
            log.warning("upstream %s unreachable: %s", provider, type(e).__name__)
            raise UpstreamUnavailable() from None

    async def _refuse(self, resp: Response, provider: str, deadline: float) -> None:
        status = resp.status
        try:
            body = await resp.read(_MAX_ERROR_BODY, deadline)
        except (UpstreamIOError, OSError, TimeoutError):
            body = b""
        finally:
            resp.release()
        if status in _CLIENT_STATUSES and body:
            raise UpstreamRefused(status, body, resp.headers.get("retry-after"))
        log.warning("upstream %s answered %d", provider, status)
        raise UpstreamFailed()
