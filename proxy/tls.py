"""TLS for the proxy: the public listener's server context and the Redis client's options.

The listener serves TLS 1.2 and 1.3 only, with forward-secret AEAD suites
(``shared.tls_policy``), for Cloudflare's Full (strict) mode or any client that
connects directly. Redis over ``rediss://`` verifies the server's certificate and
name, at TLS 1.2 or newer; the same options serve redis-py's commands and the fast
RESP path (``proxy.resp`` runs on redis-py's connections, so it inherits them).

Must not import the handlers, auth, admission, the emitter or the HTTP server.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shared.tls_policy import ALPN_HTTP1, MIN_VERSION, TLS12_CIPHERS

_MIN = ssl.TLSVersion[MIN_VERSION]


class TlsError(Exception):
    """A certificate or key that cannot be loaded; the message names the file."""


@dataclass(frozen=True, slots=True)
class RedisTls:
    """Trust and identity for ``rediss://`` (None: the system's CAs, no client cert)."""

    ca: Path | None = None
    cert: Path | None = None  # for a Redis that wants clients' certificates (its default)
    key: Path | None = None


def server_context(cert: Path, key: Path) -> ssl.SSLContext:
    """The listener's context: ``cert`` (the chain, leaf first) and its ``key``."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = _MIN
    context.set_ciphers(TLS12_CIPHERS)
    # Compression leaks secrets (CRIME); client-initiated renegotiation costs us CPU.
    context.options |= ssl.OP_NO_COMPRESSION | ssl.OP_CIPHER_SERVER_PREFERENCE
    context.options |= ssl.OP_NO_RENEGOTIATION
    context.set_alpn_protocols(list(ALPN_HTTP1))
    try:
        context.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as e:
        raise TlsError(f"cannot load the TLS certificate {cert} with key {key}: {e}") from e
    return context


def redis_options(url: str, tls: RedisTls) -> dict[str, Any]:
    """Keyword arguments for redis-py's pool: TLS options for a ``rediss://`` URL (the
    certificate and host name verified, TLS 1.2+), nothing for any other."""
    if not url.lower().startswith("rediss://"):
        return {}
    options: dict[str, Any] = {
        "ssl_cert_reqs": "required",
        "ssl_check_hostname": True,
        "ssl_min_version": _MIN,
    }
    if tls.ca is not None:
        options["ssl_ca_certs"] = str(tls.ca)
    if tls.cert is not None:
        options["ssl_certfile"] = str(tls.cert)
    if tls.key is not None:
        options["ssl_keyfile"] = str(tls.key)
    return options
