"""Routing: weighted choice, ejection for a growing interval (never more than half of a
model's deployments), and Envoy's retry budget. A fake clock: no sleeps."""

from __future__ import annotations

import random
from pathlib import Path

from proxy.catalog import Model, load
from proxy.routing import Router, RoutingPolicy

CATALOG = """
[providers.a]
base_url = "http://127.0.0.1:9/v1"
[providers.b]
kind = "anthropic"
base_url = "http://127.0.0.1:9/v1"
[providers.c]
kind = "gemini"
base_url = "http://127.0.0.1:9/v1beta"

[models."m"]
prompt_price = 1
completion_price = 2
cache_read_price = 0.1
deployments = [
  { provider = "a", upstream_model = "m-a", weight = 3 },
  { provider = "b", upstream_model = "m-b", weight = 1, prompt_price = 1.5 },
  { provider = "c", upstream_model = "m-c" },
  { provider = "a", upstream_model = "m-a2" },
]
"""


class Clock:
    now = 1000.0

    def __call__(self) -> float:
        return self.now


def _model(tmp_path: Path) -> Model:
    path = tmp_path / "catalog.toml"
    path.write_text(CATALOG)
    return load(path, {}).models["m"]


def test_deployments_inherit_and_override_prices(tmp_path: Path) -> None:
    m = _model(tmp_path)
    assert [d.upstream_model for d in m.deployments] == ["m-a", "m-b", "m-c", "m-a2"]
    assert m.deployments[1].price.prompt == 1_500_000
    assert m.deployments[1].price.cache_read == 100_000
    assert m.deployments[1].headers["anthropic-version"] == "2023-06-01"
    assert m.deployments[2].wire.kind == "gemini" and m.upstream_model == "m-a"


def test_weighted_choice_follows_the_weights(tmp_path: Path) -> None:
    m = _model(tmp_path)
    router = Router(RoutingPolicy(), rng=random.Random(7))
    firsts = [router.plan([m])[0][1].upstream_model for _ in range(6000)]
    share = firsts.count("m-a") / len(firsts)
    assert 0.45 < share < 0.55  # weight 3 of 6
    assert len(router.plan([m])) == 4  # every deployment, each once


def test_ejection_grows_and_never_takes_more_than_half(tmp_path: Path) -> None:
    m = _model(tmp_path)
    clock = Clock()
    router = Router(RoutingPolicy(eject_after=2, base_ejection=10), clock=clock)
    a, b, c, _ = m.deployments
    for _ in range(2):
        router.failed(m, a)
    assert router.ejected(a)
    assert a not in [d for _, d in router.plan([m])]
    for dep in (b, c):
        for _ in range(2):
            router.failed(m, dep)
    assert router.ejected(b) and not router.ejected(c), "at most half of 4 ejected"
    clock.now += 10.5
    assert not router.ejected(a), "back after its interval"
    for _ in range(2):
        router.failed(m, a)
    clock.now += 10.5
    assert router.ejected(a), "a second ejection lasts longer (20 s)"
    clock.now += 10
    assert not router.ejected(a)
    router.succeeded(a)
    for _ in range(2):
        router.failed(m, a)
    clock.now += 10.5
    assert not router.ejected(a), "success resets the interval to the base"


def test_a_single_deployment_is_never_ejected(tmp_path: Path) -> None:
    m = _model(tmp_path)
    single = Model(m.name, m.provider, m.upstream_model, m.price, m.chat_url, m.deployments[:1])
    router = Router(RoutingPolicy(eject_after=1))
    for _ in range(10):
        router.failed(single, single.deployments[0])
    assert len(router.plan([single])) == 1


def test_retry_budget_is_a_fifth_of_live_requests_with_a_floor() -> None:
    router = Router(RoutingPolicy(retry_budget=0.2, min_retry_concurrency=3))
    with router.request():
        granted = sum(router.try_retry() for _ in range(10))
    assert granted == 3  # the floor
    for _ in range(3):
        router.retry_done()
    contexts = [router.request() for _ in range(100)]
    for ctx in contexts:
        ctx.__enter__()
    assert sum(router.try_retry() for _ in range(100)) == 20
    for ctx in contexts:
        ctx.__exit__(None, None, None)
