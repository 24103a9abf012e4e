"""Process-wide logging set-up: one line per record, ``key=value`` style.

Log lines carry ids, counts and reasons; never event content, key secrets or hashes.
Never imports ``proxy``.
"""

from __future__ import annotations

import logging
import sys

from aiohttp import web
from aiohttp.abc import AbstractAccessLogger

FORMAT = "%(asctime)s level=%(levelname)s logger=%(name)s %(message)s"


# Libraries that log what must not be logged, kept at WARNING whatever QNP_LOG_LEVEL
# says: the stripe SDK logs request parameters and response bodies at INFO and DEBUG
# (PaymentIntent client secrets, metadata).
QUIET_LOGGERS = ("stripe",)


def configure(level: int) -> None:
    logging.basicConfig(level=level, format=FORMAT, stream=sys.stderr, force=True)
    quiet_libraries()


def quiet_libraries() -> None:
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)


class AccessLog(AbstractAccessLogger):
    """One line per request: method, path, status, time. Never the query string (sign-in
    callbacks carry the authorization code and state there, an unsubscribe or
    confirmation link its token), the client's address, its user agent or any header:
    the privacy policy keeps IPs to the usage records, and logs to what operators need."""

    def log(self, request: web.BaseRequest, response: web.StreamResponse,
            time: float) -> None:
        self.logger.info("http method=%s path=%s status=%d ms=%.1f", request.method,
                         request.path, response.status, time * 1000)
