"""The one place that talks to Stripe: the official SDK's async client, pointed at
``BillingSettings.stripe_api_base`` (Stripe, or localstripe in tests and ``make run``).

Every SDK failure leaves as ``StripeUnavailable`` (Stripe could not be reached or
failed) or ``StripeRefused`` (Stripe answered no), with a message safe to show: never
the key. Must not import ``control_plane.web`` or ``proxy``.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import stripe

from control_plane.errors import InvalidInput, Unavailable
from control_plane.settings import BillingSettings

log = logging.getLogger(__name__)


class StripeUnavailable(Unavailable):
    """Stripe did not answer, or failed; nothing was charged by this call."""


class StripeRefused(InvalidInput):
    """Stripe refused the request; the message is Stripe's own, for the user, and
    ``code`` Stripe's reason code (``card_declined``...), never card data."""

    def __init__(self, message: str, code: str | None = None) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True, slots=True)
class Intent:
    id: str
    client_secret: str
    amount_cents: int
    currency: str
    status: str
    failure: str | None = None  # Stripe's reason for the last failed attempt, to show
    # Display data Stripe returns (expanded payment_method and latest_charge); no card
    # number ever reaches us.
    card_brand: str | None = None
    card_last4: str | None = None
    receipt_url: str | None = None


class StripeGateway:
    """Customers and PaymentIntents, with idempotency keys; opened once per process."""

    def __init__(self, settings: BillingSettings) -> None:
        if not settings.stripe_secret_key:
            raise Unavailable("top-ups are not configured (QNP_STRIPE_SECRET_KEY)")
        self._http = stripe.AIOHTTPClient(timeout=settings.stripe_timeout_s)
        # No SDK retries: the caller's idempotency key makes a user's retry safe, and a
        # click should fail fast with a clear error rather than hang.
        self._client = stripe.StripeClient(
            settings.stripe_secret_key, http_client=self._http, max_network_retries=0,
            base_addresses={"api": settings.stripe_api_base})

    async def close(self) -> None:
        await self._http.close_async()  # type: ignore[no-untyped-call]

    async def create_customer(self, account_id: str) -> str:
        customer = await self._call(
            self._client.v1.customers.create_async,
            {"metadata": {"qnp_account_id": account_id}},
            # One Customer per account even if two first top-ups race.
            f"qnp-customer-{account_id}")
        return str(customer.id)

    async def delete_customer(self, customer_id: str) -> bool:
        """Delete a Customer at Stripe (account deletion, issue 14): Stripe then keeps
        only what its own legal duties need. False when Stripe has no such customer
        (already deleted: the purge may run twice)."""
        try:
            await self._client.v1.customers.delete_async(customer_id)
        except stripe.InvalidRequestError as e:
            if e.http_status == 404 or e.code == "resource_missing":
                return False
            log.info("stripe refused a customer deletion: %s", type(e).__name__)
            raise StripeRefused("the payment provider refused to delete the customer"
                                ) from None
        except stripe.StripeError as e:
            log.warning("stripe unavailable: %s", type(e).__name__)
            raise StripeUnavailable("the payment provider cannot be reached") from None
        return True

    async def create_intent(self, *, customer: str, amount_cents: int, currency: str,
                            account_id: str, credit_cents: int, idempotency_key: str
                            ) -> Intent:
        intent = await self._call(
            self._client.v1.payment_intents.create_async,
            {"amount": amount_cents, "currency": currency, "customer": customer,
             "metadata": {"qnp_account_id": account_id, "credit_cents": str(credit_cents)}},
            idempotency_key)
        return _intent(intent)

    async def retrieve_intent(self, intent_id: str) -> Intent:
        return _intent(await self._call(
            self._client.v1.payment_intents.retrieve_async, intent_id, None,
            params={"expand": ["payment_method", "latest_charge"]}))

    # --- saved cards and off-session charges (auto top-up, H22) ---

    async def create_setup_intent(self, *, customer: str, account_id: str,
                                  idempotency_key: str) -> tuple[str, str]:
        """A SetupIntent saving a card for off-session use: (id, client secret)."""
        setup = await self._call(
            self._client.v1.setup_intents.create_async,
            {"customer": customer, "usage": "off_session",
             "metadata": {"qnp_account_id": account_id}}, idempotency_key)
        return str(setup.id), str(setup.client_secret)

    async def saved_card(self, setup_intent_id: str) -> SavedCard:
        """The card a succeeded SetupIntent saved, attached to its Customer."""
        setup = (await self._call(self._client.v1.setup_intents.retrieve_async,
                                  setup_intent_id, None)).to_dict()
        if setup.get("status") != "succeeded" or not setup.get("payment_method"):
            raise StripeRefused("the card was not saved; please enter it again",
                                str(setup.get("status")))
        method_id = str(setup["payment_method"])
        method = (await self._call(self._client.v1.payment_methods.retrieve_async,
                                   method_id, None)).to_dict()
        customer = str(setup.get("customer") or "")
        if method.get("customer") != customer:
            # Stripe attaches it when the SetupIntent succeeds; localstripe does not.
            await self._call(self._client.v1.payment_methods.attach_async, method_id,
                             f"qnp-attach-{setup_intent_id}", {"customer": customer})
        card = method.get("card") or {}
        return SavedCard(setup_intent_id, customer, method_id, str(card.get("brand", "")),
                         str(card.get("last4", "")))

    async def charge_off_session(self, *, customer: str, payment_method: str,
                                 amount_cents: int, currency: str, account_id: str,
                                 credit_cents: int, idempotency_key: str) -> Intent:
        """Charge the saved card with the customer away; a decline is StripeRefused
        with Stripe's code."""
        intent = await self._call(
            self._client.v1.payment_intents.create_async,
            {"amount": amount_cents, "currency": currency, "customer": customer,
             "payment_method": payment_method, "confirm": True, "off_session": True,
             "metadata": {"qnp_account_id": account_id, "credit_cents": str(credit_cents),
                          "qnp_kind": "auto_topup"}},
            idempotency_key)
        return _intent(intent)
    async def listed(self, kind: str, since: int, until: int | None = None,
                     **filters: str) -> AsyncIterator[dict[str, Any]]:
        """``payment_intents`` or ``refunds`` created in [since, until), as Stripe lists
        them: newest first, a page of 100 at a time, stopping at the first older one."""
        service: Any = {"payment_intents": self._client.v1.payment_intents,
                        "refunds": self._client.v1.refunds}[kind]
        after: str | None = None
        while True:
            params: dict[str, Any] = {"limit": 100, **filters}
            if after is not None:
                params["starting_after"] = after
            page = (await self._call(service.list_async, params, None)).to_dict()
            items: list[dict[str, Any]] = page.get("data") or []
            for item in items:
                if int(item["created"]) < since:
                    return
                if until is None or int(item["created"]) < until:
                    yield item
            if not page.get("has_more") or not items:
                return
            after = str(items[-1]["id"])

    async def charge_intent(self, charge_id: str) -> str | None:
        """The PaymentIntent a charge belongs to (a refund may name only its charge)."""
        charge = (await self._call(self._client.v1.charges.retrieve_async, charge_id,
                                   None)).to_dict()
        intent = charge.get("payment_intent")
        return intent if isinstance(intent, str) else None

    @staticmethod
    async def _call(method: Any, first: Any, idempotency_key: str | None, *args: Any,
                    params: dict[str, Any] | None = None) -> Any:
        options = {"idempotency_key": idempotency_key} if idempotency_key else {}
        more = {} if params is None else {"params": params}
        try:
            return await method(first, *args, options=options, **more)
        except (stripe.APIConnectionError, stripe.APIError, stripe.RateLimitError) as e:
            log.warning("stripe unavailable: %s", type(e).__name__)
            raise StripeUnavailable(
                "the payment provider cannot be reached; nothing was charged, "
                "please try again in a minute") from None
        except stripe.AuthenticationError:
            log.error("stripe refused our API key")
            raise StripeUnavailable("top-ups are misconfigured; nothing was charged") from None
        except stripe.StripeError as e:
            log.info("stripe refused: %s", type(e).__name__)
            raise StripeRefused(e.user_message or "the payment provider refused the top-up",
                                _reason(e)) from None


