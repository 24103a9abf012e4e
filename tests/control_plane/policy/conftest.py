"""Fixtures for the policy tests: the web app and mail server from their own tests'
conftests (imported, not copied), and a material policy version of the test's own.

The version is published far in the future so it is the newest while the test runs;
it and its notices are deleted afterwards (tests share the session database, and a
material version left behind would put a banner on every other test's pages)."""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import date, timedelta

import asyncpg
import pytest

from tests.control_plane.mail.conftest import outbox_pool, smtp, smtp_down  # noqa: F401
from tests.control_plane.web.conftest import fake_idp, oidc_mock, web  # noqa: F401


@dataclass(frozen=True)
class PolicyFixture:
    version: str
    published_on: date
    summary: str


async def add_version(pool: asyncpg.Pool, material: bool) -> PolicyFixture:
    found = PolicyFixture(f"2999-{secrets.token_hex(3)}",
                        date(2900, 1, 1) + timedelta(days=secrets.randbelow(300_000)),
                        f"We now <b>explain</b> more & better {secrets.token_hex(2)}.")
    await pool.execute(
        "INSERT INTO policy_versions (version, published_on, material, summary, text_sha256)"
        " VALUES ($1, $2, $3, $4, 'test')", found.version, found.published_on, material,
        found.summary)
    return found


async def drop_version(pool: asyncpg.Pool, version: str) -> None:
    await pool.execute("DELETE FROM policy_notices WHERE version = $1", version)
    await pool.execute("DELETE FROM policy_versions WHERE version = $1", version)


@pytest.fixture
async def material(pool: asyncpg.Pool) -> AsyncIterator[PolicyFixture]:
    found = await add_version(pool, material=True)
    yield found
    await drop_version(pool, found.version)
