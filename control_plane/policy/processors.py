"""Right to know and to information about sharing (CCPA, LGPD art. 18 VII, policy
clause 7): the processors QNP shares data with and what each receives, and, computed
from the account's own request logs, which upstream LLM providers received its
requests, how many and between which times.

The providers come from the daily provider totals ingest keeps with the usage rows
(``usage_daily_providers``), so the page reads a row per day and provider, never the
raw logs, and answers for as long as the account exists. Days from before those totals
existed keep only per-model totals (``usage_daily``), listed as the models used.
Imports asyncpg; never ``proxy`` or the web app.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import date, datetime

import asyncpg


@dataclass(frozen=True, slots=True)
class Processor:
    name: str
    purpose: str
    receives: str
    when: str  # "always", "with your consent", ...
    policy_url: str


PROCESSORS: tuple[Processor, ...] = (
    Processor("Stripe", "payment processing",
              "your payments: amount, currency, card or wallet details (entered on Stripe's "
              "own form, never stored by us) and a customer id tied to your account id",
              "when you top up", "https://stripe.com/privacy"),
    Processor("Sentry", "error monitoring",
              "error reports from your browser: browser type, operating system, device "
              "type, the page; never request or response content, cookies or headers",
              "only with your analytics consent", "https://sentry.io/privacy/"),
    Processor("Cloudflare", "CDN, DDoS protection and load balancing",
              "all traffic to qnp.ai and the API passes through it: your IP address, "
              "request headers and the encrypted traffic itself",
              "always (it carries the traffic)", "https://www.cloudflare.com/privacypolicy/"),
    Processor("Our e-mail provider", "sending e-mail",
              "your e-mail address and the messages we send you (sign-in notices, "
              "receipts, privacy requests, policy changes; marketing only with consent)",
              "when we e-mail you", ""),
    Processor("Upstream LLM providers", "answering your API requests",
              "the requests you send to the API, content included, forwarded as they "
              "are under the provider's own privacy policy; not your e-mail or name",
              "for every API request, to the provider of the model", ""),
)


@dataclass(frozen=True, slots=True)
class ProviderUse:
    provider: str
    requests: int
    first: datetime
    last: datetime


async def providers_used(conn: asyncpg.Pool | asyncpg.Connection, account_id: uuid.UUID
                         ) -> list[ProviderUse]:
    """Each upstream provider that received requests of the account, busiest first,
    from the daily provider totals (one row per day and provider: never the raw logs).
    Requests refused before reaching any provider have none."""
    rows = await conn.fetch(
        "SELECT provider, sum(requests)::bigint AS requests, min(first_at) AS first, "
        "max(last_at) AS last FROM usage_daily_providers WHERE account_id = $1 "
        "GROUP BY provider ORDER BY requests DESC, provider", account_id)
    return [ProviderUse(r["provider"], r["requests"], r["first"], r["last"]) for r in rows]


@dataclass(frozen=True, slots=True)
class ModelUse:
    model: str
    requests: int
    first: date
    last: date


async def models_before(conn: asyncpg.Pool | asyncpg.Connection, account_id: uuid.UUID
                        ) -> list[ModelUse]:
    """The models the account used on days before its first provider total (history
    from before those totals were kept), from the daily totals per model."""
    rows = await conn.fetch(
        "SELECT model, sum(requests)::bigint AS requests, min(day) AS first, "
        "max(day) AS last FROM usage_daily WHERE account_id = $1 AND day < ("
        "SELECT min(day) FROM usage_daily_providers WHERE account_id = $1) "
        "AND model <> '' GROUP BY model ORDER BY requests DESC, model", account_id)
    return [ModelUse(r["model"], r["requests"], r["first"], r["last"]) for r in rows]
