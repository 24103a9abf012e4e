"""The security headers and the Content-Security-Policy of every web response, in one
place (as Warehouse's ``csp.py``): one policy, serialised once at start-up.

Every asset is ours, so the policy allows only 'self', no inline script or style, no
framing, no plugins, no base-URI tricks, forms posting only to us. HSTS only when the
public URL is https. Never imports ``proxy``.
"""

from __future__ import annotations

from collections.abc import Mapping

from aiohttp import web

POLICY: Mapping[str, tuple[str, ...]] = {
    "default-src": ("'none'",),
    "script-src": ("'self'",),
    "style-src": ("'self'",),
    "img-src": ("'self'",),
    "font-src": ("'self'",),
    "connect-src": ("'self'",),
    "form-action": ("'self'",),
    "frame-ancestors": ("'none'",),
    "base-uri": ("'none'",),
    "object-src": ("'none'",),
}


def serialise(policy: Mapping[str, tuple[str, ...]]) -> str:
    return "; ".join(f"{name} {' '.join(values)}" for name, values in policy.items())


def headers(https: bool, connect: str | None = None) -> dict[str, str]:
    """``connect``: one more origin pages may send to (the Sentry ingestion endpoint of
    ``QNP_SENTRY_BROWSER_DSN``, only when it is configured)."""
    policy = dict(POLICY)
    if connect:
        policy["connect-src"] = (*POLICY["connect-src"], connect)
    found = {
        "Content-Security-Policy": serialise(policy),
        "X-Content-Type-Options": "nosniff",
        "Referrer-Policy": "same-origin",
        "X-Frame-Options": "DENY",
        "Cross-Origin-Opener-Policy": "same-origin",
        "Cross-Origin-Resource-Policy": "same-origin",
        "Permissions-Policy": "camera=(), microphone=(), geolocation=(), payment=()",
        # Pages and API answers are per person: no shared cache may keep them.
        "Cache-Control": "no-store",
    }
    if https:
        found["Strict-Transport-Security"] = "max-age=63072000; includeSubDomains"
    return found


def install(app: web.Application, https: bool, connect: str | None = None) -> None:
    """Add the headers to every response the app sends, errors and redirects included."""
    fixed = headers(https, connect)

    async def on_prepare(request: web.Request, response: web.StreamResponse) -> None:
        for name, value in fixed.items():
            response.headers.setdefault(name, value)

    app.on_response_prepare.append(on_prepare)
