"""Policy versions: the manifest is well formed and names the text served, Postgres is
seeded from it when the web role starts, a QNP_POLICY_VERSION that is not the latest
version (or a published version changed after the fact) stops the start-up, and the
latest material version is what consent and acknowledgements re-ask for."""

from __future__ import annotations

from datetime import date

import asyncpg
import pytest
from aiohttp.test_utils import TestServer

from control_plane.policy import document, versions
from control_plane.runtime import open_stores
from control_plane.settings import Settings
from control_plane.web.app import make_web_app
from tests.control_plane.factories import make_settings
from tests.control_plane.policy.conftest import add_version, drop_version
from tests.support import free_port


def test_the_manifest_names_the_shipped_policy_and_the_default_setting() -> None:
    newest = versions.latest()
    default = Settings(database_url="postgresql://", redis_url="redis://").policy_version
    assert newest.version == default == "2026-04"
    assert newest.material
    doc = document.parse(newest.text)
    assert doc.title == "Privacy Policy"
    assert doc.last_updated == "April 2026"
    assert [c.number for c in doc.clauses] == list(range(1, 15))
    rights = next(c for c in doc.clauses if c.number == 9)
    assert [b.text for b in rights.blocks if b.kind == "h3"] == [
        "All Users", "EU/EEA Residents (GDPR)", "California Residents (CCPA/CPRA)",
        "Turkey Residents (KVKK)", "Brazil Residents (LGPD)"]
    cookies = next(c for c in doc.clauses if c.number == 5)
    items = [i for b in cookies.blocks if b.kind == "ul" for i in b.items]
    assert items[0][0] == "Strictly Necessary"
    assert items[0][1].startswith("HTTP-only JWT authentication cookies")


async def test_the_web_role_seeds_the_versions_and_stays_consistent(
        pool: asyncpg.Pool, settings: Settings) -> None:
    async with pool.acquire() as conn:
        await versions.sync(conn, settings.policy_version)  # as any earlier start did
        assert await versions.sync(conn, settings.policy_version) == []  # idempotent
    row = await pool.fetchrow("SELECT * FROM policy_versions WHERE version = '2026-04'")
    assert row is not None
    newest = versions.latest()
    assert (row["published_on"], row["material"], row["text_sha256"]) == (
        newest.published_on, True, newest.sha256)


async def test_a_setting_that_is_not_the_latest_version_stops_the_web_role(
        migrated_url: str, redis_url: str, redis_names: object) -> None:
    port = free_port()
    wrong = make_settings(migrated_url, redis_url, redis_names,  # type: ignore[arg-type]
                          QNP_POLICY_VERSION="2025-01", QNP_WEB_PORT=str(port),
                          QNP_PUBLIC_URL=f"http://127.0.0.1:{port}")
    async with open_stores(wrong) as stores:
        server = TestServer(make_web_app(wrong, stores), host="127.0.0.1", port=port)
        try:
            with pytest.raises(versions.PolicyVersionError,
                               match="QNP_POLICY_VERSION='2025-01'"):
                await server.start_server()
        finally:
            await server.close()


async def test_a_published_version_changed_afterwards_stops_the_start_up(
        pool: asyncpg.Pool, settings: Settings) -> None:
    async with pool.acquire() as conn, conn.transaction():
        await versions.sync(conn, settings.policy_version)
        await conn.execute("UPDATE policy_versions SET text_sha256 = 'edited' "
                           "WHERE version = '2026-04'")
        with pytest.raises(versions.PolicyVersionError, match="'2026-04' differs"):
            await versions.sync(conn, settings.policy_version)
        await conn.execute("UPDATE policy_versions SET text_sha256 = $1 "
                           "WHERE version = '2026-04'", versions.latest().sha256)


async def test_the_latest_material_version_skips_minor_ones(
        pool: asyncpg.Pool, settings: Settings) -> None:
    async with pool.acquire() as conn:
        await versions.sync(conn, settings.policy_version)
    assert await versions.latest_material_version(pool) == "2026-04"
    minor = await add_version(pool, material=False)
    try:
        assert await versions.latest_version(pool) == minor.version
        assert await versions.latest_material_version(pool) == "2026-04"
        major = await add_version(pool, material=True)
        try:
            assert await versions.latest_material_version(pool) == major.version
        finally:
            await drop_version(pool, major.version)
    finally:
        await drop_version(pool, minor.version)


def test_cookie_choices_are_asked_again_only_after_a_material_change(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Policy clause 13 / issue 15: "a new version re-asks for cookie consent" when it is
    material; a minor one asks nothing again."""
    def v(name: str, day: int, material: bool) -> versions.PolicyVersion:
        return versions.PolicyVersion(name, date(2027, 1, day), material, "s")

    shipped = (v("2027-01-01", 1, True), v("2027-01-05", 5, False),
               v("2027-01-09", 9, True), v("2027-01-12", 12, False))
    monkeypatch.setattr(versions, "manifest", lambda: shipped)
    assert versions.material_version_of("2027-01-05") == "2027-01-01"  # minor: no re-ask
    assert versions.material_version_of("2027-01-09") == "2027-01-09"  # material: re-ask
    assert versions.material_version_of("2027-01-12") == "2027-01-09"
    assert versions.material_version_of("1999-01") == "1999-01"  # not shipped: itself
