"""TLS for the control plane: its listeners' server contexts and the Redis client's options.

The public web listener (role web) and the admin listener serve TLS when given a
certificate and key (``QNP_WEB_TLS_CERT``/``_KEY``, ``QNP_ADMIN_TLS_CERT``/``_KEY``):
TLS 1.2 and 1.3 only, forward-secret AEAD suites (``shared.tls_policy``), the same
policy as the proxy's listener. ``rediss://`` verifies Redis' certificate and host
name at TLS 1.2+. PostgreSQL needs nothing here: asyncpg reads ``sslmode=verify-full``
and ``sslrootcert`` from ``DATABASE_URL`` itself.

Wiring a listener: ``web.TCPSite(runner, host, port, ssl_context=listener_context(
settings.tls.web))`` (or ``ssl=`` for ``loop.create_server``). Must not import other
control-plane modules but ``settings``, nor ``proxy``.
"""

from __future__ import annotations

import ssl
from pathlib import Path
from typing import Any

from control_plane.settings import ListenerTls, TlsSettings
from shared.tls_policy import ALPN_HTTP1, MIN_VERSION, TLS12_CIPHERS

_MIN = ssl.TLSVersion[MIN_VERSION]


class TlsError(Exception):
    """A certificate or key that cannot be loaded; the message names the file."""


def server_context(cert: Path, key: Path) -> ssl.SSLContext:
    """A listener's context: ``cert`` (the chain, leaf first) and its ``key``."""
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


def listener_context(listener: ListenerTls) -> ssl.SSLContext | None:
    """The context for one listener, or None when it serves plain HTTP."""
    if listener.cert is None or listener.key is None:
        return None
    return server_context(listener.cert, listener.key)


def redis_options(url: str, tls: TlsSettings) -> dict[str, Any]:
    """redis-py keyword arguments: TLS options for a ``rediss://`` URL (certificate and
    host name verified, TLS 1.2+), nothing for any other."""
    if not url.lower().startswith("rediss://"):
        return {}
    options: dict[str, Any] = {
        "ssl_cert_reqs": "required",
        "ssl_check_hostname": True,
        "ssl_min_version": _MIN,
    }
    if tls.redis_ca is not None:
        options["ssl_ca_certs"] = str(tls.redis_ca)
    if tls.redis_cert is not None:
        options["ssl_certfile"] = str(tls.redis_cert)
    if tls.redis_key is not None:
        options["ssl_keyfile"] = str(tls.redis_key)
    return options
