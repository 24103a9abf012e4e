"""Stripe events localstripe does not emit (refunds, disputes), built as Stripe builds
them and signed with the webhook secret exactly as Stripe signs them (``conftest.sign``),
and the one way the tests deliver them."""

from __future__ import annotations

import uuid
from typing import Any

import aiohttp

from tests.control_plane.billing.conftest import event, sign
from tests.control_plane.web.conftest import Web


def event_id() -> str:
    return f"evt_{uuid.uuid4().hex[:24]}"


def succeeded(intent: str, amount_cents: int, eid: str | None = None) -> bytes:
    return event(eid or event_id(), "payment_intent.succeeded",
                 {"id": intent, "object": "payment_intent", "amount": amount_cents,
                  "amount_received": amount_cents, "currency": "usd",
                  "status": "succeeded"})


def refunded(intent: str, charge: str, amount_cents: int, refunds: list[tuple[str, int]],
             eid: str | None = None) -> bytes:
    """``charge.refunded`` after ``refunds`` (id, cents): amount_refunded is their sum,
    cumulative, as Stripe reports it."""
    total = sum(cents for _, cents in refunds)
    return event(eid or event_id(), "charge.refunded", {
        "id": charge, "object": "charge", "amount": amount_cents, "currency": "usd",
        "payment_intent": intent, "amount_refunded": total, "refunded": total == amount_cents,
        "refunds": {"object": "list", "has_more": False, "data": [
            {"id": rid, "object": "refund", "amount": cents, "charge": charge,
             "currency": "usd", "payment_intent": intent, "status": "succeeded"}
            for rid, cents in refunds]}})


def dispute(kind: str, intent: str, charge: str, dispute_id: str, amount_cents: int,
            status: str, eid: str | None = None, reason: str = "fraudulent") -> bytes:
    """``charge.dispute.<kind>`` (created, funds_withdrawn, funds_reinstated, closed)."""
    return event(eid or event_id(), f"charge.dispute.{kind}", {
        "id": dispute_id, "object": "dispute", "amount": amount_cents, "currency": "usd",
        "charge": charge, "payment_intent": intent, "reason": reason, "status": status,
        "is_charge_refundable": False})


async def deliver(web: Web, body: bytes) -> str:
    """POST it signed; the outcome the endpoint reports."""
    r: aiohttp.ClientResponse = await web.client.post(
        "/webhooks/stripe", data=body,
        headers={"Stripe-Signature": sign(body), "Content-Type": "application/json"})
    assert r.status == 200, await r.text()
    outcome: Any = (await r.json())["data"]["outcome"]
    return str(outcome)
