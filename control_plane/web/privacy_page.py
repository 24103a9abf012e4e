"""Settings > Privacy (issue 14): each privacy right as a dashboard form (plain HTML,
no script needed, the session's CSRF token in every form) and as an account API call
under ``/api/v1/account/privacy`` (JSON, the account API's ``{"data": ...}`` and error
shape). The logic is ``privacy.rights``, ``privacy.email_change``; this module only
parses, calls and answers.

``/suspended`` is where a suspended account's pages lead (``guard``): the suspension,
its reason (``privacy.suspension``) and the human-review button.

Callers: a session or a management key for the account's own choices (jurisdiction,
restriction, objection, requests to staff); a session only for what is about the
person (name, e-mail), which a key does not have. Nothing here takes another account's
id: an e-mail link of another user is "not found". Never imports ``proxy``.
"""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

from aiohttp import web

from control_plane import users
from control_plane.auth.sessions import Session
from control_plane.errors import Conflict, Forbidden, InvalidInput
from control_plane.privacy import deadlines, email_change, requests, rights, suspension
from control_plane.web.account_api import data_response, json_body, manager
from control_plane.web.dashboard import render, session_of
from control_plane.web.guard import SUSPENDED_PAGE, caller
from control_plane.web.state import SESSIONS, SETTINGS, STORES

JURISDICTION_LABELS = (
    ("default", "Elsewhere (QNP's 30 days)"),
    ("gdpr", "European Union, EEA, UK (GDPR)"),
    ("ccpa", "California (CCPA/CPRA)"),
    ("lgpd", "Brazil (LGPD)"),
    ("kvkk", "Türkiye (KVKK)"),
    ("pipa", "South Korea (PIPA)"),
)
# ?done= codes after a form, and what they tell the person.
DONE = {
    "jurisdiction": "Saved: your requests are answered within your law's deadline.",
    "name": "Your name is corrected.",
    "email": "We sent a confirmation link to the new address. Open it while signed in.",
    "email-confirmed": "Your e-mail address is changed.",
    "correction": "Your correction request is with our privacy team; we e-mailed its reference.",
    "restricted": "Processing of your data is restricted.",
    "lifted": "The restriction is lifted.",
    "objection": "Your objection is recorded.",
    "objection-staff": "Your objection is with our privacy team; they will answer with reasons.",
    "withdrawn": "Your objection is withdrawn.",
    "review": "A person will review the decision; we e-mailed you the request's reference.",
}
# A suspension recorded without a reason: said plainly.
NO_REASON = "not recorded; ask for a human review and a person will tell you"


def _rule_text(jurisdiction: str) -> str:
    rule = deadlines.rule(jurisdiction)
    period = f"{rule.months} month(s)" if rule.months else f"{rule.days} days"
    extra = rule.extension_months and f"{rule.extension_months} more month(s)" \
        or rule.extension_days and f"{rule.extension_days} more days"
    return f"{period}, extendable by {extra} with notice" if extra else period


def _request_json(r: requests.PrivacyRequest) -> dict[str, Any]:
    return {"id": r.id, "type": r.type, "jurisdiction": r.jurisdiction,
            "received_at": r.received_at.isoformat(), "due_at": r.due_at.isoformat(),
            "extended_until": r.extended_until and r.extended_until.isoformat(),
            "completed_at": r.completed_at and r.completed_at.isoformat(),
            "outcome": r.outcome, "handled_by": r.handled_by}


def _bool(value: object) -> object:
    """A form's "true"/"false" as a bool; anything else is left for the check."""
    return {"true": True, "false": False}.get(value, value) if isinstance(value, str) \
        else value


async def _page(request: web.Request, session: Session, status: int = 200,
                done: str | None = None, error: str | None = None) -> web.Response:
    pool = request.app[STORES].pool
    state = await rights.state(pool, session.account_id)
    return render(request, "privacy_settings.html", session, status, state=state,
                  profile=await users.profile(pool, session.user_id), done=done,
                  error=error, jurisdictions=JURISDICTION_LABELS,
                  rule_text=_rule_text(state.jurisdiction), at_once=rights.AT_ONCE,
                  grounds=rights.COMPELLING_GROUNDS, labels=rights.PURPOSE_LABELS,
                  type_labels=rights.TYPE_LABELS, no_reason=NO_REASON,
                  suspension=await suspension.of_account(pool, session.account_id))


async def suspended_page(request: web.Request) -> web.StreamResponse:
    """Where a suspended account's dashboard sends it (``guard``): the suspension, its
    reason if one was recorded, the human-review button and what is still available."""
    session = session_of(request)
    pool = request.app[STORES].pool
    found = await suspension.of_account(pool, session.account_id)
    if found is None:
        raise web.HTTPSeeOther("/")  # not (or no longer) suspended
    return render(request, "suspended.html", session, suspension=found, no_reason=NO_REASON,
                  pending=await suspension.open_reviews(pool, session.account_id))


