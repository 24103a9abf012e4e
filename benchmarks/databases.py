"""A database of a benchmark's own on a (throwaway or given) PostgreSQL server: made
empty for the run and dropped at its end, whatever happens."""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from urllib.parse import urlsplit, urlunsplit

import asyncpg


@asynccontextmanager
async def scratch_database(server_url: str) -> AsyncIterator[str]:
    """The DSN of a new, empty database on ``server_url``'s server."""
    name = f"qnp_bench_{secrets.token_hex(4)}"
    admin = await asyncpg.connect(server_url)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
        yield urlunsplit(urlsplit(server_url)._replace(path=f"/{name}"))
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()
