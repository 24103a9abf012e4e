"""The fallback limiter a proxy process uses while Redis is unreachable.

Each process holds its share (``1 / fleet processes``) of every request, token and
concurrency limit, in sliding logs kept in memory, so the fleet as a whole stays near
the configured limits without any coordination. Credit is not checked here: spend while
degraded is charged to the live balance when Redis returns (see ``admission.py``).

Pure in-memory code; must not import the handlers or Redis.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field


@dataclass(slots=True)
class _Log:
    times: deque[tuple[float, int]] = field(default_factory=deque)  # (admitted at, tokens)
    tokens: int = 0
    in_flight: int = 0

    def expire(self, cutoff: float) -> None:
        while self.times and self.times[0][0] <= cutoff:
            self.tokens -= self.times.popleft()[1]


@dataclass(frozen=True, slots=True)
class LocalRefusal:
    which: str
    retry_after_ms: int


class LocalLimiter:
    def __init__(self, *, window_s: float, share: float, max_scopes: int = 100_000) -> None:
        self._window = window_s
        self._share = share
        self._max = max_scopes
        self._logs: dict[str, _Log] = {}

    def _scaled(self, limit: int) -> int | None:
        return max(1, math.floor(limit * self._share)) if limit > 0 else None

    def _log(self, scope: str) -> _Log:
        log = self._logs.get(scope)
        if log is None:
            if len(self._logs) >= self._max:
                self._logs.clear()  # bounded memory beats perfect memory while degraded
            log = self._logs[scope] = _Log()
        return log

    def admit(
        self, now: float, scopes: list[tuple[str, int, int, int]], tokens: int
    ) -> LocalRefusal | None:
        """Admit against each (scope, rpm, tpm, conc); None if admitted (and recorded)."""
        logs = []
        for scope, rpm, tpm, conc in scopes:
            log = self._log(scope)
            log.expire(now - self._window)
            logs.append(log)
            c, r, t = self._scaled(conc), self._scaled(rpm), self._scaled(tpm)
            if c is not None and log.in_flight >= c:
                return LocalRefusal("concurrency", 1000)
            wait_ms = int((log.times[0][0] + self._window - now) * 1000) if log.times else 0
            if r is not None and len(log.times) >= r:
                return LocalRefusal("requests", max(wait_ms, 1))
            if t is not None and log.tokens + tokens > t:
                return LocalRefusal("tokens", max(wait_ms, 1))
        for log in logs:
            log.times.append((now, tokens))
            log.tokens += tokens
            log.in_flight += 1
        return None

    def release(self, scopes: list[str]) -> None:
        for scope in scopes:
            log = self._logs.get(scope)
            if log is not None and log.in_flight > 0:
                log.in_flight -= 1
