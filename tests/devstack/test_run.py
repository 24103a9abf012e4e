"""``make run`` (``python -m devstack.run``) as a user runs it, against this session's
servers: a throwaway stack keeps its proxy's spool in its own temporary folder, so an
earlier run's spooled events are never replayed into the new run's database."""

from __future__ import annotations

import os
import time
from pathlib import Path

import psutil

from shared.redis_names import RedisNames
from tests.support import ModuleProcess, wait_until_gone

BANNER = "QNP gateway is running"
REPLAYING = "events from before; replaying"
NODE = "make-run-test"


def _plant_orphan_spool(folder: Path) -> list[Path]:
    """What an earlier run's proxy, killed with events spooled, left in the default
    spool folder: a segment of a process whose lock nobody holds."""
    folder.mkdir(parents=True)
    lock = folder / "99999999.lock"
    segment = folder / f"99999999-{time.time_ns():020d}.spool"
    lock.write_bytes(b"")
    segment.write_bytes(b'{"planted": "by an earlier run"}\n' * 3)
    return [lock, segment]


def _proxy_child(run: ModuleProcess) -> psutil.Process:
    for child in psutil.Process(run.pid).children():
        if child.cmdline()[1:3] == ["-m", "proxy"]:
            return child
    raise AssertionError(f"no proxy among make run's children:\n{run.log_text()}")


async def test_make_run_keeps_its_spool_in_its_own_temp_folder(
    tmp_path: Path, scratch_database_url: str, redis_url: str, redis_names: RedisNames,
) -> None:
    system_tmp = tmp_path / "tmp"
    system_tmp.mkdir()
    # The folder a proxy spools to by default (per Redis prefix and node id).
    default_spool = system_tmp / f"qnp-spool-{redis_names.prefix}-{NODE}"
    planted = _plant_orphan_spool(default_spool)
    env = {**os.environ, "DATABASE_URL": scratch_database_url,
           "REDIS_URL": redis_url, "QNP_REDIS_PREFIX": redis_names.prefix,
           "QNP_NODE_ID": NODE, "TMPDIR": str(system_tmp), "QNP_BCRYPT_ROUNDS": "4"}
    env.pop("QNP_SPOOL_DIR", None)
    with ModuleProcess("devstack.run", log_path=tmp_path / "make-run.log", env=env) as run:
        run.wait_for_log(BANNER, timeout=120)
        proxy = _proxy_child(run)
        proxy_env = proxy.environ()
        stack_tmp = Path(proxy_env["QNP_CATALOG"]).parent
        assert stack_tmp.name.startswith("qnp-run-") and stack_tmp.is_dir()
        assert run.stop() == 0
    assert wait_until_gone(proxy.pid, timeout=5)
    log = run.log_text()
    assert REPLAYING not in log, log[-3000:]
    assert all(p.exists() for p in planted)  # nobody adopted the earlier run's segment
    assert Path(proxy_env.get("QNP_SPOOL_DIR", default_spool)).parent == stack_tmp
    assert not stack_tmp.exists()  # removed on exit, spool and all
