"""The benchmark suite's TLS measurement: the load generator speaks https (trusting the
CA it is given, and only it), and ``--with-tls`` measures our proxy serving HTTPS
beside the plain one, in the same run, with the cost in ``report.md``."""

from __future__ import annotations

import os
import ssl
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import orjson
import pytest
from aiohttp import web

from benchmarks.loadgen import LoadSpec, run
from tests.support import ROOT, free_port
from tests.tls_certs import Pki, make_pki


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
async def https_url(pki: Pki) -> AsyncIterator[str]:
    async def ok(request: web.Request) -> web.Response:
        await request.read()
        return web.json_response({"ok": True})

    app = web.Application()
    app.router.add_post("/json", ok)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(pki.cert, pki.key)
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port, ssl_context=context).start()
    yield f"https://127.0.0.1:{port}/json"
    await runner.cleanup()


async def test_the_load_generator_speaks_https(https_url: str, pki: Pki) -> None:
    result = await run(LoadSpec(url=https_url, body=b"{}", concurrency=2, duration=30.0,
                                max_requests=40, timeout=10.0, ca=str(pki.ca)))
    assert result.ok == 40 and not result.errors


async def test_the_load_generator_refuses_an_untrusted_server(https_url: str,
                                                              pki: Pki) -> None:
    result = await run(LoadSpec(url=https_url, body=b"{}", concurrency=1, duration=0.3,
                                timeout=5.0, ca=str(pki.other_ca)))
    assert result.ok == 0 and result.errors.get("connect", 0) >= 1


def test_with_tls_measures_the_https_proxy_against_the_plain_one(
    tmp_path: Path, redis_url: str,
) -> None:
    folder = tmp_path / "results"
    argv = [sys.executable, "-m", "benchmarks", "--quick", "--scenarios", "nonstream",
            "--duration", "0.5", "--warmup", "0", "--concurrency", "4", "--with-tls",
            "--output-dir", str(folder)]
    result = subprocess.run(argv, cwd=ROOT, env={**os.environ, "REDIS_URL": redis_url},
                            capture_output=True, text=True, timeout=110, check=False)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = orjson.loads((folder / "report.json").read_bytes())
    assert report["targets"]["proxy-tls"]["url"].startswith("https://")
    [nonstream] = [s for s in report["scenarios"] if s["name"] == "nonstream"]
    tls = nonstream["targets"]["proxy-tls"]
    assert tls["ok"] > 0 and not tls["errors"]
    vs_plain = nonstream["comparisons"]["proxy-tls"]["vs_plain"]
    assert vs_plain["rps_per_core_ratio"] > 0
    assert report["proxies"]["proxy-tls"]["requests"] \
        == report["proxies"]["proxy-tls"]["events_emitted"]
    assert "## What TLS costs" in (folder / "report.md").read_text()
