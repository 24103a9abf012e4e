"""The audit log: who did what to which target, when. Every admin action and every
staff-role change writes one row; rows are kept and exported (``export``). Rows name
actors and targets by id or role, never by email. Never imports ``proxy``."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

import asyncpg
import orjson


async def record(conn: asyncpg.Pool | asyncpg.Connection, actor: str, action: str,
                 target: str, account_id: uuid.UUID | None = None,
                 detail: dict[str, Any] | None = None) -> None:
    await conn.execute(
        "INSERT INTO audit_log (actor, action, target, account_id, detail) "
        "VALUES ($1, $2, $3, $4, $5::jsonb)",
        actor, action, target, account_id, orjson.dumps(detail or {}).decode())


async def export(conn: asyncpg.Pool | asyncpg.Connection, since: datetime | None = None,
                 limit: int = 10_000) -> list[dict[str, Any]]:
    rows = await conn.fetch(
        "SELECT id, at, actor, action, target, account_id, detail::text AS detail "
        "FROM audit_log WHERE ($1::timestamptz IS NULL OR at >= $1) ORDER BY id LIMIT $2",
        since, limit)
    return [{"id": r["id"], "at": r["at"].isoformat(), "actor": r["actor"],
             "action": r["action"], "target": r["target"],
             "account_id": None if r["account_id"] is None else str(r["account_id"]),
             "detail": orjson.loads(r["detail"])} for r in rows]
