"""The system under test for the benchmarks: Redis, the mock upstream and two proxies.

Owns: starting the mock OpenAI upstream and two proxies as subprocesses on free
127.0.0.1 ports (and a throwaway Redis unless a URL is given), publishing one API key
and its account's state the way the control plane does, and on exit stopping exactly
the processes it started, by their pid, and deleting every Redis key it wrote (its own
unique prefix). The two proxies share Redis, the key and the catalog and differ only in
admission (``proxy`` has it on, as in production; ``proxy-noadmit`` runs with
``QNP_ADMISSION=off``), so the difference between them is what admission costs.

Must not import ``proxy`` or ``control_plane``: the proxy is measured from outside.
"""

from __future__ import annotations

import contextlib
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from collections import Counter
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import bcrypt
import orjson
import redis

from devstack.servers import start_redis
from shared import apikeys
from shared.apikeys import KeyRecord
from shared.redis_names import RedisNames

HOST = "127.0.0.1"
MODEL = "bench-mini"  # the name clients use at the proxy
UPSTREAM_MODEL = "gpt-4o-mini"  # the name the proxy sends upstream, and direct calls use
UPSTREAM_KEY = "sk-bench-upstream"
_ROOT = Path(__file__).resolve().parent.parent
_START_TIMEOUT = 30.0
_STOP_TIMEOUT = 10.0
# Far more credit than any run spends, so admission never refuses for want of it.
_BALANCE_MICROS = 10**15
# The warning a proxy logs when it admits an account with no published state (under
# the degraded local policy, which is not what production measures).
UNPUBLISHED_WARNING = "no published state"

_CATALOG = f"""
[providers.mock]
base_url = "{{base_url}}"
api_key_env = "BENCH_UPSTREAM_KEY"

[models."{MODEL}"]
provider = "mock"
upstream_model = "{UPSTREAM_MODEL}"
prompt_price = 0.15
completion_price = 0.60
"""


class StackError(RuntimeError):
    """A server under test did not start; the message carries the end of its log."""


@dataclass(frozen=True, slots=True)
class Proxy:
    """One proxy process under test."""

    name: str  # the benchmark target it is measured as
    url: str  # base URL, ends in /v1
    node_id: str  # its QNP_NODE_ID, stamped on every event it emits
    admission: bool
    log: Path  # its stdout and stderr (warnings and errors only); gone after the run

    def log_lines(self) -> list[str]:
        return self.log.read_text(errors="replace").splitlines()


@dataclass(frozen=True, slots=True)
class Stack:
    upstream_url: str  # base URL, ends in /v1
    proxies: tuple[Proxy, ...]  # admission on first, then off
    api_key: str  # a qnp_ key both proxies accept
    account_id: str  # the key's account, its state published with ample credit
    redis_url: str
    redis_is_ours: bool  # False when REDIS_URL was given
    names: RedisNames
    proxy_workers: int

    def event_counts(self) -> Counter[str]:
        """Entries on the shared event stream, by the node id of the proxy that wrote them."""
        counts: Counter[str] = Counter()
        with contextlib.closing(redis.Redis.from_url(self.redis_url)) as client:
            start = "-"
            while True:
                page = client.xrange(self.names.events, min=start, count=10_000)
                for _, entry in page:
                    counts[orjson.loads(entry[b"e"])["node_id"]] += 1
                if len(page) < 10_000:
                    return counts
                start = "(" + page[-1][0].decode()


