"""The privacy policy's versions: the manifest in ``texts/versions.toml`` (the source
of truth, shipped with the code), its mirror in the ``policy_versions`` table, and
what a user has acknowledged (the ``acceptances`` log, ``what = 'privacy_policy'``).

``sync`` runs when the web role starts: it checks QNP_POLICY_VERSION names the
manifest's latest version and that every version already in Postgres is the one in
the manifest (a published text never changes), then inserts the new ones. Either
failure stops the start-up with a message naming the version. Versions in Postgres
that the manifest does not know yet (a newer release rolling out) are left alone.

Imports asyncpg and the standard library; never ``proxy`` or the web app.
"""

from __future__ import annotations

import hashlib
import tomllib
import uuid
from dataclasses import dataclass
from datetime import date
from functools import cache
from pathlib import Path
from typing import Any, TypeAlias

import asyncpg

TEXTS = Path(__file__).parent / "texts"
MANIFEST = TEXTS / "versions.toml"
WHAT = "privacy_policy"  # the acceptances row a policy acknowledgement is

Executor: TypeAlias = asyncpg.Pool | asyncpg.Connection


class PolicyVersionError(RuntimeError):
    """The manifest, QNP_POLICY_VERSION and the database disagree; start-up stops."""


@dataclass(frozen=True, slots=True)
class PolicyVersion:
    version: str
    published_on: date
    material: bool
    summary: str
    text_file: str = ""

    @property
    def text(self) -> str:
        return (TEXTS / self.text_file).read_text("utf-8")

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.text.encode()).hexdigest()


def _entry(item: dict[str, Any]) -> PolicyVersion:
    try:
        found = PolicyVersion(version=item["version"], published_on=item["published"],
                              material=item["material"], summary=item["summary"],
                              text_file=item["text"])
    except KeyError as e:
        raise PolicyVersionError(f"{MANIFEST.name}: an entry lacks {e.args[0]!r}") from None
    if not (isinstance(found.version, str) and found.version
            and isinstance(found.published_on, date) and isinstance(found.material, bool)
            and isinstance(found.summary, str) and found.summary.strip()):
        raise PolicyVersionError(f"{MANIFEST.name}: entry {found.version!r} has a field "
                                 "of the wrong type")
    if "/" in found.text_file or not (TEXTS / found.text_file).is_file():
        raise PolicyVersionError(f"{MANIFEST.name}: the text of {found.version!r} "
                                 f"({found.text_file!r}) is not in {TEXTS.name}/")
    return found


@cache
@cache
def manifest() -> tuple[PolicyVersion, ...]:
    """Every version, oldest first (checked: unique, dates strictly increasing)."""
    items = tomllib.loads(MANIFEST.read_text("utf-8")).get("versions", [])
    found = tuple(_entry(item) for item in items)
    if not found:
        raise PolicyVersionError(f"{MANIFEST.name} lists no version")
    for older, newer in zip(found, found[1:], strict=False):
        if newer.published_on <= older.published_on:
            raise PolicyVersionError(f"{MANIFEST.name}: {newer.version!r} must be "
                                     f"published after {older.version!r}")
    return found


def latest() -> PolicyVersion:
    return manifest()[-1]


def get(version: str) -> PolicyVersion | None:
    return next((v for v in manifest() if v.version == version), None)


def material_version_of(policy_version: str) -> str:
    """The newest material version at or before ``policy_version``: what a choice made
    under an older one must be asked again for (cookie consent; a change that is not
    material asks nothing again). ``policy_version`` itself if the manifest lacks it
    (the web role refuses to start then: ``check_setting``)."""
    found = manifest()
    names = [v.version for v in found]
    if policy_version not in names:
        return policy_version
    upto = found[:names.index(policy_version) + 1]
    return next((v.version for v in reversed(upto) if v.material), upto[0].version)


def check_setting(policy_version: str) -> PolicyVersion:
    """The manifest's latest version, which QNP_POLICY_VERSION must name."""
    newest = latest()
    if policy_version != newest.version:
        raise PolicyVersionError(
            f"QNP_POLICY_VERSION={policy_version!r} is not the latest privacy policy "
            f"version {newest.version!r} ({MANIFEST.relative_to(TEXTS.parent.parent)})")
    return newest


async def sync(conn: asyncpg.Connection, policy_version: str) -> list[str]:
    """Check the setting and the database against the manifest and insert the versions
    Postgres lacks; the versions inserted."""
    check_setting(policy_version)
    known = {r["version"]: r for r in await conn.fetch(
        "SELECT version, published_on, material, text_sha256 FROM policy_versions")}
    added = []
    for v in manifest():
        row = known.get(v.version)
        if row is None:
            status = await conn.execute(
                "INSERT INTO policy_versions (version, published_on, material, summary, "
                "text_sha256) VALUES ($1, $2, $3, $4, $5) ON CONFLICT DO NOTHING",
                v.version, v.published_on, v.material, v.summary, v.sha256)
            if status.endswith(" 1"):
                added.append(v.version)
        elif (row["published_on"], row["material"], row["text_sha256"]) != (
                v.published_on, v.material, v.sha256):
            raise PolicyVersionError(
                f"privacy policy version {v.version!r} differs from the one published "
                "(date, materiality or text): a changed policy is a new version")
    return added


@dataclass(frozen=True, slots=True)
class Notice:
    """A material version a user has not acknowledged yet."""

    version: str
    published_on: date
    summary: str


async def latest_material_version(conn: Executor) -> str | None:
    """The newest version marked material (what consent and acknowledgements re-ask
    for), or None when there is none."""
    found: str | None = await conn.fetchval(
        "SELECT version FROM policy_versions WHERE material "
        "ORDER BY published_on DESC LIMIT 1")
    return found


async def latest_version(conn: Executor) -> str | None:
    found: str | None = await conn.fetchval(
        "SELECT version FROM policy_versions ORDER BY published_on DESC LIMIT 1")
    return found


# The newest material version, unless the user acknowledged it or a later version (by
# publication date; an acceptance of a version Postgres does not know covers nothing).
_PENDING = """
WITH m AS (SELECT version, published_on, summary FROM policy_versions WHERE material
           ORDER BY published_on DESC LIMIT 1)
SELECT m.version, m.published_on, m.summary FROM m
WHERE NOT EXISTS (
    SELECT 1 FROM acceptances a JOIN policy_versions v ON v.version = a.policy_version
    WHERE a.user_id = $1 AND a.what = 'privacy_policy' AND v.published_on >= m.published_on)
"""


async def pending_notice(conn: Executor, user_id: uuid.UUID) -> Notice | None:
    """The material change ``user_id`` still has to be shown, if any (one query)."""
    row = await conn.fetchrow(_PENDING, user_id)
    return None if row is None else Notice(row["version"], row["published_on"],
                                           row["summary"])


async def acknowledge(conn: Executor, user_id: uuid.UUID) -> str | None:
    """Record that ``user_id`` acknowledged the current (newest) version; which one."""
    found: str | None = await conn.fetchval(
        "INSERT INTO acceptances (user_id, what, policy_version) "
        "SELECT $1, $2, version FROM policy_versions ORDER BY published_on DESC LIMIT 1 "
        "RETURNING policy_version", user_id, WHAT)
    return found
