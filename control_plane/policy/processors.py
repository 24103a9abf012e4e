"""Right to know and to information about sharing (CCPA, LGPD art. 18 VII, policy
clause 7): the processors QNP shares data with and what each receives, and, computed
from the account's own request logs, which upstream LLM providers received its
requests, how many and between which times.

The providers come from ``usage_logs``, the one place a request's provider is
recorded, so they cover the logs' 30 days (policy clause 6); older days keep only
per-model totals (``usage_daily``), listed as the models used. (Adding the provider to
the rollups would change ingest's hot statement and its key for one rarely read page.)
Imports asyncpg; never ``proxy`` or the web app.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import date, datetime, timedelta

import asyncpg

LOG_DAYS = 30


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


async def providers_used(conn: asyncpg.Pool | asyncpg.Connection, account_id: uuid.UUID,
                         now: datetime) -> list[ProviderUse]:
    """Each upstream provider that received requests of the account in the last 30
    days, busiest first. Requests refused before reaching any provider have none."""
    rows = await conn.fetch(
        "SELECT provider, count(*) AS requests, min(received_at) AS first, "
        "max(received_at) AS last FROM usage_logs WHERE account_id = $1 "
        "AND received_at >= $2 AND provider IS NOT NULL GROUP BY provider "
        "ORDER BY requests DESC, provider", account_id, now - timedelta(days=LOG_DAYS))
    return [ProviderUse(r["provider"], r["requests"], r["first"], r["last"]) for r in rows]


@dataclass(frozen=True, slots=True)
class ModelUse:
    model: str
    requests: int
    first: date
    last: date


async def models_before(conn: asyncpg.Pool | asyncpg.Connection, account_id: uuid.UUID,
                        now: datetime) -> list[ModelUse]:
    """The models the account used before the logs' 30 days, from the daily totals."""
    rows = await conn.fetch(
        "SELECT model, sum(requests)::bigint AS requests, min(day) AS first, "
        "max(day) AS last FROM usage_daily WHERE account_id = $1 AND day < $2 "
        "AND model <> '' GROUP BY model ORDER BY requests DESC, model",
        account_id, (now - timedelta(days=LOG_DAYS)).date())
    return [ModelUse(r["model"], r["requests"], r["first"], r["last"]) for r in rows]
