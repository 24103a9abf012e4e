"""``python -m control_plane <command>``: migrate, serve, and account/key/credit chores.

Calls the same functions as the admin API. With ``--json`` a command prints exactly one
JSON document on stdout (errors go to stderr), for scripts such as ``make run``.
Never imports ``proxy``.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import asynccontextmanager
from typing import Any

import asyncpg
import orjson
import redis.asyncio as aioredis

from control_plane import accounts, audit, keys, ledger, limits, logs, service, staff, usage
from control_plane.connections import open_pool, open_redis
from control_plane.errors import InvalidInput, classify
from control_plane.migrate import migrate
from control_plane.policy import notices
from control_plane.roles import ADMIN, WEB, RoleError, parse_roles
from control_plane.settings import Settings, SettingsError
from shared import monitoring
from shared.pricing import MICROS_PER_DOLLAR, PriceError, dollars_to_micros

Output = tuple[Any, str]  # (JSON document, human text)
Command = Callable[[Settings, argparse.Namespace], Coroutine[Any, Any, Output]]


@asynccontextmanager
async def _pool(settings: Settings) -> AsyncIterator[asyncpg.Pool]:
    pool = await open_pool(settings, min_size=1, max_size=2)
    try:
        yield pool
    finally:
        await pool.close()


@asynccontextmanager
async def _redis(settings: Settings) -> AsyncIterator[aioredis.Redis]:
    client = open_redis(settings)
    try:
        yield client
    finally:
        await client.aclose()


async def _migrate(settings: Settings, args: argparse.Namespace) -> Output:
    result = await migrate(settings.database_url)
    lines = [f"applied {v}" for v in result.applied] or ["schema up to date"]
    lines += [f"created partition {p}" for p in result.partitions_created]
    doc = {"applied": result.applied, "partitions_created": result.partitions_created}
    return doc, "\n".join(lines)


async def _create_account(settings: Settings, args: argparse.Namespace) -> Output:
    async with _pool(settings) as pool, _redis(settings) as redis:
        account = await accounts.create_account(pool, redis, settings.names, args.name)
    return account.to_json(), f"account {account.id} created ({account.name})"


def _usd(micros: int | None) -> str:
    if micros is None:
        return "unknown"
    sign = "-" if micros < 0 else ""
    whole, frac = divmod(abs(micros), MICROS_PER_DOLLAR)
    return f"{sign}${whole}.{frac:06d}"


def _parse_usd(raw: str) -> int:
    """Dollars to micro-dollars exactly; a leading minus for negative adjustments."""
    negative = raw.startswith("-")
    try:
        micros = dollars_to_micros(raw[1:] if negative else raw)
    except PriceError:
        raise InvalidInput(f"amount {raw!r} is not a dollar amount with at most "
                           "6 decimal places") from None
    return -micros if negative else micros


def _balance_text(b: ledger.Balance) -> str:
    return (f"ledger {_usd(b.ledger_micros)}  live {_usd(b.live_micros)}  "
            f"reserved {_usd(b.reserved_micros)}")


async def _credit(settings: Settings, args: argparse.Namespace) -> Output:
    amount = _parse_usd(args.amount_usd)
    async with _pool(settings) as pool, _redis(settings) as redis:
        done = await ledger.credit(pool, redis, settings.names, args.account_id,
                                   args.kind, amount, args.reference)
    verb = "credited" if done.created else "already credited (same reference)"
    text = (f"{done.entry.kind} of {_usd(done.entry.amount_micros)} {verb}: "
            f"ledger entry {done.entry.id}\n{_balance_text(done.balance)}")
    return done.to_json(), text


async def _balance(settings: Settings, args: argparse.Namespace) -> Output:
    async with _pool(settings) as pool, _redis(settings) as redis:
        found = await ledger.get_balance(pool, redis, settings.names, args.account_id)
    return found.to_json(), _balance_text(found)


async def _set_limits(settings: Settings, args: argparse.Namespace) -> Output:
    body = {n: getattr(args, n) for n in ("rpm", "tpm", "conc") if getattr(args, n) is not None}
    async with _pool(settings) as pool, _redis(settings) as redis:
        if args.account is not None:
            account = await limits.set_account_limits(pool, redis, settings.names,
                                                      args.account, body)
            doc, what = account.to_json(), f"account {account.id}"
        else:
            info = await limits.set_key_limits(pool, redis, settings.names, args.key, body)
            doc, what = info.to_json(), f"key {info.key_id}"
    shown = ", ".join(f"{k}={v}" for k, v in doc["limits"].items()) or "unlimited"
    return doc, f"{what} limits: {shown}"


async def _suspend(settings: Settings, args: argparse.Namespace) -> Output:
    return await _status(settings, args.account_id, "suspended")


async def _resume(settings: Settings, args: argparse.Namespace) -> Output:
    return await _status(settings, args.account_id, "active")


async def _status(settings: Settings, account_id: str, status: str) -> Output:
    async with _pool(settings) as pool, _redis(settings) as redis:
        account = await limits.set_account_status(pool, redis, settings.names, account_id,
                                                  status)
    return account.to_json(), f"account {account.id} is {account.status}"


async def _issue_key(settings: Settings, args: argparse.Namespace) -> Output:
    async with _pool(settings) as pool, _redis(settings) as redis:
        issued = await keys.issue_key(
            pool, redis, settings.names, args.account_id, args.name,
            bcrypt_rounds=settings.bcrypt_rounds,
        )
    text = (
        f"key {issued.info.key_id} issued for account {issued.info.account_id}\n"
        f"{issued.key}\n"
        "This is the only time the key is shown; store it now."
    )
    return issued.to_json(), text


async def _list_keys(settings: Settings, args: argparse.Namespace) -> Output:
    async with _pool(settings) as pool:
        found = await keys.list_keys(pool, args.account_id)
    lines = [
        f"{k.key_id}  {k.status:<8}  {k.created_at:%Y-%m-%d %H:%M:%S}  {k.name}" for k in found
    ]
    return {"keys": [k.to_json() for k in found]}, "\n".join(lines) or "no keys"


async def _revoke_key(settings: Settings, args: argparse.Namespace) -> Output:
    async with _pool(settings) as pool, _redis(settings) as redis:
        info = await keys.revoke_key(pool, redis, settings.names, args.key_id)
    return info.to_json(), f"key {info.key_id} revoked"


async def _usage(settings: Settings, args: argparse.Namespace) -> Output:
    limit = usage.parse_limit(args.limit)
    async with _pool(settings) as pool:
        report = await usage.account_usage(pool, args.account_id, limit=limit)
    lines = [
        f"{r['received_at']}  {r['model'] or '-'}  {r['status']} {r['outcome']}  "
        f"tokens={r['total_tokens']}  cost_micros={r['cost_micros']}  "
        f"latency_ms={r['latency_ms']:.1f}"
        for r in report.records
    ]
    t = report.totals
    lines.append(
        f"total: requests={t['requests']} tokens={t['total_tokens']} "
        f"cost_micros={t['cost_micros']} ({t['since']} .. {t['until']})"
    )
    return report.to_json(), "\n".join(lines)


# Staff changes from the command line are audited as the CLI; who ran it is the
# operator's shell history and host login records.
CLI_ACTOR = "cli"


async def _grant_staff(settings: Settings, args: argparse.Namespace) -> Output:
    async with _pool(settings) as pool:
        granted = await staff.grant(pool, args.email, args.role, CLI_ACTOR)
    doc = {"email": args.email, "role": args.role, "granted": granted}
    return doc, f"{args.role} {'granted to' if granted else 'already held by'} {args.email}"


async def _revoke_staff(settings: Settings, args: argparse.Namespace) -> Output:
    async with _pool(settings) as pool:
        revoked = await staff.revoke(pool, args.email, args.role, CLI_ACTOR)
    doc = {"email": args.email, "role": args.role, "revoked": revoked}
    return doc, f"{args.role} {'revoked from' if revoked else 'not held by'} {args.email}"


async def _list_staff(settings: Settings, args: argparse.Namespace) -> Output:
    async with _pool(settings) as pool:
        found = await staff.list_staff(pool)
    lines = [f"{s['email']}  {','.join(s['roles'])}" for s in found]
    return {"staff": found}, "\n".join(lines) or "no staff"


async def _audit_log(settings: Settings, args: argparse.Namespace) -> Output:
    since = usage.parse_time(args.since, "since")
    async with _pool(settings) as pool:
        rows = await audit.export(pool, since)
    lines = [f"{r['at']}  {r['actor']}  {r['action']}  {r['target']}" for r in rows]
    return {"audit": rows}, "\n".join(lines) or "no audit rows"


async def _policy_notify(settings: Settings, args: argparse.Namespace) -> Output:
    async with _pool(settings) as pool:
        run = await notices.notify(pool, args.version, settings.public_url,
                                   batch=args.batch, rate_per_s=args.rate)
    doc = {"version": run.version, "queued": run.queued, "batches": run.batches}
    return doc, f"policy {run.version}: {run.queued} notices queued"


_COMMANDS: dict[str, Command] = {
    "policy-notify": _policy_notify,
    "grant-staff": _grant_staff,
    "revoke-staff": _revoke_staff,
    "list-staff": _list_staff,
    "audit-log": _audit_log,
    "migrate": _migrate,
    "create-account": _create_account,
    "issue-key": _issue_key,
    "list-keys": _list_keys,
    "revoke-key": _revoke_key,
    "usage": _usage,
    "credit": _credit,
    "balance": _balance,
    "set-limits": _set_limits,
    "suspend": _suspend,
    "resume": _resume,
}


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--json", action="store_true", help="print machine-readable JSON")
    parser = argparse.ArgumentParser(prog="python -m control_plane")
    parser.set_defaults(json=False)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("migrate", parents=[common], help="apply pending schema migrations")
    p = sub.add_parser("serve", help="run the control plane's roles (default: all)")
    p.add_argument("--role", action="append", metavar="ROLE",
                   help="web, ingest or admin; repeat or comma-separate (default: all)")
    p = sub.add_parser("create-account", parents=[common], help="create an account")
    p.add_argument("name")
    p = sub.add_parser("issue-key", parents=[common], help="issue an API key (shown once)")
    p.add_argument("account_id")
    p.add_argument("--name", default=None)
    p = sub.add_parser("list-keys", parents=[common], help="list an account's keys")
    p.add_argument("account_id")
    p = sub.add_parser("revoke-key", parents=[common], help="revoke an API key")
    p.add_argument("key_id")
    p = sub.add_parser("usage", parents=[common], help="an account's recent usage and totals")
    p.add_argument("account_id")
    p.add_argument("--limit", default=None)
    p = sub.add_parser("credit", parents=[common], help="add credit to an account's balance")
    p.add_argument("account_id")
    p.add_argument("amount_usd", help="dollars, e.g. 10 or 0.25 (negative for adjustments)")
    p.add_argument("--kind", choices=ledger.CREDIT_KINDS, default="topup")
    p.add_argument("--reference", default=None,
                   help="idempotency reference: the same one again credits nothing")
    p = sub.add_parser("balance", parents=[common],
                       help="an account's ledger, live and reserved balance")
    p.add_argument("account_id")
    p = sub.add_parser("set-limits", parents=[common],
                       help="set an account's or a key's limits (omitted or 0 = unlimited)")
    target = p.add_mutually_exclusive_group(required=True)
    target.add_argument("--account", metavar="ACCOUNT_ID")
    target.add_argument("--key", metavar="KEY_ID")
    for name in ("rpm", "tpm", "conc"):
        p.add_argument(f"--{name}", type=int, default=None, metavar="N")
    for name, what in (("suspend", "suspend an account"), ("resume", "resume an account")):
        p = sub.add_parser(name, parents=[common], help=what)
        p.add_argument("account_id")
    for name, what in (("grant-staff", "give a signed-in user a staff role"),
                       ("revoke-staff", "take a staff role away")):
        p = sub.add_parser(name, parents=[common], help=what)
        p.add_argument("email")
        p.add_argument("role", choices=staff.ROLES)
    sub.add_parser("list-staff", parents=[common], help="staff and their roles")
    p = sub.add_parser("policy-notify", parents=[common],
                       help="e-mail every user once about a material policy change "
                            "(resumable: run it again after a crash)")
    p.add_argument("version")
    p.add_argument("--batch", type=int, default=notices.DEFAULT_BATCH,
                   help="users per transaction")
    p.add_argument("--rate", type=float, default=notices.DEFAULT_RATE_PER_S,
                   help="messages queued per second at most")
    p = sub.add_parser("audit-log", parents=[common], help="export the audit log")
    p.add_argument("--since", default=None, help="ISO 8601 time")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    serving: tuple[str, ...] = ()
    try:
        if args.command == "serve":
            serving = parse_roles(args.role)
        settings = Settings.from_env()
        if ADMIN in serving:
            settings.require_admin_token()
        if WEB in serving:
            settings.require_session_secret()
    except (SettingsError, RoleError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    logs.configure(settings.log_level_number)
    try:
        if args.command == "serve":
            # The service only: a one-off chore reports its failure on the terminal.
            monitoring.init(settings.monitoring.sentry_dsn, service="control_plane",
                            environment=settings.monitoring.sentry_environment)
            service.run(settings, serving)
            return 0
        doc, text = asyncio.run(_COMMANDS[args.command](settings, args))
    except Exception as e:  # top of the command: known failures become a one-line message
        error = classify(e)
        if error is None:
            raise
        if args.json:
            body = {"error": {"message": error.message, "type": error.type}}
            print(orjson.dumps(body).decode(), file=sys.stderr)
        else:
            print(f"error: {error.message}", file=sys.stderr)
        return 1
    print(orjson.dumps(doc).decode() if args.json else text)
    return 0
