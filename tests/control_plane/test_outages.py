"""One WARNING per store outage and one line when it is back; an error left by a
connection lost mid-query counts as Postgres being unavailable, not as a bug."""

from __future__ import annotations

import logging
from typing import Any

import asyncpg
import pytest

from control_plane.metrics import Metrics
from control_plane.outages import POSTGRES, REDIS, Outages
from control_plane.service import maintain_once
from control_plane.settings import Settings


def test_an_outage_is_one_warning_and_one_recovery_line(caplog: pytest.LogCaptureFixture
                                                        ) -> None:
    caplog.set_level(logging.DEBUG, logger="control_plane.outages")
    outages = Outages()
    for _ in range(50):
        outages.failed(REDIS, ConnectionError("refused"), "ingest")
        outages.failed(REDIS, ConnectionError("refused"), "reconcile")
    outages.ok(REDIS)
    outages.ok(REDIS)
    outages.failed(REDIS, ConnectionError("refused"), "ingest")  # a second outage
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    infos = [r for r in caplog.records if r.levelno == logging.INFO]
    assert len(warnings) == 2 and len(infos) == 1
    assert all(r.exc_info is None for r in caplog.records)
    assert outages.is_down(REDIS) and not outages.is_down(POSTGRES)


class _LostMidQuery:
    """A pool whose connection breaks the way asyncpg reports it mid-query."""

    def acquire(self) -> Any:
        raise asyncpg.InternalClientError(
            "cannot switch to state 15; another operation (2) is in progress")


class _Trimmer:
    async def trim(self) -> int:
        return 0


async def test_a_query_cut_off_by_an_outage_is_an_outage_not_a_bug(
    settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    outages = Outages()
    await maintain_once(settings, _LostMidQuery(), _Trimmer(), Metrics(),  # type: ignore[arg-type]
                        outages=outages)
    assert outages.is_down(POSTGRES) and not outages.is_down(REDIS)
    assert not [r for r in caplog.records if r.exc_info]
