"""The ingest role's part of auto top-up and the low-balance e-mail: the balance watch
(told by the consumer what each batch debited) and, when Stripe is configured, the
charger and the Stripe client it uses, started and stopped together. Must not import
``control_plane.web`` or ``proxy``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from control_plane.billing import auto_topup, low_balance
from control_plane.billing.balance_watch import AUTO_TOPUP, LOW_BALANCE, Action, BalanceWatch
from control_plane.billing.gateway import StripeGateway
from control_plane.runtime import Stores

log = logging.getLogger(__name__)


class BalanceTasks:
    def __init__(self, stores: Stores) -> None:
        s = stores.settings
        self.gateway = StripeGateway(s.billing) if s.billing.stripe_secret_key else None
        actions: dict[str, Action] = {LOW_BALANCE: low_balance.action(s.public_url)}
        self.charger: auto_topup.Charger | None = None
        if self.gateway is not None:
            actions[AUTO_TOPUP] = auto_topup.action(s.billing)
            self.charger = auto_topup.Charger(stores.pool, stores.redis, s.names,
                                              self.gateway, s.public_url,
                                              tick_s=s.balance_sweep_s)
        self.watch = BalanceWatch(stores.pool, stores.redis, s.names, actions,
                                  sweep_s=s.balance_sweep_s,
                                  on_fired=self.charger.wake if self.charger else None)
        self._tasks: list[asyncio.Task[None]] = []

    def start(self) -> list[asyncio.Task[None]]:
        self._tasks = [asyncio.create_task(self.watch.run(), name="balance watch")]
        if self.charger is not None:
            self._tasks.append(asyncio.create_task(self.charger.run(),
                                                   name="auto top-up charger"))
        return self._tasks

    def stop(self) -> None:
        self.watch.stop()
        if self.charger is not None:
            self.charger.stop()

    async def close(self) -> None:
        """After the tasks ended: the Stripe client (shared with the role's other Stripe
        users, the reconciliation among them)."""
        if self.gateway is not None:
            with contextlib.suppress(Exception):
                await self.gateway.close()
