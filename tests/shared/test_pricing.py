"""Costs are exact integer micro-dollars, rounded up, never a silent zero."""

import pytest

from shared.pricing import Price, PriceError, dollars_to_micros


def test_dollar_prices_parse_exactly() -> None:
    assert dollars_to_micros(0.15) == 150_000
    assert dollars_to_micros("2.50") == 2_500_000
    assert dollars_to_micros(15) == 15_000_000
    assert dollars_to_micros(0) == 0


@pytest.mark.parametrize("bad", [-1, "abc", float("nan"), float("inf"), 0.0000001, True, None])
def test_bad_prices_are_refused(bad: object) -> None:
    with pytest.raises(PriceError):
        dollars_to_micros(bad)


def test_cost_rounds_up_to_the_next_micro_dollar() -> None:
    price = Price(prompt=150_000, completion=600_000)  # $0.15 / $0.60 per million
    assert price.cost_micros(0, 0) == 0
    assert price.cost_micros(1, 0) == 1  # 0.15 micro-dollars still costs 1
    assert price.cost_micros(7, 2) == 3  # 1.05 + 1.2 = 2.25 → 3
    assert price.cost_micros(1_000_000, 1_000_000) == 750_000