async def privacy_settings(request: web.Request) -> web.Response:
    session = session_of(request)
    return await _page(request, session, done=DONE.get(request.query.get("done", "")))


Action = Callable[[web.Request, Session, dict[str, str]], Awaitable[str]]


def _form_action(action: Action) -> Callable[[web.Request], Awaitable[web.Response]]:
    async def handler(request: web.Request) -> web.Response:
        session = session_of(request)
        form = {k: v for k, v in (await request.post()).items() if isinstance(v, str)}
        try:
            done = await action(request, session, form)
        except (InvalidInput, Conflict) as e:
            return await _page(request, session, e.status, error=e.message)
        raise web.HTTPSeeOther(f"/settings/privacy?done={done}")
    return handler


# -- the rights, each once for both the form and the API ------------------------------

async def _jurisdiction(request: web.Request, account_id: uuid.UUID, value: object) -> str:
    return await rights.set_jurisdiction(request.app[STORES].pool, account_id, value)


async def _restriction(request: web.Request, account_id: uuid.UUID, value: object,
                       actor: str) -> requests.PrivacyRequest | None:
    done = await rights.set_restriction(request.app[STORES].pool, account_id, value,
                                        datetime.now(UTC), actor)
    # Every replica re-reads the account's sessions: the dashboard's notice follows.
    await request.app[SESSIONS].reread(account_id)
    return done


def _links(request: web.Request) -> email_change.Links:
    return email_change.Links(request.app[SETTINGS].require_session_secret())


async def _start_email(request: web.Request, session: Session, value: object) -> uuid.UUID:
    return await email_change.start(
        request.app[STORES].pool, _links(request), request.app[SETTINGS].public_url,
        session.account_id, session.user_id, value, datetime.now(UTC))


async def _confirm_email(request: web.Request, session: Session, token: object
                         ) -> requests.PrivacyRequest:
    now = datetime.now(UTC)
    change = _links(request).read(token, now)
    return await email_change.confirm(request.app[STORES].pool, session.account_id,
                                      session.user_id, change, now)


def _actor(session: Session | None) -> str:
    return f"user:{session.user_id}" if session is not None else "management-key"


# -- the forms ---------------------------------------------------------------------

async def _form_jurisdiction(request: web.Request, session: Session,
                             form: dict[str, str]) -> str:
    await _jurisdiction(request, session.account_id, form.get("jurisdiction"))
    return "jurisdiction"


async def _form_name(request: web.Request, session: Session, form: dict[str, str]) -> str:
    await rights.correct_name(request.app[STORES].pool, session.account_id,
                              session.user_id, form.get("name"), datetime.now(UTC))
    return "name"


async def _form_email(request: web.Request, session: Session, form: dict[str, str]) -> str:
    await _start_email(request, session, form.get("email"))
    return "email"


async def _form_confirm(request: web.Request, session: Session,
                        form: dict[str, str]) -> str:
    await _confirm_email(request, session, form.get("token"))
    return "email-confirmed"


async def _form_correction(request: web.Request, session: Session,
                           form: dict[str, str]) -> str:
    await rights.request_correction(request.app[STORES].pool, session.account_id,
                                    form.get("text"), datetime.now(UTC))
    return "correction"


async def _form_restriction(request: web.Request, session: Session,
                            form: dict[str, str]) -> str:
    wanted = _bool(form.get("restricted"))
    await _restriction(request, session.account_id, wanted, _actor(session))
    return "restricted" if wanted is True else "lifted"


async def _form_objection(request: web.Request, session: Session,
                          form: dict[str, str]) -> str:
    wanted, purpose = _bool(form.get("objected")), form.get("purpose")
    await rights.object_to(request.app[STORES].pool, session.account_id, purpose, wanted,
                           datetime.now(UTC), form.get("text"), _actor(session))
    if wanted is not True:
        return "withdrawn"
    return "objection" if purpose in rights.AT_ONCE else "objection-staff"


async def _form_review(request: web.Request, session: Session, form: dict[str, str]) -> str:
    await rights.request_review(request.app[STORES].pool, session.account_id,
                                form.get("about"), datetime.now(UTC), form.get("text"))
    return "review"


async def email_confirm_page(request: web.Request) -> web.Response:
    """The link's landing page: it shows the address and asks for a click, so a mail
    scanner fetching the link changes nothing."""
    session = session_of(request)
    now, token = datetime.now(UTC), request.query.get("token", "")
    change = _links(request).read(token, now)
    new_email = await email_change.pending(request.app[STORES].pool, session.user_id,
                                           change, now)
    return render(request, "email_confirm.html", session, new_email=new_email, token=token)


