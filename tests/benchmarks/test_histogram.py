"""The benchmark histogram: percentiles a reader can trust (within 1 % of the exact ones
across the whole range), merging that loses nothing, and a JSON form that round-trips."""

from __future__ import annotations

import math
import random

import orjson
import pytest

from benchmarks.histogram import Histogram

QUANTILES = (0, 1, 10, 25, 50, 75, 90, 99, 99.9, 100)


def _exact(ordered: list[float], q: float) -> float:
    return ordered[max(1, math.ceil(q / 100 * len(ordered))) - 1]


def _log_uniform(rng: random.Random, n: int, low: float, high: float) -> list[float]:
    return [10 ** rng.uniform(math.log10(low), math.log10(high)) for _ in range(n)]


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_percentiles_are_within_one_percent_across_six_decades(seed: int) -> None:
    rng = random.Random(seed)
    values = _log_uniform(rng, 20_000, 1e-6, 1.0) + _log_uniform(rng, 200, 1.0, 300.0)
    histogram = Histogram()
    for value in values:
        histogram.record(value)
    ordered = sorted(values)
    for q in QUANTILES:
        exact = _exact(ordered, q)
        assert histogram.percentile(q) == pytest.approx(exact, rel=0.01), q
    assert histogram.count == len(values)
    assert histogram.min() == ordered[0] and histogram.max() == ordered[-1]
    assert histogram.mean() == pytest.approx(sum(values) / len(values))


def test_a_narrow_cluster_keeps_its_shape() -> None:
    """Latencies of a fast server sit within a few percent of each other; the buckets
    must still tell p50 from p99 there."""
    rng = random.Random(7)
    values = [rng.gauss(0.0004, 0.00002) for _ in range(10_000)]
    histogram = Histogram()
    for value in values:
        histogram.record(value)
    ordered = sorted(values)
    for q in (50, 90, 99):
        assert histogram.percentile(q) == pytest.approx(_exact(ordered, q), rel=0.01)
    assert histogram.percentile(99) > histogram.percentile(50)


def test_merge_equals_recording_everything_in_one() -> None:
    rng = random.Random(11)
    values = _log_uniform(rng, 9_000, 1e-6, 30.0)
    whole, parts = Histogram(), [Histogram(), Histogram(), Histogram()]
    for i, value in enumerate(values):
        whole.record(value)
        parts[i % 3].record(value)
    merged = Histogram()
    for part in parts:
        merged.merge(part)
    mine, theirs = merged.to_json(), whole.to_json()
    assert mine.pop("sum") == pytest.approx(theirs.pop("sum"))
    assert mine == theirs
    assert [merged.percentile(q) for q in QUANTILES] == [whole.percentile(q) for q in QUANTILES]


def test_record_n_is_n_records() -> None:
    once, many = Histogram(), Histogram()
    for _ in range(5):
        once.record(0.002)
    many.record_n(0.002, 5)
    many.record_n(0.5, 0)
    assert once.to_json() == many.to_json()


def test_json_round_trip() -> None:
    rng = random.Random(5)
    histogram = Histogram()
    for value in _log_uniform(rng, 1_000, 1e-5, 10.0):
        histogram.record(value)
    data = orjson.loads(orjson.dumps(histogram.to_json()))
    again = Histogram.from_json(data)
    assert again.to_json() == histogram.to_json()
    assert again.summary_ms() == histogram.summary_ms()
    assert len(data["buckets"]) < 1_000  # sparse: occupied buckets only


def test_json_of_another_layout_is_refused() -> None:
    data = Histogram().to_json() | {"sub_buckets": 64}
    with pytest.raises(ValueError, match="layout"):
        Histogram.from_json(data)


def test_empty_histogram() -> None:
    empty = Histogram()
    assert empty.summary_ms() == {"p50": None, "p90": None, "p99": None, "p999": None,
                                  "mean": None, "max": None, "count": 0}
    assert empty.cdf() == []
    assert Histogram.from_json(empty.to_json()).count == 0


def test_summary_is_in_milliseconds() -> None:
    histogram = Histogram()
    for ms in range(1, 1001):
        histogram.record(ms / 1000)
    summary = histogram.summary_ms()
    assert summary["count"] == 1000
    assert summary["p50"] == pytest.approx(500, rel=0.01)
    assert summary["p99"] == pytest.approx(990, rel=0.01)
    assert summary["p999"] == pytest.approx(999, rel=0.01)
    assert summary["max"] == 1000.0
    assert summary["mean"] == pytest.approx(500.5)


def test_cdf_rises_to_one_at_the_maximum() -> None:
    rng = random.Random(3)
    histogram = Histogram()
    for value in _log_uniform(rng, 5_000, 1e-6, 100.0):
        histogram.record(value)
    curve = histogram.cdf(points=50)
    assert 2 <= len(curve) <= 50
    assert curve[-1] == (histogram.max(), 1.0)
    assert all(a[0] <= b[0] and a[1] <= b[1] for a, b in zip(curve, curve[1:], strict=False))
    median = next(seconds for seconds, fraction in histogram.cdf(points=10_000)
                  if fraction >= 0.5)
    assert median == pytest.approx(histogram.percentile(50), rel=0.01)


def test_values_outside_the_range_are_kept_not_lost() -> None:
    histogram = Histogram()
    for value in (-1.0, 0.0, 1e-9, 1_000.0):
        histogram.record(value)
    assert histogram.count == 4
    assert histogram.max() == 1_000.0
    assert histogram.percentile(100) <= 1_000.0
    assert histogram.count_at_least(100.0) == 1
