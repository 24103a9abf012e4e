"""localstripe (PyPI, a stateful Stripe fake), served on 127.0.0.1 for ``make run`` and
the tests, with three things real Stripe does that localstripe 1.15 lacks, so that our
code runs against it unchanged:

- **Stripe.js's confirm.** localstripe's Stripe.js stand-in (``/js.stripe.com/v3/``)
  has ``confirmCardPayment`` ignore the card and only finish a 3-D Secure step. Stripe.js
  sends the card element's data to ``POST /v1/payment_intents/<id>/confirm`` with the
  publishable key and the client secret; we serve localstripe's own script plus
  ``localstripe_confirm.js`` that does that, and accept that request here (the card
  goes from the page to this server, as it goes to Stripe: never to ours). Its
  ``confirmCardSetup`` (saving a card) does post the card's data, to a route localstripe
  opens to the publishable key; the script only takes the number's spaces out first.
- **Idempotency keys.** A POST with an ``Idempotency-Key`` gets the first answer given
  to that key again (a different body with the same key is a 400), as Stripe does; so a
  retry after a lost answer finds the PaymentIntent the first attempt made.
- **Declines on charge.** Stripe's decline test cards (4000 0000 0000 0002 …) decline
  when charged; localstripe declines them only when attached to a Customer.
- **Lists newest first.** Stripe lists PaymentIntents newest first (localstripe in
  creation order; its refunds it already lists newest first), which the reconciliation
  job's "stop at the first older one" relies on.

Its own ``start()`` binds every interface and saves state to /tmp/localstripe.pickle,
which parallel runs on this machine would share: here state lives in this process.
Usage: ``python -m devstack.localstripe_server PORT``. Must not import ``proxy``,
``control_plane`` or ``shared``: it stands in for the outside.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from aiohttp import web
from localstripe import resources, server
from localstripe.errors import UserError

HERE = Path(__file__).parent
JS_PATH = "/js.stripe.com/v3/"
CONFIRM = re.compile(r"^/v1/payment_intents/(pi_\w+)/confirm$")
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def stripe_js() -> bytes:
    own = (Path(server.__file__).parent / "localstripe-v3.js").read_bytes()
    return own + b"\n" + (HERE / "localstripe_confirm.js").read_bytes()


@web.middleware
async def serve_js(request: web.Request, handler: Handler) -> web.StreamResponse:
    if request.path != JS_PATH:
        return await handler(request)
    return web.Response(body=request.app[SCRIPT], content_type="application/javascript")


@web.middleware
async def confirm_with_card(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Stripe.js's confirm: publishable key + client secret + the card's data."""
    found = CONFIRM.match(request.path)
    if request.method != "POST" or found is None or server.get_api_key(request):
        return await handler(request)
    data: Any = await server.get_post_data(request, remove_auth=False) or {}
    key, secret = data.get("key"), data.get("client_secret")
    if not (isinstance(key, str) and key.startswith("pk_")):
        raise UserError(401, "Unauthorized")
    intent = resources.PaymentIntent._api_retrieve(found[1])
    if secret != intent.client_secret:
        raise UserError(401, "Unauthorized")
    method_data = data.get("payment_method_data")
    if not isinstance(method_data, dict) or intent.status not in (
            "requires_payment_method", "requires_confirmation"):
        raise UserError(400, "Bad request")
    method = resources.PaymentMethod(type="card", card=method_data.get("card"),
                                     billing_details=method_data.get("billing_details"))
    intent.payment_method = method.id
    intent._confirm(on_failure_now=intent._report_failure)
    return server.json_response(intent._export())


@web.middleware
async def idempotent(request: web.Request, handler: Handler) -> web.StreamResponse:
    key = request.headers.get("Idempotency-Key")
    if request.method != "POST" or not key:
        return await handler(request)
    scope = (request.headers.get("Authorization", ""), request.path, key)
    body = await request.read()
    seen = request.app[ANSWERS].get(scope)
    if seen is not None:
        if seen[0] != body:
            raise UserError(400, "Keys for idempotent requests can only be used with the "
                                 "same parameters they were first used with.",
                            {"type": "idempotency_error"})
        return web.Response(body=seen[2], status=seen[1], content_type="application/json",
                            headers={"Idempotent-Replayed": "true"})
    response = await handler(request)
    if isinstance(response, web.Response) and response.status < 500 and response.body:
        assert isinstance(response.body, bytes)
        request.app[ANSWERS][scope] = (body, response.status, response.body)
    return response


SCRIPT = web.AppKey("script", bytes)
ANSWERS = web.AppKey("answers", dict[tuple[str, str, str], tuple[bytes, int, bytes]])


def _declined_on_charge() -> None:
    charging = resources.PaymentMethod._charging_is_declined
    resources.PaymentMethod._charging_is_declined = (  # type: ignore[method-assign]
        lambda self: charging(self) or self._attaching_is_declined())


def _newest_first(cls: Any) -> None:
    listed = cls._api_list_all.__func__

    def list_all(klass: Any, url: str, **kwargs: Any) -> Any:
        found = listed(klass, url, **kwargs)
        found._list.sort(key=lambda obj: obj.created, reverse=True)
        return found

    cls._api_list_all = classmethod(list_all)


def main() -> None:
    port = int(sys.argv[1])
    resources.Store.dump_to_disk = lambda self: None  # type: ignore[method-assign]
    _declined_on_charge()
    _newest_first(resources.PaymentIntent)
    app = server.app
    # After localstripe's error middleware (UserError → Stripe's error JSON), before its
    # auth middleware (which accepts only secret keys on /confirm).
    for middleware in (idempotent, confirm_with_card, serve_js):
        app.middlewares.insert(1, middleware)
    app[SCRIPT] = stripe_js()
    app[ANSWERS] = {}
    print(f"localstripe on 127.0.0.1:{port}", flush=True)
    web.run_app(app, host="127.0.0.1", port=port, print=None)


if __name__ == "__main__":
    main()