def _reason(e: stripe.StripeError) -> str | None:
    """Stripe's reason code: a card's decline code (``insufficient_funds``) if given,
    else the error's code (``card_declined``)."""
    decline = getattr(e.error, "decline_code", None) if e.error is not None else None
    return str(decline) if decline else e.code


@dataclass(frozen=True, slots=True)
class SavedCard:
    setup_intent_id: str
    customer: str
    payment_method_id: str
    brand: str
    last4: str


def _intent(obj: Any) -> Intent:
    data = obj.to_dict()
    error = data.get("last_payment_error") or {}
    method, charge = data.get("payment_method"), data.get("latest_charge")
    card = (method.get("card") or {}) if isinstance(method, dict) else {}
    receipt = charge.get("receipt_url") if isinstance(charge, dict) else None
    return Intent(id=str(data["id"]), client_secret=str(data["client_secret"]),
                  # localstripe's PaymentIntents carry no amount_received; Stripe's do.
                  amount_cents=int(data.get("amount_received") or data["amount"]),
                  currency=str(data["currency"]), status=str(data["status"]),
                  failure=error.get("message"),
                  card_brand=_short(card.get("brand")),
                  card_last4=last4 if isinstance(last4 := card.get("last4"), str)
                  and len(last4) == 4 and last4.isdigit() else None,
                  # Shown as a link: Stripe's https receipts only, never another scheme.
                  receipt_url=receipt if isinstance(receipt, str)
                  and receipt.startswith("https://") and len(receipt) < 500 else None)


def _short(value: object) -> str | None:
    return value[:20] if isinstance(value, str) and value else None
