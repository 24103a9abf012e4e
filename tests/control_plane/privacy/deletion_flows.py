"""What a person does to delete their account, and what the deletion tests read back."""

from __future__ import annotations

import uuid
from typing import Any

import aiohttp

from control_plane.web.state import STORES
from tests.control_plane.web.conftest import Web, authorize_at_mock, path_of, start_signin

CONFIRM = {"confirm": "Delete my account"}  # case and spacing are forgiven


async def sign_in_again(web: Web, person: dict[str, Any], *, fresh: bool = False
                        ) -> aiohttp.ClientResponse:
    """An existing person's sign-in through the real mock provider; the callback's
    answer (a redirect)."""
    if fresh:  # the link the deletion page offers
        r = await web.client.get("/auth/dev/start", allow_redirects=False,
                                 params={"next": "/settings/deletion", "fresh": "1"})
        assert r.status == 302, await r.text()
        url = r.headers["Location"]
    else:
        url = await start_signin(web, "dev", "/settings/deletion")
    callback = await authorize_at_mock(url, person)
    return await web.client.get(path_of(callback), allow_redirects=False)


async def csrf_headers(web: Web) -> dict[str, str]:
    r = await web.client.get("/api/v1/session")
    assert r.status == 200, await r.text()
    return {**web.same_origin, "X-CSRF-Token": (await r.json())["data"]["csrf_token"]}


async def delete_account(web: Web, headers: dict[str, str]) -> dict[str, Any]:
    r = await web.client.post("/api/v1/account/deletion", json=CONFIRM, headers=headers)
    assert r.status == 202, await r.text()
    data: dict[str, Any] = (await r.json())["data"]
    return data


async def age_sessions(web: Web, account_id: str, minutes: int) -> None:
    """Move the account's sign-ins into the past (the database's clock, not ours)."""
    await web.client.server.app[STORES].pool.execute(
        "UPDATE web_sessions SET created_at = created_at - make_interval(mins => $2) "
        "WHERE account_id = $1", uuid.UUID(account_id), minutes)


async def fetchval(web: Web, sql: str, *args: Any) -> Any:
    return await web.client.server.app[STORES].pool.fetchval(sql, *args)
