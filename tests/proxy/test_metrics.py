"""The proxy's metrics as an operator reads them: on their own listener, summed across
a process group the way Prometheus would sum them, with the hardening's counters from
closed label sets and the open-stream gauge the autoscaler follows."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

import aiohttp
import pytest

from devstack.upstream_openai import MockOpenAIUpstream
from proxy.metrics import REJECT_REASONS, THROTTLE_SCOPES, Metrics, UnknownLabel
from proxy.metrics_group import MetricsPortTaken, sum_expositions
from proxy.settings import SettingsError, _metrics_port
from tests.proxy.conftest import Gateway, GatewayFactory
from tests.support import free_port

MESSAGES = [{"role": "user", "content": "Count slowly."}]


def _value(text: str, sample: str) -> float:
    match = re.search(rf"^{re.escape(sample)} (\S+)$", text, re.MULTILINE)
    assert match, f"{sample} not exported"
    return float(match.group(1))


def test_rejections_and_throttles_are_counted_by_closed_label_sets() -> None:
    m = Metrics()
    text = m.render().decode()
    for reason in REJECT_REASONS:  # every reason exported from the start, at 0
        assert _value(text, f'qnp_http_rejections_total{{reason="{reason}"}}') == 0
    m.rejected("head_timeout")
    m.rejected("head_timeout")
    m.rejected("conn_limit_ip")
    m.auth_throttled("client_ip")
    text = m.render().decode()
    assert _value(text, 'qnp_http_rejections_total{reason="head_timeout"}') == 2
    assert _value(text, 'qnp_http_rejections_total{reason="conn_limit_ip"}') == 1
    assert _value(text, 'qnp_auth_throttled_total{scope="client_ip"}') == 1
    assert _value(text, 'qnp_auth_throttled_total{scope="key_id"}') == 0
    assert set(THROTTLE_SCOPES) == {"key_id", "client_ip", "queue"}
    with pytest.raises(UnknownLabel):
        m.rejected("/etc/passwd")  # a client string must never become a label
    with pytest.raises(UnknownLabel):
        m.auth_throttled("anything")


def test_a_group_sums_counters_and_histograms_and_keeps_states_as_states() -> None:
    a, b = Metrics(), Metrics()
    for _ in range(3):
        a.request_done("demo-mini", 200, 0.02, 0.01)
    b.request_done("demo-mini", 200, 0.2, None)
    b.request_done("demo-mini", 429, 0.001, None)
    a.rejected("bad_request")
    b.rejected("bad_request")
    a.streams_open, b.streams_open = 2, 5
    b.admission_degraded.set(1)
    text = sum_expositions([a.render().decode(), b.render().decode()]).decode()
    assert _value(text, 'qnp_requests_total{model="demo-mini",status="200"}') == 4
    assert _value(text, 'qnp_requests_total{model="demo-mini",status="429"}') == 1
    assert _value(text, 'qnp_request_duration_seconds_count{model="demo-mini"}') == 5
    assert _value(text, 'qnp_request_duration_seconds_bucket{le="0.025",model="demo-mini"}') == 4
    assert _value(text, 'qnp_request_duration_seconds_sum{model="demo-mini"}') == \
        pytest.approx(3 * 0.02 + 0.2 + 0.001)
    assert _value(text, 'qnp_time_to_first_token_seconds_count{model="demo-mini"}') == 3
    assert _value(text, 'qnp_http_rejections_total{reason="bad_request"}') == 2
    assert _value(text, "qnp_inflight_streams") == 7
    assert _value(text, "qnp_admission_degraded") == 1  # degraded somewhere: 1, not a sum
    assert _value(text, "qnp_metrics_workers_unreachable") == 0
    # Still one family per name, in the exposition format Prometheus parses.
    assert text.count("# TYPE qnp_requests_total counter") == 1


async def test_inflight_streams_follow_open_streams(
    gateway: Gateway, api_key: str, mock_upstream: MockOpenAIUpstream,
) -> None:
    mock_upstream.behaviour.chunks = 40
    mock_upstream.behaviour.chunk_delay = 0.05
    metrics_url = f"http://127.0.0.1:{gateway.running.metrics_port}/metrics"

    async def gauge(s: aiohttp.ClientSession) -> float:
        async with s.get(metrics_url) as r:
            return _value(await r.text(), "qnp_inflight_streams")

    async with aiohttp.ClientSession() as s, gateway.client(api_key) as client:
        assert await gauge(s) == 0
        streams = [await client.chat.completions.create(
            model="demo-mini", messages=MESSAGES, stream=True)  # type: ignore[arg-type]
            for _ in range(2)]
        first = [await anext(aiter(st)) for st in streams]
        assert all(first)
        assert await gauge(s) == 2  # both still relaying
        for st in streams:
            async for _chunk in st:
                pass
        for _ in range(100):  # the handler finishes just after the last byte
            if await gauge(s) == 0:
                break
            await asyncio.sleep(0.01)
        assert await gauge(s) == 0


async def test_metrics_can_be_switched_off(start_gateway: GatewayFactory) -> None:
    gateway: Gateway = await start_gateway(QNP_METRICS_PORT="off")
    assert gateway.running.metrics_port is None and gateway.running.metrics_server is None
    async with aiohttp.ClientSession() as s, s.get(
            gateway.base_url.removesuffix("/v1") + "/metrics") as r:
        assert r.status == 404


async def test_a_second_instance_cannot_share_the_metrics_port(
    start_gateway: GatewayFactory, tmp_path: Path,
) -> None:
    """Workers share the public port on purpose; two instances sharing one metrics port
    would answer scrapes at random, so the second one refuses to start."""
    port = free_port()
    first: Gateway = await start_gateway(QNP_METRICS_PORT=str(port))
    assert first.running.metrics_port == port
    with pytest.raises(MetricsPortTaken):  # (a spool of its own, as any instance has)
        await start_gateway(QNP_METRICS_PORT=str(port), QNP_SPOOL_DIR=str(tmp_path / "2"))


@pytest.mark.parametrize(("raw", "port"), [("", 9464), ("0", 0), ("9100", 9100),
                                           ("off", None), ("OFF", None)])
def test_metrics_port_setting(raw: str, port: int | None) -> None:
    assert _metrics_port({"QNP_METRICS_PORT": raw}) == port


@pytest.mark.parametrize("raw", ["-1", "70000", "metrics"])
def test_metrics_port_setting_refuses_nonsense(raw: str) -> None:
    with pytest.raises(SettingsError, match="QNP_METRICS_PORT"):
        _metrics_port({"QNP_METRICS_PORT": raw})
