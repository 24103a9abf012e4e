"""The web service's billing routes: ``POST /api/v1/credits/topup`` (a signed-in
session; the guard checks CSRF), ``POST /api/v1/credits/topup/complete`` (the page's
return path: credits a succeeded payment even if its webhook is lost),
``GET /api/v1/credits/topup/quote`` (the fee, shown before paying) and
``POST /webhooks/stripe`` (Stripe's signature on the raw body, tolerance 300 s;
listed in guard.CSRF_EXEMPT): payments credit (``payments``), refunds and disputes
reverse (``reversals``). A middleware puts the signed-in account's open disputes into
every dashboard page's context (``_hold_notice.html`` in the layout). The Stripe
client lives in the app's ``cleanup_ctx``.
Handlers stay thin: SQL is in ``payments``, Stripe in ``gateway``.
Never imports ``proxy``.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import stripe
from aiohttp import web
from prometheus_client import CollectorRegistry, Counter

from control_plane.billing import payments, reversals, topups
from control_plane.billing.gateway import StripeGateway
from control_plane.errors import Forbidden, InvalidInput, Unavailable
from control_plane.web.account_api import data_response, json_body
from control_plane.web.errors import Handler
from control_plane.web.guard import caller
from control_plane.web.state import CALLER, PAGE_CONTEXT, SETTINGS, STORES, is_page

log = logging.getLogger(__name__)

WEBHOOK_TOLERANCE_S = 300
SUCCEEDED = "payment_intent.succeeded"


class BillingMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.webhooks = Counter(
            "qnp_billing_webhooks", "Stripe webhook deliveries by outcome "
            "(credited, reversed, reinstated, recorded, duplicate, ignored, unmatched, "
            "mismatch, bad_signature).",
            ["outcome"], registry=registry)
        self.unknown_types = Counter(
            "qnp_billing_webhook_unknown_types",
            "Stripe events acknowledged without handling, by type.", ["type"],
            registry=registry)


@dataclass(slots=True)
class Billing:
    metrics: BillingMetrics
    gateway: StripeGateway | None = None  # None: no secret key configured

    def require_gateway(self) -> StripeGateway:
        if self.gateway is None:
            raise Unavailable("top-ups are not configured on this server")
        return self.gateway


BILLING = web.AppKey("billing", Billing)




async def topup(request: web.Request) -> web.Response:
    found = caller(request)
    if found.session is None:
        raise Forbidden("top-ups are made from a signed-in session")
    body = await json_body(request)
    request_id = topups.parse_request_id(body.get("request_id"))
    billing = request.app[BILLING]
    started = await topups.start_topup(
        request.app[STORES].pool, billing.require_gateway(), request.app[SETTINGS].billing,
        found.account_id, body.get("amount_cents"), request_id)
    return data_response(started.to_json(), 201)


async def topup_complete(request: web.Request) -> web.Response:
    found = caller(request)
    if found.session is None:
        raise Forbidden("top-ups are made from a signed-in session")
    body = await json_body(request)
    stores = request.app[STORES]
    done = await topups.complete_topup(
        stores.pool, stores.redis, stores.settings.names,
        request.app[BILLING].require_gateway(), found.account_id,
        body.get("payment_intent_id"))
    return data_response(done.to_json())


async def topup_quote(request: web.Request) -> web.Response:
    caller(request)
    try:
        cents = int(request.query.get("amount_cents", ""))
    except ValueError:
        raise InvalidInput("amount_cents must be an integer number of cents") from None
    return data_response(topups.quote(request.app[SETTINGS].billing, cents).to_json())


def _verified(payload: bytes, signature: str | None, secret: str) -> Any:
    try:
        return stripe.Webhook.construct_event(payload, signature, secret,
                                              tolerance=WEBHOOK_TOLERANCE_S)
    except stripe.SignatureVerificationError:
        raise InvalidInput("the Stripe signature does not verify") from None
    except ValueError:  # not UTF-8 or not JSON (json.JSONDecodeError is a ValueError)
        raise InvalidInput("the body is not a Stripe event") from None


async def stripe_webhook(request: web.Request) -> web.Response:
    secret = request.app[SETTINGS].billing.stripe_webhook_secret
    if not secret:
        raise Unavailable("Stripe webhooks are not configured on this server")
    metrics = request.app[BILLING].metrics
    try:
        event = _verified(await request.read(), request.headers.get("Stripe-Signature"),
                          secret)
    except InvalidInput:
        metrics.webhooks.labels("bad_signature").inc()
        raise
    obj = event.data.object.to_dict()
    outcome = await _handle(request, str(event.id), str(event.type), obj)
    metrics.webhooks.labels(outcome).inc()
    if outcome == "ignored":
        metrics.unknown_types.labels(str(event.type)).inc()
    log.info("stripe webhook event_id=%s type=%s outcome=%s", event.id, event.type, outcome)
    return data_response({"received": True, "outcome": outcome})


async def _handle(request: web.Request, event_id: str, event_type: str,
                  obj: dict[str, Any]) -> str:
    stores = request.app[STORES]
    if event_type == reversals.REFUNDED:
        return (await reversals.refunded(
            stores.pool, stores.redis, stores.settings.names, obj, event_id=event_id,
            event_type=event_type, cause=event_id)).outcome
    if event_type in reversals.DISPUTE_EVENTS:
        return (await reversals.disputed(
            stores.pool, stores.redis, stores.settings.names, obj, event_id=event_id,
            event_type=event_type)).outcome
    if event_type != SUCCEEDED:
        return "ignored"  # acknowledged, so Stripe stops retrying; counted
    if await payments.event_seen(stores.pool, event_id):
        return "duplicate"
    intent_id = str(obj.get("id"))
    found = await payments.topup_of_intent(stores.pool, intent_id)
    if found is None:
        log.warning("stripe payment not started here payment_intent=%s", intent_id)
        await payments.record_event(stores.pool, event_id, event_type)
        return "unmatched"
    # localstripe's PaymentIntents carry no amount_received; Stripe's always do.
    received = int(obj.get("amount_received", obj.get("amount")) or 0)
    if received < found.amount_cents or obj.get("currency") != found.currency:
        log.error("stripe payment does not match its top-up payment_intent=%s "
                  "received=%d expected=%d", intent_id, received, found.amount_cents)
        await payments.record_event(stores.pool, event_id, event_type)
        return "mismatch"
    done = await payments.credit_payment(stores.pool, stores.redis, stores.settings.names,
                                         found, event_id=event_id, event_type=event_type)
    if done.credited:  # the history's card and receipt, if the return path has not
        await topups.note_details(stores.pool, request.app[BILLING].gateway, intent_id)
    return "credited" if done.credited else "duplicate"


async def _stripe_client(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS].billing
    billing = app[BILLING]
    if settings.stripe_secret_key:
        billing.gateway = StripeGateway(settings)
    try:
        yield
    finally:
        if billing.gateway is not None:
            await billing.gateway.close()




@web.middleware
async def hold_notice(request: web.Request, handler: Handler) -> web.StreamResponse:
    """A dashboard page shows the account's open disputes (its keys are paused)."""
    found = request[CALLER] if CALLER in request else None
    if found is not None and found.session is not None and is_page(request):
        context = request.setdefault(PAGE_CONTEXT, {})
        context["billing_holds"] = await reversals.holds(request.app[STORES].pool,
                                                         found.account_id)
    return await handler(request)


def add_routes(app: web.Application) -> None:
    app[BILLING] = Billing(BillingMetrics(app[STORES].metrics.registry))
    app.middlewares.append(hold_notice)  # innermost: after guard identified the caller
    app.cleanup_ctx.append(_stripe_client)
    app.router.add_post("/api/v1/credits/topup", topup)
    app.router.add_post("/api/v1/credits/topup/complete", topup_complete)
    app.router.add_get("/api/v1/credits/topup/quote", topup_quote)
    app.router.add_post("/webhooks/stripe", stripe_webhook)
