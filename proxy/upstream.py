"""The upstream HTTP client: one pooled aiohttp session, timeouts, error mapping.

``send()`` sends a request and returns once the upstream's status line and headers
are in, within the first-byte budget; ``first_chunk()`` waits for the body's first
bytes within what is left of that budget. Connection failures, timeouts and upstream
statuses become ``ProxyError``s here, so the handler reads as a straight line. Upstream
error bodies are handed back only to the client they concern, never logged.

Must not import the handlers, auth or the emitter.
"""

from __future__ import annotations

import asyncio
import logging

import aiohttp

from proxy.errors import UpstreamFailed, UpstreamRefused, UpstreamTimeout, UpstreamUnavailable
from proxy.providers.base import UpstreamRequest

log = logging.getLogger("qnp.proxy.upstream")

# Upstream statuses that concern the client's own request: passed through as they are.
_CLIENT_STATUSES = frozenset({400, 404, 409, 413, 422, 429})
_MAX_ERROR_BODY = 64 * 1024


class UpstreamClient:
    def __init__(
        self,
        session: aiohttp.ClientSession,
        *,
        first_byte_timeout: float,
    ) -> None:
        self._session = session
        self._first_byte = first_byte_timeout

    async def send(self, req: UpstreamRequest, provider: str
                   ) -> tuple[aiohttp.ClientResponse, float]:
        """POST ``req`` upstream; (response with status 200, first-byte deadline).

        The deadline (loop time) is when the first body byte must have arrived.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._first_byte
        try:
            async with asyncio.timeout_at(deadline):
                resp = await self._session.post(req.url, data=req.body, headers=req.headers)
        except TimeoutError:  # aiohttp's connect timeout included
            raise UpstreamTimeout() from None
        except (aiohttp.ClientError, OSError) as e:
            log.warning("upstream %s unreachable: %s", provider, type(e).__name__)
            raise UpstreamUnavailable() from None
        if resp.status != 200:
            await self._refuse(resp, provider)
        return resp, deadline

    async def _refuse(self, resp: aiohttp.ClientResponse, provider: str) -> None:
        status = resp.status
        try:
            body = await resp.content.read(_MAX_ERROR_BODY)
        except (aiohttp.ClientError, OSError, TimeoutError):
            body = b""
        finally:
            resp.release()
        if status in _CLIENT_STATUSES and body:
            raise UpstreamRefused(status, body, resp.headers.get("Retry-After"))
        log.warning("upstream %s answered %d", provider, status)
        raise UpstreamFailed()

    @staticmethod
    async def first_chunk(resp: aiohttp.ClientResponse, deadline: float) -> bytes:
        try:
            async with asyncio.timeout_at(deadline):
                return await resp.content.readany()
        except TimeoutError:
            raise UpstreamTimeout() from None
        except (aiohttp.ClientError, OSError):
            raise UpstreamUnavailable() from None
