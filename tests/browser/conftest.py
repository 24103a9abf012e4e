"""Real-browser fixtures: Debian's Chromium (installed here on a fresh machine when it is
missing and we are root; a loud failure otherwise, never a skip) driven by Playwright,
a fresh profile per test, every request the browser makes recorded, axe-core (vendored)
for accessibility, and a screenshot of every page under ``test-artifacts/`` (gitignored).
"""

from __future__ import annotations

import os
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from playwright.async_api import BrowserContext, Page, Request, Route, async_playwright

from control_plane.consent.cookies import BY_NAME
from tests import debian_packages
from tests.control_plane.web.conftest import Web, fake_idp, oidc_mock, web  # noqa: F401

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu",
                 "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]
ROOT = Path(__file__).resolve().parents[2]
AXE = Path(__file__).parent / "vendor" / "axe-core" / "axe.min.js"
ARTIFACTS = ROOT / "test-artifacts" / "screenshots"


@pytest.fixture(scope="session")
def chromium() -> str:
    """The path of Debian's Chromium, installed first if this machine lacks it."""
    try:
        debian_packages.ensure("chromium", lambda: os.access(CHROMIUM, os.X_OK))
    except debian_packages.PackageMissing as e:
        pytest.fail(f"the browser tests cannot run: {e}", pytrace=False)
    return CHROMIUM


@pytest.fixture(scope="session")
def run_dir() -> Path:
    """This run's screenshot folder."""
    path = ARTIFACTS / time.strftime("%Y%m%d-%H%M%S")
    path.mkdir(parents=True, exist_ok=True)
    return path


@dataclass
class Seen:
    """What the browser did: every request (with the page it came from) and dialogs."""

    requests: list[tuple[str, str, bool]] = field(default_factory=list)  # url, frame, nav
    blocked: list[tuple[str, str]] = field(default_factory=list)
    dialogs: list[str] = field(default_factory=list)
    console_errors: list[tuple[str, str]] = field(default_factory=list)  # page url, text


@dataclass
class Browser:
    context: BrowserContext
    page: Page
    seen: Seen
    shots: Path
    origin: str

    async def shot(self, name: str) -> None:
        await self.page.screenshot(path=str(self.shots / f"{name}.png"), full_page=True)

    async def axe(self, exclude: tuple[str, ...] = ()) -> list[dict[str, Any]]:
        """The serious and critical axe-core violations of the page as it is now
        (``exclude``: selectors of markup that is not ours, such as a card form)."""
        if not await self.page.evaluate("typeof window.axe !== 'undefined'"):
            # Through the DevTools protocol, not a <script>: the page's CSP stays as is.
            await self.page.evaluate(AXE.read_text())
        result = await self.page.evaluate(
            "exclude => axe.run({exclude: exclude.map(s => [s])}, "
            "{resultTypes: ['violations']})", list(exclude))
        return [{"id": v["id"], "impact": v["impact"], "help": v["help"],
                 "nodes": [n["html"][:120] for n in v["nodes"]][:3]}
                for v in result["violations"] if v["impact"] in ("serious", "critical")]

    async def horizontal_overflow(self, width: int = 390) -> int:
        """How many pixels wider than ``width`` the page is at that viewport width."""
        size = self.page.viewport_size or {"width": 1280, "height": 900}
        await self.page.set_viewport_size({"width": width, "height": size["height"]})
        wide = int(await self.page.evaluate("document.documentElement.scrollWidth"))
        await self.page.set_viewport_size(size)
        return max(0, wide - width)


def undocumented(cookies: list[Any], host: str = "127.0.0.1") -> list[tuple[Any, ...]]:
    """The cookies a browser holds that are not in the one cookie table
    (control_plane.consent.cookies.COOKIES, which the /cookies page shows) with exactly
    its flags: host-only, Path=/, HttpOnly, Secure and SameSite as documented."""
    found = []
    for c in cookies:
        doc = BY_NAME.get(c["name"])
        flags = (c["domain"], c["path"], c["httpOnly"], c["secure"], c["sameSite"])
        if doc is None or flags != (host, "/", doc.http_only, doc.secure, doc.same_site):
            found.append((c["name"], *flags))
    return found


async def choose_cookies(page: Page, **boxes: bool) -> None:
    """Open the real "Cookie settings" (the footer's link opens the banner), set the
    boxes, confirm; wait until consent.js has applied the choice (banner hidden)."""
    banner = page.locator("#consent-banner")
    await page.get_by_role("link", name="Cookie settings").click()
    await banner.wait_for(state="visible")
    for purpose, on in boxes.items():
        await banner.locator(f"input[name={purpose}]").set_checked(on)
    await banner.get_by_role("button", name="Confirm my choices").click()
    await banner.wait_for(state="hidden")


def origin_of(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}"


@pytest.fixture
def third_party_origins() -> tuple[str, ...]:
    """Origins besides ours and the sign-in provider's the browser may reach: none,
    unless a test module says otherwise (the top-up's Stripe.js)."""
    return ()


@pytest.fixture
async def browser(chromium: str, tmp_path: Path, run_dir: Path, oidc_mock: str,  # noqa: F811
                  web: Web, third_party_origins: tuple[str, ...],  # noqa: F811
                  request: pytest.FixtureRequest) -> AsyncIterator[Browser]:
    """A fresh Chromium profile; requests to any origin but ours, the sign-in
    provider's and ``third_party_origins`` are refused (and recorded), so nothing
    leaves the machine."""
    profile = tmp_path / "chromium-profile"
    shots = run_dir / request.node.name
    shots.mkdir(parents=True, exist_ok=True)
    seen = Seen()
    async with async_playwright() as pw:
        context = await pw.chromium.launch_persistent_context(
            str(profile), executable_path=chromium, headless=True, args=CHROMIUM_ARGS,
            viewport={"width": 1280, "height": 900}, color_scheme="light",
            permissions=["clipboard-read", "clipboard-write"])
        allowed = {web.origin, origin_of(oidc_mock), *map(origin_of, third_party_origins)}

        def on_request(r: Request) -> None:
            frame = r.frame.url if not r.is_navigation_request() else ""
            seen.requests.append((r.url, frame, r.is_navigation_request()))

        async def route(r: Route) -> None:
            url = r.request.url
            if origin_of(url) in allowed:
                await r.continue_()
            else:
                seen.blocked.append((url, r.request.frame.url))
                await r.abort()

        context.on("request", on_request)
        await context.route("**/*", route)
        page = context.pages[0] if context.pages else await context.new_page()

        async def on_dialog(dialog: Any) -> None:
            seen.dialogs.append(dialog.message)
            await dialog.dismiss()

        page.on("dialog", on_dialog)
        page.on("console", lambda m: seen.console_errors.append((page.url, m.text))
                if m.type == "error" else None)
        try:
            yield Browser(context, page, seen, shots, web.origin)
        finally:
            await context.close()