# -- the account API ---------------------------------------------------------------

def _session_only(request: web.Request) -> Session:
    who = caller(request)
    if who.session is None:
        raise Forbidden("this is about a person: call it from a signed-in session")
    return who.session


async def api_state(request: web.Request) -> web.Response:
    who = manager(request)
    state = await rights.state(request.app[STORES].pool, who.account_id)
    return data_response({
        "jurisdiction": state.jurisdiction,
        "deadline": _rule_text(state.jurisdiction),
        "restricted_at": state.restricted_at and state.restricted_at.isoformat(),
        "objections": {p: at.isoformat() for p, at in state.objections.items()},
        "compelling_grounds": rights.COMPELLING_GROUNDS,
        "requests": [_request_json(r) for r in state.requests]})


async def api_jurisdiction(request: web.Request) -> web.Response:
    who = manager(request)
    body = await json_body(request)
    return data_response({"jurisdiction": await _jurisdiction(request, who.account_id,
                                                      body.get("jurisdiction"))})


async def api_name(request: web.Request) -> web.Response:
    session = _session_only(request)
    body = await json_body(request)
    done = await rights.correct_name(request.app[STORES].pool, session.account_id,
                                     session.user_id, body.get("name"), datetime.now(UTC))
    return data_response({"request": _request_json(done)})


async def api_email(request: web.Request) -> web.Response:
    session = _session_only(request)
    await _start_email(request, session, (await json_body(request)).get("email"))
    return data_response({"confirmation_sent": True}, 202)


async def api_email_confirm(request: web.Request) -> web.Response:
    session = _session_only(request)
    done = await _confirm_email(request, session, (await json_body(request)).get("token"))
    return data_response({"request": _request_json(done)})


async def api_correction(request: web.Request) -> web.Response:
    who = manager(request)
    done = await rights.request_correction(request.app[STORES].pool, who.account_id,
                                           (await json_body(request)).get("text"),
                                           datetime.now(UTC))
    return data_response({"request": _request_json(done)}, 201)


async def api_restriction(request: web.Request) -> web.Response:
    who = manager(request)
    body = await json_body(request)
    done = await _restriction(request, who.account_id, body.get("restricted"),
                              _actor(who.session))
    state = await rights.state(request.app[STORES].pool, who.account_id)
    return data_response({"restricted_at": state.restricted_at and state.restricted_at.isoformat(),
                  "request": done and _request_json(done)})


async def api_objection(request: web.Request) -> web.Response:
    who = manager(request)
    body = await json_body(request)
    done = await rights.object_to(request.app[STORES].pool, who.account_id,
                                  body.get("purpose"), body.get("objected"),
                                  datetime.now(UTC), body.get("text"), _actor(who.session))
    state = await rights.state(request.app[STORES].pool, who.account_id)
    return data_response({"objections": {p: at.isoformat() for p, at in state.objections.items()},
                  "request": done and _request_json(done)},
                 201 if done is not None and done.completed_at is None else 200)


async def api_review(request: web.Request) -> web.Response:
    who = manager(request)
    body = await json_body(request)
    done = await rights.request_review(request.app[STORES].pool, who.account_id,
                                       body.get("about"), datetime.now(UTC),
                                       body.get("text"))
    return data_response({"request": _request_json(done)}, 201)


def add_routes(app: web.Application) -> None:
    r = app.router
    r.add_get("/settings/privacy", privacy_settings)
    r.add_get(SUSPENDED_PAGE, suspended_page)
    r.add_post("/settings/privacy/jurisdiction", _form_action(_form_jurisdiction))
    r.add_post("/settings/privacy/name", _form_action(_form_name))
    r.add_post("/settings/privacy/email", _form_action(_form_email))
    r.add_get("/settings/privacy/email/confirm", email_confirm_page)
    r.add_post("/settings/privacy/email/confirm", _form_action(_form_confirm))
    r.add_post("/settings/privacy/correction", _form_action(_form_correction))
    r.add_post("/settings/privacy/restriction", _form_action(_form_restriction))
    r.add_post("/settings/privacy/objection", _form_action(_form_objection))
    # h21's dispute pause posts here (field ``about``): keep the path and the field.
    r.add_post("/settings/privacy/human-review", _form_action(_form_review))
    base = "/api/v1/account/privacy"
    r.add_get(base, api_state)
    r.add_put(f"{base}/jurisdiction", api_jurisdiction)
    r.add_post(f"{base}/name", api_name)
    r.add_post(f"{base}/email", api_email)
    r.add_post(f"{base}/email/confirm", api_email_confirm)
    r.add_post(f"{base}/correction", api_correction)
    r.add_put(f"{base}/restriction", api_restriction)
    r.add_post(f"{base}/objection", api_objection)
    r.add_post(f"{base}/human-review", api_review)
