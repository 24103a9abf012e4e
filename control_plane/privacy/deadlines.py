"""The legal clock of a privacy request: when an answer is due, per jurisdiction.

Owns the one table of periods (``RULES``) with the law each comes from, and pure
functions from the time a request was received to its due and extended-due times.
No I/O; imports only the standard library; never ``proxy``.

Counting: every period runs from the moment of receipt, in UTC, and ends at the same
time of day on its last day. Statutes count whole days (the day of receipt excluded,
the period ending at midnight of its last day), so this is never later than the law.
Months follow the EU rule for time limits (Regulation 1182/71, art. 3(2)(c)): the same
date in the later month, or that month's last day when it has no such date
(31 January + 1 month = 28 or 29 February).
"""

from __future__ import annotations

import calendar
from dataclasses import dataclass
from datetime import datetime, timedelta

JURISDICTIONS = ("default", "gdpr", "ccpa", "lgpd", "kvkk", "pipa")
REQUEST_TYPES = ("access", "export", "correction", "deletion", "restriction",
                 "objection", "human_review", "information")


class UnknownJurisdiction(ValueError):
    """A jurisdiction code that is not in ``RULES``."""


@dataclass(frozen=True, slots=True)
class Rule:
    """One jurisdiction's period: ``months`` or ``days``, and the extension the law
    allows (with notice to the person, inside the first period), if any."""

    months: int = 0
    days: int = 0
    extension_months: int = 0
    extension_days: int = 0
    source: str = ""

    @property
    def extendable(self) -> bool:
        return bool(self.extension_months or self.extension_days)


RULES: dict[str, Rule] = {
    # The privacy policy, clause 9: "We will respond within 30 days (or within the
    # timeframe required by your local law)".
    "default": Rule(days=30, source="QNP privacy policy, clause 9"),
    # GDPR art. 12(3): "within one month of receipt of the request. That period may be
    # extended by two further months where necessary", the person told within the first
    # month. The two months are counted from the end of the first, the earlier of the
    # readings of "further" (31 Jan: 28 Apr, not 30 Apr).
    "gdpr": Rule(months=1, extension_months=2, source="GDPR art. 12(3)"),
    # CCPA/CPRA, Cal. Civ. Code 1798.130(a)(2)(A) and 11 CCR 7021(a)-(b): 45 calendar
    # days from receipt, extendable once by 45 more with notice inside the first 45.
    "ccpa": Rule(days=45, extension_days=45,
                 source="Cal. Civ. Code 1798.130(a)(2); 11 CCR 7021"),
    # LGPD art. 19, II: the complete access declaration "within fifteen (15) days from
    # the date of the data subject's request". No regulation sets another period for the
    # other rights yet (art. 18 par. 5 leaves it to the ANPD), so the same 15 days are
    # applied to every type: the stricter choice.
    "lgpd": Rule(days=15, source="LGPD (Lei 13.709/2018) art. 19, II"),
    # KVKK art. 13(2): the controller concludes the request "within thirty days at the
    # latest"; the law provides no extension.
    "kvkk": Rule(days=30, source="KVKK (Law 6698) art. 13(2)"),
    # Korea's PIPA art. 35(3) with Enforcement Decree art. 41(4): access within 10 days;
    # a postponement needs stated reasons and is a staff decision, not a right to extend.
    "pipa": Rule(days=10, source="PIPA art. 35(3); Enforcement Decree art. 41(4)"),
}


def rule(jurisdiction: str) -> Rule:
    try:
        return RULES[jurisdiction]
    except KeyError:
        raise UnknownJurisdiction(f"unknown jurisdiction {jurisdiction!r}; "
                                  f"one of {', '.join(JURISDICTIONS)}") from None


def add_months(at: datetime, months: int) -> datetime:
    """``at`` moved by whole calendar months, clamped to the target month's last day."""
    index = at.month - 1 + months
    year, month = at.year + index // 12, index % 12 + 1
    day = min(at.day, calendar.monthrange(year, month)[1])
    return at.replace(year=year, month=month, day=day)


def _after(at: datetime, months: int, days: int) -> datetime:
    return add_months(at, months) + timedelta(days=days)


def due(jurisdiction: str, received: datetime) -> datetime:
    """When the answer to a request received at ``received`` is due."""
    found = rule(jurisdiction)
    return _after(received, found.months, found.days)


def extended(jurisdiction: str, received: datetime) -> datetime | None:
    """The latest due time after the one extension the law allows; None where none."""
    found = rule(jurisdiction)
    if not found.extendable:
        return None
    return _after(due(jurisdiction, received), found.extension_months, found.extension_days)
