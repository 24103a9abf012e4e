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
    """Micro-dollars per million tokens for each kind of token.

    ``cache_read``, ``cache_write`` and ``reasoning`` are for providers that bill those
    tokens differently; None means "the same as prompt" (cache) or "as completion"
    (reasoning), so a catalog entry that does not name them bills what it always did.
    """

    prompt: int
    completion: int
    cache_read: int | None = None
    cache_write: int | None = None
    reasoning: int | None = None

    def cost_micros(self, prompt_tokens: int, completion_tokens: int) -> int:
        total = prompt_tokens * self.prompt + completion_tokens * self.completion
        return -(-total // TOKENS_PER_PRICE_UNIT)  # ceiling division

    def cost_of(
        self,
        prompt_tokens: int,
        completion_tokens: int,
        *,
        cached_tokens: int = 0,
        cache_write_tokens: int = 0,
        reasoning_tokens: int = 0,
    ) -> int:
        """The cost of a request, every kind of token at its own price, rounded up once.

        Counts follow OpenAI's convention: ``prompt_tokens`` includes the cache-read and
        cache-write tokens, ``completion_tokens`` includes the reasoning tokens.
        """
        cached = min(cached_tokens, prompt_tokens)
        written = min(cache_write_tokens, prompt_tokens - cached)
        reasoning = min(reasoning_tokens, completion_tokens)
        total = (
            (prompt_tokens - cached - written) * self.prompt
            + cached * (self.prompt if self.cache_read is None else self.cache_read)
            + written * (self.prompt if self.cache_write is None else self.cache_write)
            + (completion_tokens - reasoning) * self.completion
            + reasoning * (self.completion if self.reasoning is None else self.reasoning)
        )
        return -(-total // TOKENS_PER_PRICE_UNIT)  # ceiling division
