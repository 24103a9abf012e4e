"""The Usage page and its downloads (issue 12): spend and requests per day and tokens
per model from the daily rollups (never a scan of ``usage_logs``), filters by key,
model and date range kept in the URL (shareable), a keyset-paginated table of recent
requests, and CSV / JSON downloads of what the filters select, streamed in chunks
(constant memory). Never imports ``proxy``.
"""

from __future__ import annotations

import csv
import io
from datetime import UTC, date, datetime, timedelta
from typing import Any
from urllib.parse import urlencode

import orjson
from aiohttp import web

from control_plane import rollups, usage_history
from control_plane.errors import InvalidInput
from control_plane.web.dashboard import render, session_of
from control_plane.web.state import STORES

DEFAULT_DAYS = 30
MAX_DAYS = 400  # the longest range the filters accept (rollups outlive the 30-day logs)
CHART_HEIGHT = 120


def _day(raw: str | None, default: date, what: str) -> date:
    if not raw:
        return default
    try:
        return date.fromisoformat(raw)
    except ValueError:
        raise InvalidInput(f"{what} must be a date such as 2026-05-01") from None


def filters_of(request: web.Request) -> rollups.Filters:
    q = request.query
    today = datetime.now(UTC).date()
    until = _day(q.get("to"), today, "to")
    since = _day(q.get("from"), until - timedelta(days=DEFAULT_DAYS - 1), "from")
    if since > until:
        raise InvalidInput("from must not be after to")
    if (until - since).days >= MAX_DAYS:
        raise InvalidInput(f"choose a range of at most {MAX_DAYS} days")
    return rollups.Filters(since, until, q.get("key") or None, q.get("model") or None)


def query_of(filters: rollups.Filters, **more: str) -> str:
    values = {"from": filters.since.isoformat(), "to": filters.until.isoformat()}
    if filters.key_id:
        values["key"] = filters.key_id
    if filters.model:
        values["model"] = filters.model
    return urlencode({**values, **more})


def chart(days: list[rollups.Day], value: str) -> dict[str, Any]:
    """Bar geometry for the SVG chart (attributes, not inline styles: the CSP allows none)."""
    numbers = [int(getattr(d, value)) for d in days]
    top = max(numbers, default=0) or 1
    width = max(1, 600 // max(1, len(days)))
    return {"width": width * len(days), "height": CHART_HEIGHT, "bars": [
        {"x": i * width, "w": max(1, width - 1), "h": round(n / top * CHART_HEIGHT),
         "day": d.day.isoformat(), "n": n} for i, (d, n) in enumerate(zip(days, numbers,
                                                                           strict=True))]}


async def usage(request: web.Request) -> web.Response:
    session = session_of(request)
    filters = filters_of(request)
    pool = request.app[STORES].pool
    days = await rollups.per_day(pool, session.account_id, filters)
    models = await rollups.per_model(pool, session.account_id, filters)
    key_ids, model_names = await rollups.choices(pool, session.account_id, filters.since)
    before = usage_history.Cursor.parse(request.query.get("before"))
    recent, more = await usage_history.recent(pool, session.account_id, filters, before)
    return render(request, "usage.html", session, filters=filters, days=days, models=models,
                  key_ids=key_ids, model_names=model_names, recent=recent,
                  spend_chart=chart(days, "cost_micros"), requests_chart=chart(days, "requests"),
                  query=query_of(filters),
                  older=None if more is None else query_of(filters, before=more.token()),
                  total_requests=sum(d.requests for d in days),
                  total_cost=sum(d.cost_micros for d in days))


async def _download(request: web.Request, kind: str) -> web.StreamResponse:
    session = session_of(request)
    filters = filters_of(request)
    name = f"qnp-usage-{filters.since}-{filters.until}.{kind}"
    response = web.StreamResponse(headers={
        "Content-Type": "text/csv; charset=utf-8" if kind == "csv" else "application/json",
        "Content-Disposition": f'attachment; filename="{name}"'})
    await response.prepare(request)
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    if kind == "csv":
        writer.writerow(usage_history.COLUMNS)
    else:
        buffer.write("[")
    separator = ""
    async for chunk in usage_history.export(request.app[STORES].pool, session.account_id,
                                            filters):
        if kind == "csv":
            writer.writerows(chunk)  # records in COLUMNS order, id and time as text
        else:
            buffer.write(separator + ",".join(orjson.dumps(dict(r)).decode() for r in chunk))
            separator = ","
        await response.write(buffer.getvalue().encode())
        buffer.seek(0)
        buffer.truncate()
    if kind == "json":
        buffer.write("]")
    await response.write(buffer.getvalue().encode())
    await response.write_eof()
    return response


async def export_csv(request: web.Request) -> web.StreamResponse:
    return await _download(request, "csv")


async def export_json(request: web.Request) -> web.StreamResponse:
    return await _download(request, "json")


def add_routes(app: web.Application) -> None:
    app.router.add_get("/usage", usage)
    app.router.add_get("/usage/export.csv", export_csv)
    app.router.add_get("/usage/export.json", export_json)
