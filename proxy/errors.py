"""The proxy's error hierarchy and the one place that turns an error into a response.

Every refusal the proxy makes is a ``ProxyError`` subclass carrying its HTTP status,
OpenAI error ``type`` and ``code``, the event outcome it records, and a fixed message.
Messages never echo request content or upstream error bodies. Bodies for errors whose
message never varies are encoded once, at import.
"""

from __future__ import annotations

import orjson

from proxy.http_server import Reply

JSON = "application/json"


class ProxyError(Exception):
    status = 500
    type = "server_error"
    code: str | None = None
    outcome = "upstream_error"
    message = "Internal error."

    def __init__(self, message: str | None = None, *, param: str | None = None) -> None:
        super().__init__(message or self.message)
        if message is not None:
            self.message = message
        self.param = param
        self.headers: dict[str, str] = {}  # extra response headers (Retry-After, limits)

    def body(self) -> bytes:
        return orjson.dumps(
            {
                "error": {
                    "message": self.message,
                    "type": self.type,
                    "param": self.param,
                    "code": self.code,
                }
            }
        )


class BadRequest(ProxyError):
    status = 400
    type = "invalid_request_error"
    outcome = "bad_request"


class InvalidJSON(BadRequest):
    code = "invalid_json"
    message = "We could not parse the JSON body of your request."


class BodyTooLarge(ProxyError):
    status = 413
    type = "invalid_request_error"
    code = "request_too_large"
    outcome = "bad_request"
    message = "The request body is larger than this gateway accepts."


class Unauthorized(ProxyError):
    status = 401
    type = "invalid_request_error"
    code = "invalid_api_key"
    outcome = "unauthorized"
    message = "Missing or invalid API key. Pass it as 'Authorization: Bearer qnp_...'."


class KeyRevoked(Unauthorized):
    message = "This API key has been revoked."


class KeyDisabled(Unauthorized):
    code = "key_disabled"
    message = "This API key is disabled; enable it again in the dashboard or the API."


class KeyExpired(Unauthorized):
    code = "key_expired"
    message = "This API key has expired; create a new key or extend its expiry."


class ModelNotFound(ProxyError):
    status = 404
    type = "invalid_request_error"
    code = "model_not_found"
    outcome = "not_found"

    def __init__(self, model: str) -> None:
        # Model names are short identifiers, not content; cap the echo all the same.
        super().__init__(f"The model '{model[:100]}' does not exist.", param="model")


class UpstreamUnavailable(ProxyError):
    status = 502
    type = "upstream_error"
    code = "upstream_unavailable"
    outcome = "upstream_error"
    message = "The upstream provider could not be reached."


class UpstreamFailed(ProxyError):
    status = 502
    type = "upstream_error"
    code = "upstream_error"
    outcome = "upstream_error"
    message = "The upstream provider returned an error."


class UpstreamTimeout(ProxyError):
    status = 504
    type = "upstream_error"
    code = "upstream_timeout"
    outcome = "timeout"
    message = "The upstream provider did not respond in time."


class AuthUnavailable(ProxyError):
    status = 503
    type = "server_error"
    code = "auth_unavailable"
    outcome = "unauthorized"
    message = "The gateway cannot verify API keys right now; retry shortly."


class Internal(ProxyError):
    status = 500
    type = "server_error"
    code = "internal_error"
    outcome = "upstream_error"
    message = "The gateway failed to handle this request; it has been logged."


class MethodNotAllowed(ProxyError):
    status = 405
    type = "invalid_request_error"
    code = "method_not_allowed"
    outcome = "bad_request"
    message = "This endpoint does not accept that HTTP method."


class RouteNotFound(ProxyError):
    status = 404
    type = "invalid_request_error"
    code = "unknown_url"
    outcome = "not_found"
    message = "Unknown request URL."


class AccountSuspended(ProxyError):
    status = 403
    type = "permission_error"
    code = "account_suspended"
    outcome = "unauthorized"
    message = "This account is suspended; contact support."


class AdmissionUnavailable(ProxyError):
    status = 503
    type = "server_error"
    code = "admission_unavailable"
    outcome = "rate_limited"
    message = "The gateway cannot check limits right now; retry shortly."


class RateLimited(ProxyError):
    status = 429
    type = "rate_limit_error"
    code = "rate_limit_exceeded"
    outcome = "rate_limited"

    def __init__(self, which: str, retry_after_ms: int, headers: dict[str, str]) -> None:
        seconds = max(1, -(-retry_after_ms // 1000))
        super().__init__(f"Rate limit reached for {which}; retry after {seconds}s.")
        self.headers = {**headers, "Retry-After": str(seconds)}


class InsufficientCredit(ProxyError):
    status = 402
    type = "insufficient_quota"
    code = "insufficient_credit"
    outcome = "insufficient_credit"
    message = (
        "Your credit balance does not cover this request's maximum cost. Add credit, "
        "or lower max_tokens."
    )


class KeyLimitExceeded(ProxyError):
    """The key's own credit limit (OpenRouter's per-key ``limit``) is spent for its
    period; 402, as OpenRouter answers a key over its limit."""

    status = 402
    type = "insufficient_quota"
    code = "key_limit_exceeded"
    outcome = "insufficient_credit"
    message = (
        "This API key's credit limit does not cover this request's maximum cost in the "
        "current period. Raise the key's limit, wait for it to reset, or lower max_tokens."
    )


class UpstreamRefused(ProxyError):
    """The upstream refused the request for the client's own reasons (4xx, 429).

    Its status and body are passed to the client, whose request it concerns; the body
    is never logged or recorded.
    """

    outcome = "upstream_error"
    type = "upstream_error"

    def __init__(self, status: int, body: bytes, retry_after: str | None) -> None:
        super().__init__("The upstream provider refused the request.")
        self.status = status
        self.code = f"upstream_{status}"
        self.upstream_body = body
        self.retry_after = retry_after


_STATIC: dict[type[ProxyError], bytes] = {
    cls: cls().body()
    for cls in (InvalidJSON, BodyTooLarge, Unauthorized, KeyRevoked, KeyDisabled, KeyExpired,
                UpstreamUnavailable, UpstreamFailed, UpstreamTimeout, AuthUnavailable,
                Internal, MethodNotAllowed, RouteNotFound, AccountSuspended,
                InsufficientCredit, KeyLimitExceeded)
}


def error_response(err: ProxyError, headers: dict[str, str]) -> Reply:
    """The OpenAI-style error JSON for ``err``, with ``headers`` (request id and the like)."""
    if err.headers:
        headers.update(err.headers)
    if isinstance(err, UpstreamRefused):
        if err.retry_after is not None:
            headers["Retry-After"] = err.retry_after
        return Reply(err.status, err.upstream_body, headers, JSON)
    body = _STATIC.get(type(err)) if err.param is None and err.message == type(err).message \
        else None
    return Reply(err.status, body if body is not None else err.body(), headers, JSON)
