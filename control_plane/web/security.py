"""The security headers and the Content-Security-Policy of every web response, in one
place (as Warehouse's ``csp.py``): one policy, serialised once at start-up.

Every asset is ours, so the policy allows only 'self', no inline script or style, no
framing, no plugins, no base-URI tricks, forms posting only to us. HSTS only when the
public URL is https. The one exception: the credits page loads Stripe.js (its card
form), so its policy (``payment_policy``) adds Stripe's origins, on that page only.
Never imports ``proxy``.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from urllib.parse import urlsplit

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


STRIPE_JS_ORIGIN = "https://js.stripe.com"
# What Stripe documents for Stripe.js besides its script's origin: its API (card data
# goes there from the page) and the frames of 3-D Secure.
STRIPE_EXTRA = {"connect-src": ("https://api.stripe.com",),
                "frame-src": ("https://hooks.stripe.com",)}


def serialise(policy: Mapping[str, tuple[str, ...]]) -> str:
    return "; ".join(f"{name} {' '.join(values)}" for name, values in policy.items())


def _policy(connect: str | None) -> dict[str, tuple[str, ...]]:
    """Ours; ``connect``: one more origin pages may send to (the Sentry ingestion
    endpoint of ``QNP_SENTRY_BROWSER_DSN``, only when it is configured)."""
    policy = dict(POLICY)
    if connect:
        policy["connect-src"] = (*POLICY["connect-src"], connect)
    return policy


@functools.cache
def payment_policy(stripe_js_url: str, connect: str | None = None) -> str:
    """The credits page's policy: ours plus the origin Stripe.js comes from (a
    localstripe's in development) for its script, its frames and its requests."""
    parts = urlsplit(stripe_js_url)
    origin = f"{parts.scheme}://{parts.netloc}"
    extra = STRIPE_EXTRA if origin == STRIPE_JS_ORIGIN else {}
    policy = _policy(connect)
    for name in ("script-src", "frame-src", "connect-src"):
        policy[name] = (*policy.get(name, ()), origin, *extra.get(name, ()))
    return serialise(policy)


def allow_payments(response: web.StreamResponse, stripe_js_url: str,
                   connect: str | None = None) -> None:
    """Give this one response the payment policy (``install`` then keeps it)."""
    response.headers["Content-Security-Policy"] = payment_policy(stripe_js_url, connect)


def headers(https: bool, connect: str | None = None) -> dict[str, str]:
    policy = _policy(connect)
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
