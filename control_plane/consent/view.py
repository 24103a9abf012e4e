"""What a page may do under a browser's or account's consent: the banner, the scripts of
each category, the theme. Pure derivation from the recorded state, the request's
Global Privacy Control signal and the account's restriction; no I/O, no web imports.

Choices are recorded under the policy version in force (``QNP_POLICY_VERSION``); the
banner asks again when a choice is older than the latest *material* version
(``policy.versions.material_version_of``). Versions compare as strings, so they must
sort by date (``YYYY-MM`` or ``YYYY-MM-DD``).
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass

from control_plane.consent.records import ConsentState

BANNER_PURPOSES = ("functional", "analytics")
GPC_PURPOSES = ("analytics", "marketing_email")  # what Sec-GPC: 1 turns off
THEMES = ("light", "dark")


@dataclass(frozen=True, slots=True)
class Loaded:
    """The recorded state of an account or browser, with what the banner needs."""

    state: ConsentState
    banner_version: str | None  # the oldest policy version among the banner's purposes
    withdrawn: frozenset[str]  # purposes whose latest row is a withdrawal
    restricted: bool = False


def gpc_pending(loaded: Loaded) -> tuple[str, ...]:
    """Purposes GPC must still record as withdrawn (once: after it, the latest row of
    each is a withdrawal and nothing more is written)."""
    return tuple(p for p in GPC_PURPOSES if p not in loaded.withdrawn)


@dataclass(frozen=True, slots=True)
class ConsentView:
    """The template context ``consent`` of every page."""

    granted: frozenset[str]
    gpc: bool  # the request carried Sec-GPC: 1
    restricted: bool
    signed_in: bool
    show_banner: bool
    policy_version: str  # the current one
    csrf_token: str
    next: str  # where the banner's form comes back to
    browser_id: uuid.UUID | None = None
    minted: bool = False  # the browser had no consent cookie: set it with this page
    theme: str | None = None  # a stored theme choice, only with functional consent
    gpc_to_record: bool = False  # signed in and GPC not yet recorded (consent.js posts)

    @property
    def analytics_allowed(self) -> bool:
        return "analytics" in self.granted and not self.gpc and not self.restricted

    @property
    def analytics_offered(self) -> bool:
        """May this page carry the analytics scripts, inert, for consent.js to start once
        analytics is granted (without a reload)? Never under GPC or for a restricted
        account: then they are not even on the page."""
        return not self.gpc and not self.restricted

    @property
    def functional(self) -> bool:
        return "functional" in self.granted

    @property
    def analytics(self) -> bool:
        return "analytics" in self.granted and not self.gpc

    @property
    def marketing_email(self) -> bool:
        return "marketing_email" in self.granted and not self.gpc

    @property
    def granted_list(self) -> list[str]:
        return sorted(self.granted)


def effective(granted: frozenset[str], gpc: bool) -> frozenset[str]:
    """Under GPC analytics and marketing are off whatever was recorded."""
    return granted - set(GPC_PURPOSES) if gpc else granted


def shows_banner(loaded: Loaded, reask_from: str) -> bool:
    """Until both banner purposes are decided, and again when the choice is older than
    ``reask_from``, the latest material policy version."""
    if not all(p in loaded.state.decided for p in BANNER_PURPOSES):
        return True
    return loaded.banner_version is None or loaded.banner_version < reask_from


def stored_theme(raw: str | None, granted: frozenset[str]) -> str | None:
    return raw if raw in THEMES and "functional" in granted else None
