"""Every cookie the web service sets, in ONE table: the /cookies page is rendered from
it, and the browser tests assert that the cookies a browser holds are exactly these,
with these flags. A new cookie is added here first. Pure data; imports nothing of ours.

The consent cookie holds only a random UUID (version 4, 122 random bits), not a signed
value: it identifies a browser's choices before sign-in and grants nothing, and a
guessed or tampered id only names another random browser (the CSRF token of the
banner's form is bound to it, so it cannot be planted from another site either).
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass

STRICTLY_NECESSARY = "strictly necessary"
FUNCTIONAL = "functional"

SESSION_COOKIE = "__Host-qnp_session"  # == control_plane.auth.sessions.COOKIE
CONSENT_COOKIE = "__Host-qnp_consent"
THEME_COOKIE = "__Host-qnp_theme"
CONSENT_TTL_S = 180 * 24 * 3600  # a choice is asked again after six months (CNIL)
THEME_TTL_S = 365 * 24 * 3600


@dataclass(frozen=True, slots=True)
class Cookie:
    name: str
    purpose: str
    category: str  # STRICTLY_NECESSARY or a consent purpose
    lifetime: str  # as the /cookies page says it
    http_only: bool = True
    secure: bool = True
    same_site: str = "Lax"


COOKIES: tuple[Cookie, ...] = (
    Cookie(SESSION_COOKIE, "Keeps you signed in: a signed session id, nothing else.",
           STRICTLY_NECESSARY, "30 minutes, renewed while you use the site"),
    Cookie(CONSENT_COOKIE, "A random id for this browser's cookie choices, so they are "
           "remembered before you sign in.", STRICTLY_NECESSARY, "180 days"),
    Cookie("__Host-qnp_signin", "Ties a sign-in in progress to this browser.",
           STRICTLY_NECESSARY, "10 minutes, removed when sign-in completes",
           same_site="None"),
    Cookie("__Host-qnp_signup", "Ties a first sign-up in progress to this browser.",
           STRICTLY_NECESSARY, "30 minutes, removed when the account is created"),
    Cookie(THEME_COOKIE, "Remembers the light or dark theme you chose.", FUNCTIONAL,
           "1 year; only with functional consent, removed when it is withdrawn"),
)

BY_NAME = {c.name: c for c in COOKIES}


def parse_browser_id(raw: str | None) -> uuid.UUID | None:
    """The browser id in a consent cookie; None when absent or not one we set."""
    if raw is None or len(raw) != 36:
        return None
    try:
        found = uuid.UUID(raw)
    except ValueError:
        return None
    return found if found.version == 4 and str(found) == raw else None
