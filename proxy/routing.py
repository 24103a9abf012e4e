"""Routing: which deployment serves an attempt, which deployments are ejected, and
whether one more retry fits in the budget.

- ``Router.plan(models)`` orders the live deployments of each model (primary, then the
  request's fallbacks) by weighted random choice without replacement.
- A deployment with ``eject_after`` consecutive failures is ejected for
  ``base_ejection × 2^(times ejected before)``, capped at ``max_ejection``; never more
  than half of one model's deployments are out at once. A success resets its history.
- The retry budget is Envoy's: retries in flight may not exceed ``retry_budget`` of the
  requests in flight, with a floor of ``min_retry_concurrency``.

State is per process and in memory; the clock and the random source are injectable so
tests need no sleeps. Must not import the handlers or the upstream client.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

from proxy.catalog import Deployment, Model


@dataclass(frozen=True, slots=True)
class RoutingPolicy:
    eject_after: int = 3
    base_ejection: float = 5.0
    max_ejection: float = 300.0
    retry_budget: float = 0.2
    min_retry_concurrency: int = 3


@dataclass(slots=True)
class _Health:
    failures: int = 0  # consecutive
    times_ejected: int = 0
    ejected_until: float = 0.0


class Router:
    def __init__(
        self,
        policy: RoutingPolicy,
        *,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
    ) -> None:
        self._policy = policy
        self._clock = clock
        self._rng = rng or random.Random()  # noqa: S311 - load spreading, not secrecy
        self._health: dict[str, _Health] = {}
        self.live_requests = 0
        self.live_retries = 0

    # --- plans ---------------------------------------------------------------------

    def plan(self, models: Sequence[Model]) -> list[tuple[Model, Deployment]]:
        """Every attempt this request may make, in order (before the retry budget)."""
        now = self._clock()
        attempts: list[tuple[Model, Deployment]] = []
        for model in models:
            live = [d for d in model.deployments if not self._ejected(d, now)]
            attempts.extend((model, d) for d in self._shuffle(live))
        return attempts

    def _shuffle(self, deployments: list[Deployment]) -> list[Deployment]:
        if len(deployments) < 2:  # the common case: nothing to draw
            return deployments
        order: list[Deployment] = []
        pool = list(deployments)
        while pool:
            pick = self._rng.choices(range(len(pool)), weights=[d.weight for d in pool])[0]
            order.append(pool.pop(pick))
        return order

    def _ejected(self, deployment: Deployment, now: float) -> bool:
        health = self._health.get(deployment.key)
        return health is not None and health.ejected_until > now

    def ejected(self, deployment: Deployment) -> bool:
        return self._ejected(deployment, self._clock())

    # --- outcomes ------------------------------------------------------------------

    def succeeded(self, deployment: Deployment) -> None:
        health = self._health.get(deployment.key)
        if health is not None:
            health.failures = 0
            health.times_ejected = 0

    def failed(self, model: Model, deployment: Deployment) -> None:
        health = self._health.setdefault(deployment.key, _Health())
        health.failures += 1
        if health.failures < self._policy.eject_after:
            return
        now = self._clock()
        if health.ejected_until > now:
            return
        out = sum(self._ejected(d, now) for d in model.deployments)
        if out + 1 > len(model.deployments) // 2:
            return  # keep at least half of the model's deployments in rotation
        interval = min(self._policy.max_ejection,
                       self._policy.base_ejection * 2 ** health.times_ejected)
        health.ejected_until = now + interval
        health.times_ejected += 1
        health.failures = 0

    # --- the retry budget ----------------------------------------------------------

    @contextmanager
    def request(self) -> Iterator[None]:
        """Counts a request as live for the retry budget while the block runs."""
        self.live_requests += 1
        try:
            yield
        finally:
            self.live_requests -= 1

    def try_retry(self) -> bool:
        """Take a retry slot if the budget allows; give it back with ``retry_done``."""
        allowed = max(self._policy.min_retry_concurrency,
                      int(self._policy.retry_budget * self.live_requests))
        if self.live_retries >= allowed:
            return False
        self.live_retries += 1
        return True

    def retry_done(self) -> None:
        self.live_retries -= 1
