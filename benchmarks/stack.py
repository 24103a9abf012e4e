"""The system under test: Redis, the mock upstream, the reference passthrough and our
proxy, started as pinned subprocesses on 127.0.0.1, plus any baselines (our proxy from
another commit's source tree, same catalog, key and pinning) and external targets.

Owns: starting each server on a free port (the mock's may be fixed with ``--mock-port``
so a user can point another gateway at it first), pinning it to the "proxy" or the
"load" CPUs, publishing one API key and its account's state the way the control plane
does (ample credit AND high limits, so admission runs its full sliding-window logic
without ever refusing), counting the events the proxies add to the Redis stream, and on
every exit path (Ctrl-C included) stopping exactly the processes it started, by pid, in
reverse order, and deleting every Redis key under its own prefix.

Must not import ``proxy`` or ``control_plane``: the proxy is measured from outside.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import re
import secrets
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import bcrypt
import redis

from benchmarks.processes import parse_cpus
from devstack.servers import start_redis
from shared import apikeys
from shared.apikeys import KeyRecord
from shared.redis_names import RedisNames

HOST = "127.0.0.1"
UPSTREAM_KEY = "sk-bench-upstream"
ROOT = Path(__file__).resolve().parent.parent
DIRECT, PASSTHROUGH, PROXY, NOADMIT = "direct", "passthrough", "proxy", "proxy-noadmit"
PROXY_TLS = "proxy-tls"  # our proxy serving HTTPS itself (--with-tls): what TLS costs
# Our proxy with SENTRY_DSN set (--with-sentry), reporting to a local sink: what the SDK
# costs the hot path.
PROXY_SENTRY = "proxy-sentry"
BASELINE_PREFIX = f"{PROXY}@"  # a baseline's name: proxy@<the ref it was built from>
# The warning a proxy logs when it admits an account with no published state: it then
# runs the degraded local policy, which is not what production measures.
UNPUBLISHED_WARNING = "no published state"
# What it logs when Redis does not answer in time: admission runs the local fallback.
DEGRADED_ERROR = "admission degraded"
_START_TIMEOUT = 30.0
_STOP_TIMEOUT = 10.0
_PR_SET_PDEATHSIG = 1

_PROVIDER = """[providers.mock]
kind = "openai"
base_url = "{base_url}"
api_key_env = "BENCH_UPSTREAM_KEY"
"""
_MODEL = """
[models."{name}"]
provider = "mock"
upstream_model = "{name}"
prompt_price = 0.15
completion_price = 0.60
"""


class StackError(RuntimeError):
    """A server under test did not start; the message carries the end of its log."""


def file_name(name: str) -> str:
    """A target's name as a file name (a baseline's carries its git ref: ``proxy@v1/x``)."""
    return re.sub(r"[^A-Za-z0-9@._-]", "_", name)


def cpu_list(cpus: Iterable[int]) -> str:
    return ",".join(str(c) for c in sorted(cpus))


@dataclass(frozen=True, slots=True)
class Pinning:
    """Which CPUs the servers under test and the load side run on (None: not pinned)."""

    proxy: frozenset[int] | None
    load: frozenset[int] | None
    note: str

    @property
    def both(self) -> frozenset[int] | None:
        return None if self.proxy is None or self.load is None else self.proxy | self.load

    @staticmethod
    def choose(proxy: str | None, load: str | None) -> Pinning:
        """The issue's set-up by default: proxy on the first CPU we may use, load on the
        next; on a one-CPU machine nothing is pinned (and the report says so)."""
        allowed = sorted(os.sched_getaffinity(0))
        if proxy is None and load is None and len(allowed) < 2:
            return Pinning(None, None, f"not pinned: only {len(allowed)} CPU available")
        p = frozenset(parse_cpus(proxy)) if proxy else frozenset(allowed[:1])
        rest = [c for c in allowed if c not in p] or allowed
        ld = frozenset(parse_cpus(load)) if load else frozenset(rest[:1])
        return Pinning(p, ld, f"proxy and passthrough on CPU {cpu_list(p)}; mock, load "
                              f"generator and Redis on CPU {cpu_list(ld)}")


def _child_setup(cpus: frozenset[int] | None) -> Callable[[], None]:
    """Runs in the child before exec: pin it (its own children inherit the mask) and have
    the kernel SIGTERM it if we die, even by SIGKILL, so nothing outlives the suite."""
    libc = ctypes.CDLL(None, use_errno=True)

    def setup() -> None:
        if cpus is not None:
            os.sched_setaffinity(0, cpus)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)

    return setup


class Child:
    """One subprocess we started, output in a log file; stopped by its pid only."""

    def __init__(self, name: str, argv: list[str], env: Mapping[str, str], log: Path,
                 cpus: frozenset[int] | None, cwd: Path = ROOT) -> None:
        self.name, self.argv, self.log, self.cpus, self.cwd = name, argv, log, cpus, cwd
        with open(log, "ab") as out:
            self.proc = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                env=dict(env), cwd=cwd,
                # Our own session: a terminal's Ctrl-C reaches only us, and we stop the
                # children in order instead of them racing us to exit. (preexec_fn is
                # safe here: the suite runs no threads.)
                start_new_session=True, preexec_fn=_child_setup(cpus),
            )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def wait_ready(self, ready: Callable[[], bool]) -> None:
        deadline = time.monotonic() + _START_TIMEOUT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise StackError(f"{self.name} exited with {self.proc.returncode}:\n{self.tail()}")
            if ready():
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

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def tail(self) -> str:
        return self.log_text()[-3000:]


def http_ok(url: str, ca: str | None = None) -> Callable[[], bool]:
    context = ssl.create_default_context(cafile=ca) if url.startswith("https:") else None

    def ready() -> bool:
        with contextlib.suppress(urllib.error.URLError, ConnectionError, TimeoutError):
            with urllib.request.urlopen(url, timeout=1.0, context=context) as resp:
                return bool(resp.status == 200)
        return False

    return ready


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind((HOST, 0))
        return int(probe.getsockname()[1])


@dataclass(frozen=True, slots=True)
class Target:
    """One thing the load generator is pointed at."""

    name: str
    base_url: str  # ends in /v1
    headers: Mapping[str, str]
    role: str  # "direct", "reference", "proxy", "baseline" or "external"
    pids: tuple[int, ...] = ()  # roots of the process trees whose CPU and RSS we sample
    log: Path | None = None  # our proxies' output (they log at WARNING)
    cpus: str | None = None  # what it is pinned to, for the report
    ca: str | None = None  # https: the CA file the load generator trusts

    @property
    def is_ours(self) -> bool:
        return self.role in ("proxy", "baseline")


@dataclass
class Stack:
    redis_url: str
    redis_pid: int | None  # None: REDIS_URL given, not ours to sample
    names: RedisNames
    api_key: str
    account_id: str
    mock_url: str  # ends in /v1
    mock_pid: int
    pinning: Pinning
    tmp: Path
    env: Mapping[str, str]
    catalog: Path
    targets: list[Target] = field(default_factory=list)
    children: list[Child] = field(default_factory=list)

    @property
    def load_pids(self) -> tuple[int, ...]:
        """The load side we sample (the load generator is counted separately)."""
        return (self.mock_pid,) if self.redis_pid is None else (self.mock_pid, self.redis_pid)

    def commands(self) -> dict[str, dict[str, Any]]:
        """Every server we started: its command line, pid and pinning."""
        return {c.name: {"argv": c.argv, "pid": c.pid, "cwd": str(c.cwd),
                         "cpus": cpu_list(c.cpus) if c.cpus else None} for c in self.children}

    def events_added(self) -> int:
        """Entries ever added to the event stream; unlike its length, trimming (MAXLEN)
        does not lower it."""
        with contextlib.closing(redis.Redis.from_url(self.redis_url)) as client:
            try:
                info = client.xinfo_stream(self.names.events)
            except redis.ResponseError:  # no event yet: no stream
                return 0
        return int(info.get("entries-added", info["length"]))

    def proxy_headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}", "Content-Type": "application/json"}

    @contextlib.contextmanager
    def proxy(self, name: str, *, workers: int, cpus: frozenset[int] | None,
              admission: bool = True, tree: Path | None = None,
              tls: tuple[Path, Path, Path] | None = None,
              extra_env: Mapping[str, str] | None = None) -> Iterator[Target]:
        """Our proxy as ``python -m proxy``; its ``--workers`` children inherit its pinning.

        With ``tree`` (another commit's source), that tree's proxy: run from it, with it
        alone on PYTHONPATH, so neither our checkout nor an editable install is imported.
        With ``tls`` (certificate, key, the CA that signed them) it serves HTTPS.
        """
        port = free_port()
        env = {**self.env, "REDIS_URL": self.redis_url, "QNP_REDIS_PREFIX": self.names.prefix,
               "QNP_NODE_ID": f"bench-{name}", "QNP_LOG_LEVEL": "WARNING",
               "QNP_EVENT_STREAM_MAXLEN": "200000", "QNP_SHUTDOWN_GRACE": "2",
               "QNP_ADMISSION": "on" if admission else "off",
               "BENCH_UPSTREAM_KEY": UPSTREAM_KEY,
               "QNP_SPOOL_DIR": str(self.tmp / f"spool-{file_name(name)}"),
               "QNP_METRICS_PORT": "0",
               # Every load connection comes from 127.0.0.1: no per-address cap here.
               "QNP_HTTP_MAX_CONNECTIONS_PER_IP": "0", **(extra_env or {})}
        if tree is not None:
            env["PYTHONPATH"] = str(tree)
        argv = [sys.executable, "-m", "proxy", "--catalog", str(self.catalog), "--host", HOST,
                "--port", str(port), "--workers", str(workers)]
        scheme, ca = "http", None
        if tls is not None:
            argv += ["--tls-cert", str(tls[0]), "--tls-key", str(tls[1])]
            scheme, ca = "https", str(tls[2])
        with self._child(name, argv, env, cpus, http_ok(f"{scheme}://{HOST}:{port}/readyz", ca),
                         cwd=tree or ROOT) as c:
            yield Target(name, f"{scheme}://{HOST}:{port}/v1", self.proxy_headers(),
                         "proxy" if tree is None else "baseline", (c.pid,), c.log,
                         cpu_list(cpus) if cpus else None, ca)

    @contextlib.contextmanager
    def _child(self, name: str, argv: list[str], env: Mapping[str, str],
               cpus: frozenset[int] | None, ready: Callable[[], bool],
               cwd: Path = ROOT) -> Iterator[Child]:
        child = Child(name, argv, env, self.tmp / f"{file_name(name)}.log", cpus, cwd)
        self.children.append(child)
        try:
            child.wait_ready(ready)
            yield child
        finally:
            child.stop()


def _log_says(child_log: Path, line: str) -> Callable[[], bool]:
    return lambda: child_log.exists() and line in child_log.read_text(errors="replace")


def _publish_key(client: redis.Redis, names: RedisNames) -> tuple[str, str]:
    """Issue a key as the control plane does (bcrypt hash in Redis) and publish its
    account's live state. Returns the key's secret and the account id."""
    key, parts = apikeys.generate()
    account_id = str(uuid.uuid4())
    record = KeyRecord(
        key_id=parts.key_id, account_id=account_id, status="active",
        secret_hash=bcrypt.hashpw(parts.secret.encode(), bcrypt.gensalt(4)).decode(),
        limits={},
    )
    client.set(names.key_record(parts.key_id), record.encode())
    # Far more than any run spends or sends: admission does all its work (sliding
    # windows, in-flight sets, credit) and never refuses.
    client.hset(names.account_state(account_id), mapping={
        "bal": 10**15, "status": "active", "rpm": 10**9, "tpm": 10**12, "conc": 10**6})
    # As the control plane's reconciler does once everything is out: without it the
    # proxy takes Redis for unfilled and answers an unknown key 503 rather than 401.
    client.set(names.published, "bench")
    return key, account_id


def _delete_prefix(redis_url: str, names: RedisNames) -> None:
    """Every key under our prefix goes: key record, account state, admission's logs and
    the event stream."""
    with contextlib.closing(redis.Redis.from_url(redis_url)) as client:
        keys = list(client.scan_iter(match=f"{names.prefix}:*", count=1000))
        for i in range(0, len(keys), 500):
            client.unlink(*keys[i : i + 500])


@dataclass(frozen=True, slots=True)
class StackSpec:
    models: Sequence[str]  # every model name a scenario sends
    pinning: Pinning
    redis_url: str | None  # None: a throwaway one
    mock_port: int | None
    mock_processes: int
    with_noadmit: bool
    externals: Mapping[str, tuple[str, str | None, int | None]]  # name → (url, key, pid)
    baselines: Mapping[str, Path] = field(default_factory=dict)  # name → source tree
    with_tls: bool = False  # also our proxy serving HTTPS, with a throwaway certificate
    with_sentry: bool = False  # also our proxy with SENTRY_DSN set (a local sink)


@contextlib.contextmanager
def running_stack(spec: StackSpec, env: Mapping[str, str], tmp: Path) -> Iterator[Stack]:
    """Start everything; on exit stop it in reverse order and delete our Redis keys."""
    pin = spec.pinning
    with contextlib.ExitStack() as exits:
        redis_pid = None
        redis_url = spec.redis_url
        if not redis_url:
            server = exits.enter_context(start_redis())
            redis_url, redis_pid = server.url, server.pid
            if redis_pid is not None and pin.load is not None:
                os.sched_setaffinity(redis_pid, pin.load)
        names = RedisNames(prefix=f"qnpbench{secrets.token_hex(6)}")
        exits.callback(_delete_prefix, redis_url, names)
        with contextlib.closing(redis.Redis.from_url(redis_url)) as client:
            api_key, account_id = _publish_key(client, names)

        mock_port = spec.mock_port or free_port()
        mock_argv = [sys.executable, "-m", "benchmarks.mock_upstream", "--host", HOST,
                     "--port", str(mock_port), "--processes", str(spec.mock_processes),
                     "--api-key", UPSTREAM_KEY]
        if pin.load is not None:
            mock_argv += ["--cpus", cpu_list(pin.load)]
        catalog = tmp / "catalog.toml"
        mock_url = f"http://{HOST}:{mock_port}/v1"
        catalog.write_text(_PROVIDER.format(base_url=mock_url)
                           + "".join(_MODEL.format(name=m) for m in sorted(set(spec.models))))
        stack = Stack(redis_url, redis_pid, names, api_key, account_id, mock_url, 0, pin, tmp,
                      env, catalog)
        mock_log = tmp / "mock.log"
        mock = exits.enter_context(stack._child(
            "mock", mock_argv, env, pin.load, _log_says(mock_log, "mock_upstream ready on")))
        stack.mock_pid = mock.pid
        upstream_auth = {"Authorization": f"Bearer {UPSTREAM_KEY}",
                         "Content-Type": "application/json"}
        stack.targets.append(Target(DIRECT, mock_url, upstream_auth, "direct", (mock.pid,),
                                    cpus=cpu_list(pin.load) if pin.load else None))

        port = free_port()
        pt_argv = [sys.executable, "-m", "benchmarks.passthrough", "--host", HOST, "--port",
                   str(port), "--upstream", f"http://{HOST}:{mock_port}"]
        if pin.proxy is not None:
            pt_argv += ["--cpus", cpu_list(pin.proxy)]
        pt_log = tmp / f"{PASSTHROUGH}.log"
        pt = exits.enter_context(stack._child(PASSTHROUGH, pt_argv, env, pin.proxy,
                                              _log_says(pt_log, "passthrough ready on")))
        stack.targets.append(Target(PASSTHROUGH, f"http://{HOST}:{port}/v1", upstream_auth,
                                    "reference", (pt.pid,), pt.log,
                                    cpu_list(pin.proxy) if pin.proxy else None))

        stack.targets.append(exits.enter_context(stack.proxy(PROXY, workers=1, cpus=pin.proxy)))
        for name, tree in spec.baselines.items():
            stack.targets.append(exits.enter_context(
                stack.proxy(name, workers=1, cpus=pin.proxy, tree=tree)))
        if spec.with_noadmit:
            stack.targets.append(exits.enter_context(
                stack.proxy(NOADMIT, workers=1, cpus=pin.proxy, admission=False)))
        if spec.with_tls:
            # The tests' throwaway CA (ECDSA P-256, as Cloudflare's origin certificates
            # may be): this checkout's tests/ folder, like the rest of the suite's tools.
            from tests.tls_certs import make_pki

            pki = make_pki(tmp / "pki")
            stack.targets.append(exits.enter_context(stack.proxy(
                PROXY_TLS, workers=1, cpus=pin.proxy, tls=(pki.cert, pki.key, pki.ca))))
        if spec.with_sentry:
            # The tests' Sentry ingestion endpoint, on the load side: it only receives
            # if the proxy reports an error, which a clean run does not.
            sink_port = free_port()
            sink_log = tmp / "sentry-sink.log"
            exits.enter_context(stack._child(
                "sentry-sink", [sys.executable, "-m", "tests.sentry_sink", "--port",
                                str(sink_port)], env, pin.load,
                _log_says(sink_log, "Sentry sink: SENTRY_DSN=")))
            dsn = f"http://bench@{HOST}:{sink_port}/1"
            stack.targets.append(exits.enter_context(stack.proxy(
                PROXY_SENTRY, workers=1, cpus=pin.proxy, extra_env={"SENTRY_DSN": dsn})))
        for name, (url, key, pid) in spec.externals.items():
            headers = {"Content-Type": "application/json"}
            if key:
                headers["Authorization"] = f"Bearer {key}"
            stack.targets.append(Target(name, url.rstrip("/"), headers, "external",
                                        (pid,) if pid else ()))
        yield stack
