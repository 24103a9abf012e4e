"""The one place where the web service turns errors into responses: JSON
``{"error": {"code": <HTTP status>, "message"}}`` (OpenRouter's shape) for the API and
for clients asking for JSON, a page for browsers. Never a traceback; 5xx logged at
error, refusals at debug (sign-in refusals at info, with their reason). A 401 also
clears the session cookie. Never imports ``proxy``."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

import orjson
from aiohttp import web

from control_plane.auth.sessions import COOKIE
from control_plane.errors import ControlPlaneError, SignInRefused, classify
from control_plane.web.pages import PAGES

log = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

_TITLES = {400: "Bad request", 401: "Signed out", 403: "Not allowed", 404: "Not found",
           405: "Not allowed", 408: "Too slow", 409: "Conflict", 413: "Too large",
           503: "Unavailable"}


def wants_json(request: web.Request) -> bool:
    if request.path.startswith("/api/"):
        return True
    accept = request.headers.get("Accept", "")
    return "application/json" in accept and "text/html" not in accept


def json_error(status: int, message: str) -> web.Response:
    return web.Response(body=orjson.dumps({"error": {"code": status, "message": message}}),
                        status=status, content_type="application/json")


def error_response(request: web.Request, exc: BaseException) -> web.Response:
    if isinstance(exc, web.HTTPException):  # routing, body limits
        status, message = exc.status, exc.reason
    else:
        error = classify(exc)
        if error is None:
            log.error("web request failed", exc_info=exc)
            error = ControlPlaneError("internal error")
        elif isinstance(error, SignInRefused):
            log.info("sign-in refused: %s", error.reason)
        elif error.status >= 500:
            log.error("web request failed: %s (%s)", error.message, type(exc).__name__)
        else:
            log.debug("web request refused: %s", error.message)
        status, message = error.status, error.message
    if wants_json(request):
        response = json_error(status, message)
    else:
        title = "Sign-in refused" if isinstance(exc, SignInRefused) else \
            _TITLES.get(status, "Something went wrong")
        response = request.app[PAGES].message(title, message, status, request)
    if status == 401 and COOKIE in request.cookies:
        response.del_cookie(COOKIE, path="/", secure=True, httponly=True, samesite="Lax")
    return response


@web.middleware
async def errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except web.HTTPException as e:
        if e.status < 400:
            raise  # redirects
        return error_response(request, e)
    except Exception as e:  # top of the request: every failure leaves as JSON or a page
        return error_response(request, e)
