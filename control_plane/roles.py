"""The roles a control-plane process can run, each with its own tasks and listener.

- ``web``: the public web service (``control_plane.web``) on QNP_WEB_HOST:QNP_WEB_PORT.
- ``admin``: the private admin API (``admin_api``) on QNP_ADMIN_HOST:QNP_ADMIN_PORT.
- ``ingest``: the ingest consumer and the reconciler. The reconciler lives here because
  it is what keeps Redis filled for the proxy, and every deployment runs ingest
  somewhere (events pile up otherwise); several replicas reconcile harmlessly. With
  SMTP_URL set it also runs the mail sender (``mail.sender``), safe on every replica,
  and with a Stripe key the Stripe reconciliation (``billing.reconcile``), which one
  replica at a time runs.

The maintenance job (stream trim, partitions, retention) is not a role: ``service``
runs it once in every process whatever its roles, as it is safe on every replica.

Every role's ``stop`` returns within the grace it is given, whatever the stores are
doing: what is still running then is cancelled. Never imports ``proxy``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from typing import Any, Protocol

from aiohttp import web

from control_plane import admin_api
from control_plane.billing.balance_tasks import BalanceTasks
from control_plane.billing.reconcile import ReconcileMetrics
from control_plane.billing.reconcile import Reconciler as StripeReconciler
from control_plane.ingest import Consumer
from control_plane.logs import AccessLog
from control_plane.mail.sender import Sender
from control_plane.reconciler import STARTUP, Reconciler
from control_plane.runtime import Stores
from control_plane.tls import listener_context
from control_plane.web.app import make_web_app
from control_plane.web.edge import HEADS, SERVER_LIMITS

log = logging.getLogger(__name__)

WEB, INGEST, ADMIN = "web", "ingest", "admin"
ALL_ROLES = (INGEST, ADMIN, WEB)  # also the start order: Redis is refilled first


class RoleError(ValueError):
    """An unknown role name on the command line."""


def parse_roles(values: list[str] | None) -> tuple[str, ...]:
    """``--role`` values, repeatable and comma-separated, in start order; none = all."""
    named = {part.strip() for v in values or [] for part in v.split(",") if part.strip()}
    unknown = named - set(ALL_ROLES)
    if unknown:
        raise RoleError(f"unknown role {', '.join(sorted(unknown))} "
                        f"(choose from {', '.join(ALL_ROLES)})")
    return tuple(r for r in ALL_ROLES if r in named) if named else ALL_ROLES


class Role(Protocol):
    name: str

    async def start(self) -> None: ...

    async def stop(self, grace_s: float) -> None: ...


class Listener:
    """An aiohttp app on its own host and port."""

    def __init__(self, name: str, app: web.Application, host: str, port: int,
                 grace_s: float, tls: ssl.SSLContext | None = None, **server: Any) -> None:
        self.name, self._host, self._port, self._tls = name, host, port, tls
        self._heads = app.get(HEADS)
        self._server: asyncio.Server | None = None
        # In-flight requests get the grace; idle keep-alive connections are closed.
        self._runner = web.AppRunner(app, handle_signals=False, shutdown_timeout=grace_s,
                                     access_log_class=AccessLog, **server)

    async def start(self) -> None:
        await self._runner.setup()
        if self._heads is None:
            await web.TCPSite(self._runner, self._host, self._port,
                              ssl_context=self._tls).start()
        else:  # the protocol factory wrapped, for the head deadline
            server = self._runner.server
            assert server is not None
            # A TLS handshake gets the head's deadline, not asyncio's 60 s default.
            self._server = await asyncio.get_running_loop().create_server(
                self._heads.factory(server), self._host, self._port, reuse_address=True,
                ssl=self._tls,
                ssl_handshake_timeout=self._heads.timeout if self._tls else None)
        log.info("%s listening host=%s port=%d", self.name, self._host, self._port)

    async def stop(self, grace_s: float) -> None:
        if self._server is not None:
            self._server.close()  # stop accepting; open connections are the runner's
        try:
            await asyncio.wait_for(self._runner.cleanup(), grace_s + 1.0)
        except TimeoutError:
            log.warning("%s did not close in time", self.name)


class Ingest:
    """The ingest consumer and the reconciler, as two tasks; with them the mail sender,
    the balance watch and, with Stripe configured, the auto top-up charger and the
    Stripe reconciliation."""

    name = INGEST

    def __init__(self, stores: Stores) -> None:
        s = stores
        # Auto top-up and the low-balance e-mail (H22): told what each batch debited.
        # It owns the role's Stripe client, which the reconciliation (H21) shares.
        self._balance = BalanceTasks(s)
        self._consumer = Consumer(s.settings, s.pool, s.redis, s.metrics, s.outages,
                                  on_debited=self._balance.watch.note)
        self._reconciler = Reconciler(s.pool, s.redis, s.settings.names, s.metrics,
                                      outages=s.outages,
                                      sweep_interval_s=s.settings.sweep_interval_s,
                                      reservation_max_age_ms=s.settings.sweep_max_age_ms)
        # The mail sender rides along (H12): every deployment runs ingest somewhere.
        self._mail = (Sender(s.pool, s.settings.smtp, s.settings.mail_from)
                      if s.settings.smtp else None)
        billing, gateway = s.settings.billing, self._balance.gateway
        self._stripe_interval_s = billing.reconcile_interval_s
        self._stripe_job = None if gateway is None else StripeReconciler(
            s.pool, s.redis, s.settings.names, gateway,
            ReconcileMetrics(s.metrics.registry), lookback_s=billing.reconcile_lookback_s)
        self._tasks: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        await self._reconciler.refill(STARTUP)
        self._tasks = [asyncio.create_task(self._consumer.run(), name="ingest"),
                       asyncio.create_task(self._reconciler.run(), name="reconciler")]
        if self._mail is not None:
            self._tasks.append(asyncio.create_task(self._mail.run(), name="mail sender"))
        self._tasks += self._balance.start()
        if self._stripe_job is not None:
            job = self._stripe_job.run(self._stripe_interval_s)
            self._tasks.append(asyncio.create_task(job, name="stripe reconciliation"))

    async def stop(self, grace_s: float) -> None:
        self._consumer.stop()
        self._reconciler.stop()
        if self._mail is not None:
            self._mail.stop()
        self._balance.stop()
        if self._stripe_job is not None:
            self._stripe_job.stop()
        try:
            await self._stop_tasks(grace_s)
        finally:
            await self._balance.close()  # the Stripe client, once every task ended

    async def _stop_tasks(self, grace_s: float) -> None:
        if not self._tasks:
            return
        _, late = await asyncio.wait(self._tasks, timeout=grace_s)
        for task in late:
            log.warning("%s did not stop in time; cancelled (entries stay pending)",
                        task.get_name())
            task.cancel()
        for task in late:
            with contextlib.suppress(asyncio.CancelledError):
                await task


def build(names: tuple[str, ...], stores: Stores) -> list[Role]:
    settings = stores.settings
    grace = settings.shutdown_grace_s
    roles: list[Role] = []
    for name in names:
        if name == INGEST:
            roles.append(Ingest(stores))
        elif name == ADMIN:
            roles.append(Listener("admin API", admin_api.make_app(settings, stores),
                                  settings.admin_host, settings.admin_port, grace,
                                  listener_context(settings.tls.admin)))
        elif name == WEB:
            roles.append(Listener("web", make_web_app(settings, stores),
                                  settings.web_host, settings.web_port, grace,
                                  listener_context(settings.tls.web), **SERVER_LIMITS))
    return roles
