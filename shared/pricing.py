"""Pricing arithmetic in integer micro-dollars, exactly.

Prices are given per million tokens in US dollars (as providers publish them) and held
as integer micro-dollars per million tokens, so $0.15 / 1M tokens is 150_000. The cost
of a request is rounded up to the next whole micro-dollar, never down to zero.
"""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal, InvalidOperation

MICROS_PER_DOLLAR = 1_000_000
TOKENS_PER_PRICE_UNIT = 1_000_000


class PriceError(ValueError):
    """A price that is not a finite, non-negative dollar amount with ≤ 6 decimals."""


def dollars_to_micros(value: object) -> int:
    """Parse a dollar amount (int, float or str from a config file) to micro-dollars."""
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise PriceError(f"price must be a number, got {type(value).__name__}")
    try:
        d = Decimal(str(value))
    except InvalidOperation as e:
        raise PriceError(f"price {value!r} is not a number") from e
    if not d.is_finite() or d < 0:
        raise PriceError(f"price {value!r} must be finite and non-negative")
    micros = d * MICROS_PER_DOLLAR
    if micros != micros.to_integral_value():
        raise PriceError(f"price {value!r} has more than 6 decimal places")
    return int(micros)


@dataclass(frozen=True, slots=True)
class Price:
    """Micro-dollars per million tokens for each kind of token."""

    prompt: int
    completion: int

    def cost_micros(self, prompt_tokens: int, completion_tokens: int) -> int:
        total = prompt_tokens * self.prompt + completion_tokens * self.completion
        return -(-total // TOKENS_PER_PRICE_UNIT)  # ceiling division
