"""Signed-in people for the privacy rights' web tests: their session document, the
headers that act as them through the API, and plain form posts as a browser without
JavaScript makes them (the CSRF token in a form field)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import aiohttp

from tests.control_plane.web.conftest import Web, sign_in_new_user

COOKIE = "__Host-qnp_session"


@dataclass
class Person:
    web: Web
    me: dict[str, Any]
    cookie: str

    @property
    def api(self) -> dict[str, str]:
        return {"Cookie": f"{COOKIE}={self.cookie}", **self.web.same_origin,
                "X-CSRF-Token": self.me["csrf_token"]}

    @property
    def browser(self) -> dict[str, str]:
        return {"Cookie": f"{COOKIE}={self.cookie}", **self.web.same_origin}

    @property
    def email(self) -> str:
        email: str = self.me["user"]["email"]
        return email

    async def page(self, path: str) -> str:
        r = await self.web.client.get(path, headers=self.browser)
        assert r.status == 200, await r.text()
        return await r.text()

    async def form(self, path: str, **fields: str) -> aiohttp.ClientResponse:
        """A form posted from the page at /settings/privacy, with the token it holds."""
        page = await self.page("/settings/privacy")
        token = re.search(r'name="csrf_token" value="([^"]+)"', page)
        assert token is not None
        return await self.web.client.post(path, data={"csrf_token": token.group(1), **fields},
                                          headers=self.browser, allow_redirects=False)


async def person(web: Web, who: dict[str, Any] | None = None) -> Person:
    """Signed up through the real provider as ``who`` (a new person if None)."""
    me = await sign_in_new_user(web, who)
    cookie = next(c for c in web.client.session.cookie_jar if c.key == COOKIE)
    web.client.session.cookie_jar.clear()
    return Person(web, me, cookie.value)
