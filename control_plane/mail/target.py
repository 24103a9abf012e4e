"""Where mail goes: ``SMTP_URL`` parsed once at start-up into host, port, TLS mode and
credentials. Pure code; imports nothing of ours.

``smtp://host:port`` is plain SMTP, upgraded with STARTTLS when the server offers it;
``smtps://host:port`` is TLS from the first byte (port 465). Credentials, if any, come
from the URL's user info (percent-encoded).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from urllib.parse import unquote, urlsplit

_DEFAULT_PORTS = {"smtp": 25, "smtps": 465}


@dataclass(frozen=True, slots=True)
class SmtpTarget:
    host: str
    port: int
    implicit_tls: bool
    username: str | None = None
    password: str | None = field(default=None, repr=False)


def parse_smtp_url(raw: str) -> SmtpTarget:
    """The target of ``raw``; ``ValueError`` (never echoing the URL, which may hold a
    password) when it is not an smtp:// or smtps:// URL with a host."""
    parts = urlsplit(raw)
    if parts.scheme not in _DEFAULT_PORTS:
        raise ValueError("the scheme must be smtp:// or smtps://")
    try:
        port = parts.port or _DEFAULT_PORTS[parts.scheme]
    except ValueError:
        raise ValueError("the port must be a number from 1 to 65535") from None
    if not parts.hostname:
        raise ValueError("a host is required, e.g. smtp://127.0.0.1:1025")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ValueError("nothing may follow host:port")
    return SmtpTarget(
        host=parts.hostname, port=port, implicit_tls=parts.scheme == "smtps",
        username=unquote(parts.username) if parts.username else None,
        password=unquote(parts.password) if parts.password else None,
    )
