"""What the HTTP/1.1 server (``proxy.http_server``) lets one client hold: the limits,
the rejections they produce, and the per-client-IP connection accounting.

Owns ``HttpLimits`` (deadlines, head sizes, body rate, connection caps, buffered body
bytes, pipelining depth), the closed set of rejection reasons reported to
``on_reject``, and ``ClientIps``: which peers are
trusted proxies and how many connections each real client IP holds.

Must not import the server, the handlers, auth, admission, the emitter or Redis; it
is pure bookkeeping for ``proxy.http_server``.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

Network = ipaddress.IPv4Network | ipaddress.IPv6Network

RejectReason = Literal[
    "head_timeout", "body_rate", "url_too_long", "head_too_large", "too_many_headers",
    "conn_limit_ip", "conn_limit_process", "body_buffer_full", "bad_request",
    "pipeline_limit",
]

# Every status the server answers on its own (the handler answers everything else).
REJECT_STATUSES = (400, 408, 414, 429, 431, 503, 505)


@dataclass(frozen=True, slots=True)
class HttpLimits:
    """The server's limits. Defaults follow nginx / h11 where they have one; the two
    connection caps are off (None) by default because a load generator on 127.0.0.1
    legitimately opens thousands of connections: the deployment sets them.

    - ``head_timeout``: seconds for a request's head, from its first byte (from the
      accept for a connection's first request); over it: 408 and close.
    - ``min_body_rate`` / ``body_rate_window``: while a body is read, each window of
      that many seconds must bring at least ``min_body_rate * body_rate_window`` bytes
      (the first window is the grace period); else 408 and close.
    - ``max_url`` (414), ``max_head`` bytes of request line and headers and
      ``max_headers`` distinct header fields (431).
    - ``max_connections`` per process (503) and ``max_connections_per_ip`` per real
      client IP (429), both refused at once and closed.
    - ``max_buffered_body``: body bytes being read, across all connections of the
      process; over it the request that crossed it gets 503 and its connection closes.
    - ``max_pipelined``: requests parsed and waiting behind the one being answered;
      more: the waiting ones are answered, then 429 and close.
    """

    head_timeout: float = 10.0
    min_body_rate: float = 1024.0
    body_rate_window: float = 10.0
    max_url: int = 8 * 1024
    max_head: int = 64 * 1024
    max_headers: int = 100
    max_connections: int | None = None
    max_connections_per_ip: int | None = None
    max_buffered_body: int = 256 * 1024 * 1024
    max_pipelined: int = 32

    def __post_init__(self) -> None:
        if min(self.head_timeout, self.body_rate_window) <= 0:
            raise ValueError("head_timeout and body_rate_window must be positive")
        if min(self.max_url, self.max_head, self.max_headers, self.max_pipelined) < 1:
            raise ValueError("the head and pipelining limits must be at least 1")


RejectCounter = Callable[[RejectReason], None]


class ClientIps:
    """Trusted proxy peers, and connections held per real client IP.

    A peer outside ``trusted`` is its own client: counted at connect. Behind a trusted
    proxy (Cloudflare) every peer is the proxy, so the client is ``CF-Connecting-IP``,
    believed only from a trusted peer and counted once the connection's first head is
    parsed. ``limit`` None: nothing is counted at all.
    """

    __slots__ = ("trusted", "limit", "held", "_trusted_peers")

    def __init__(self, trusted: tuple[Network, ...], limit: int | None) -> None:
        self.trusted = trusted
        self.limit = limit
        self.held: dict[str, int] = {}
        self._trusted_peers: dict[str, bool] = {}  # peer string -> inside ``trusted``

    def is_trusted(self, peer: str | None) -> bool:
        if peer is None or not self.trusted:
            return False
        known = self._trusted_peers.get(peer)
        if known is None:
            try:
                address = ipaddress.ip_address(peer)
            except ValueError:
                return False
            known = any(address in net for net in self.trusted)
            if len(self._trusted_peers) >= 65_536:  # bounded: peers are not attacker-chosen
                self._trusted_peers.clear()  # but a big fleet should not grow it forever
            self._trusted_peers[peer] = known
        return known

    @staticmethod
    def forwarded(value: str | None, peer: str | None) -> str | None:
        """The real client IP a trusted proxy names, normalised; the peer when the
        header is missing or not an IP address."""
        if value is None:
            return peer
        try:
            return str(ipaddress.ip_address(value.strip()))
        except ValueError:
            return peer

    def acquire(self, ip: str) -> bool:
        """Count one more connection for ``ip``; False (and nothing counted) if it
        already holds ``limit``."""
        held = self.held.get(ip, 0)
        if self.limit is not None and held >= self.limit:
            return False
        self.held[ip] = held + 1
        return True

    def release(self, ip: str) -> None:
        held = self.held.get(ip, 0) - 1
        if held > 0:
            self.held[ip] = held
        else:
            self.held.pop(ip, None)