class _Child:
    """One subprocess we started, with its output in a log file; stopped by its pid."""

    def __init__(self, name: str, argv: list[str], env: Mapping[str, str], log: Path) -> None:
        self.name, self.log = name, log
        with open(log, "ab") as out:
            self.proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=dict(env),
                cwd=_ROOT,
                # Our own session: Ctrl-C in a terminal reaches only us, and we stop the
                # children in order instead of them racing us to exit.
                start_new_session=True,
            )

    def wait_ready(self, url: str, headers: Mapping[str, str]) -> None:
        deadline = time.monotonic() + _START_TIMEOUT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise StackError(f"{self.name} exited with {self.proc.returncode}:\n{self.tail()}")
            request = urllib.request.Request(url, headers=dict(headers))
            with contextlib.suppress(urllib.error.URLError, ConnectionError, TimeoutError):
                with urllib.request.urlopen(request, timeout=1.0) as resp:
                    if resp.status == 200:
                        return
            time.sleep(0.05)
        raise StackError(f"{self.name} not ready within {_START_TIMEOUT:.0f} s:\n{self.tail()}")

    def stop(self) -> None:
        """SIGTERM to our child's pid (Popen never signals a reaped pid), then SIGKILL."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=_STOP_TIMEOUT)
                return
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.proc.wait()

    def tail(self) -> str:
        return self.log.read_text(errors="replace")[-3000:]


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind((HOST, 0))
        return int(probe.getsockname()[1])


@contextlib.contextmanager
def _child(
    name: str, argv: list[str], env: Mapping[str, str], log: Path, ready_url: str,
    headers: Mapping[str, str],
) -> Iterator[_Child]:
    child = _Child(name, argv, env, log)
    try:
        child.wait_ready(ready_url, headers)
        yield child
    finally:
        child.stop()


def _publish_key(redis_url: str, names: RedisNames) -> tuple[str, str]:
    """Issue a key as the control plane does: bcrypt hash in Redis, and its account's
    live state (active, ample credit) so admission runs its real script rather than the
    degraded local policy. Returns the key's secret and the account id."""
    key, parts = apikeys.generate()
    account_id = str(uuid.uuid4())
    record = KeyRecord(
        key_id=parts.key_id,
        account_id=account_id,
        status="active",
        secret_hash=bcrypt.hashpw(parts.secret.encode(), bcrypt.gensalt(4)).decode(),
        limits={},
    )
    with contextlib.closing(redis.Redis.from_url(redis_url)) as client:
        client.set(names.key_record(parts.key_id), record.encode())
        client.hset(names.account_state(account_id),
                    mapping={"bal": _BALANCE_MICROS, "status": "active"})
    return key, account_id


def _delete_prefix(redis_url: str, names: RedisNames) -> None:
    """Every key under our prefix (key record, account state, admission's keys, the
    event stream) goes."""
    with contextlib.closing(redis.Redis.from_url(redis_url)) as client:
        keys = list(client.scan_iter(match=f"{names.prefix}:*", count=1000))
        for i in range(0, len(keys), 500):
            client.unlink(*keys[i : i + 500])


@contextlib.contextmanager
def running_stack(
    *, redis_url: str | None, workers: int, chunks: int, base_env: Mapping[str, str]
) -> Iterator[Stack]:
    """Start everything; on exit stop it in reverse order and delete our Redis keys."""
    with contextlib.ExitStack() as stack:
        redis_is_ours = not redis_url
        if not redis_url:
            redis_url = stack.enter_context(start_redis()).url
        names = RedisNames(prefix=f"qnpbench{secrets.token_hex(6)}")
        stack.callback(_delete_prefix, redis_url, names)
        api_key, account_id = _publish_key(redis_url, names)
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="qnp-bench-")))

        up_port = _free_port()
        upstream_url = f"http://{HOST}:{up_port}/v1"
        up_argv = [sys.executable, "-m", "devstack.upstream_openai", "--host", HOST,
                   "--port", str(up_port), "--api-key", UPSTREAM_KEY, "--chunks", str(chunks)]
        up_auth = {"Authorization": f"Bearer {UPSTREAM_KEY}"}
        upstream = _child("mock upstream", up_argv, base_env, tmp / "upstream.log",
                          f"{upstream_url}/models", up_auth)
        stack.enter_context(upstream)

        catalog = tmp / "catalog.toml"
        catalog.write_text(_CATALOG.format(base_url=upstream_url))
        proxy_env = {
            **base_env,
            "REDIS_URL": redis_url,
            "QNP_REDIS_PREFIX": names.prefix,
            "BENCH_UPSTREAM_KEY": UPSTREAM_KEY,
            "QNP_LOG_LEVEL": "WARNING",
            "QNP_SHUTDOWN_GRACE": "2",
        }
        proxies = []
        for name, node_id, admission in (("proxy", "bench", True),
                                         ("proxy-noadmit", "bench-noadmit", False)):
            port = _free_port()
            env = {**proxy_env, "QNP_NODE_ID": node_id,
                   "QNP_ADMISSION": "on" if admission else "off"}
            argv = [sys.executable, "-m", "proxy", "--catalog", str(catalog), "--host", HOST,
                    "--port", str(port), "--workers", str(workers)]
            log = tmp / f"{name}.log"
            stack.enter_context(_child(name, argv, env, log, f"http://{HOST}:{port}/readyz", {}))
            proxies.append(Proxy(name, f"http://{HOST}:{port}/v1", node_id, admission, log))

        yield Stack(
            upstream_url=upstream_url,
            proxies=tuple(proxies),
            api_key=api_key,
            account_id=account_id,
            redis_url=redis_url,
            redis_is_ours=redis_is_ours,
            names=names,
            proxy_workers=workers,
        )
