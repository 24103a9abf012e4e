"""The TLS policy both services apply (privacy policy clause 10: TLS 1.2 or newer in transit).

Owns the protocol floor and the TLS 1.2 cipher list, as data: each service builds its
own ``ssl.SSLContext`` from them (``proxy.tls``, ``control_plane.tls``), so the two
listeners and every client connection cannot drift apart. Pure code, no I/O.
"""

from __future__ import annotations

# The lowest protocol any listener or client of ours speaks (an ``ssl.TLSVersion`` name).
MIN_VERSION = "TLSv1_2"
# TLS 1.2 suites: forward secrecy (ECDHE) and authenticated encryption (GCM, ChaCha20)
# only, for ECDSA and RSA certificates alike; CBC, RSA key exchange, DHE and SHA-1 MACs
# are out. TLS 1.3's suites are all of that kind, and OpenSSL's defaults are kept.
TLS12_CIPHERS = (
    "ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-RSA-AES128-GCM-SHA256:"
    "ECDHE-ECDSA-AES256-GCM-SHA384:ECDHE-RSA-AES256-GCM-SHA384:"
    "ECDHE-ECDSA-CHACHA20-POLY1305:ECDHE-RSA-CHACHA20-POLY1305"
)
# What our HTTP/1.1 servers tell a client that offers ALPN (Cloudflare's origin pulls do).
ALPN_HTTP1 = ("http/1.1",)
