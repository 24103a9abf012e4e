"""The control plane's error hierarchy.

Every failure a caller can act on is one of these; ``admin_api.error_response`` and the
CLI turn them into HTTP responses and exit messages. Messages are safe to show: they
never carry a key secret, a hash or event content. Imports nothing from the project.
"""

from __future__ import annotations

import asyncpg
from redis.exceptions import RedisError


class ControlPlaneError(Exception):
    """Base class; ``status`` and ``type`` say how the admin API reports it."""

    status = 500
    type = "internal_error"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidInput(ControlPlaneError):
    status = 400
    type = "invalid_request"


class Unauthorized(ControlPlaneError):
    status = 401
    type = "unauthorized"


class Forbidden(ControlPlaneError):
    status = 403
    type = "forbidden"


class SignInRefused(ControlPlaneError):
    """A sign-in that must not go through (bad state, token, nonce...); nothing is
    created. The message is shown to the person; the reason is logged at INFO."""

    status = 400
    type = "signin_refused"

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


class NotFound(ControlPlaneError):
    status = 404
    type = "not_found"


class Conflict(ControlPlaneError):
    status = 409
    type = "conflict"


class Unavailable(ControlPlaneError):
    """Postgres or Redis could not be reached; the caller may retry."""

    status = 503
    type = "unavailable"


def classify(exc: BaseException) -> ControlPlaneError | None:
    """The control-plane error an exception stands for, or None for a bug.

    Store outages become ``Unavailable`` here, in one place, rather than at every call.
    """
    if isinstance(exc, ControlPlaneError):
        return exc
    if isinstance(exc, RedisError):
        return Unavailable("Redis is unavailable; try again")
    # redis-py wraps its socket errors, so a bare OSError here comes from asyncpg.
    if isinstance(
        exc,
        OSError | TimeoutError | asyncpg.PostgresConnectionError
        | asyncpg.CannotConnectNowError | asyncpg.InterfaceError,
    ):
        return Unavailable("Postgres is unavailable; try again")
    return None
