"""The legal clock (issue 14): due dates per jurisdiction, at month ends, across leap
years and year ends, and the extensions each law allows (and only those)."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from control_plane.privacy import deadlines
from control_plane.privacy.deadlines import UnknownJurisdiction, due, extended


def at(y: int, m: int, d: int, hh: int = 12) -> datetime:
    return datetime(y, m, d, hh, 30, tzinfo=UTC)


@pytest.mark.parametrize(("received", "expected"), [
    (at(2026, 3, 15), at(2026, 4, 15)),
    (at(2027, 1, 31), at(2027, 2, 28)),   # no 31 February: the month's last day
    (at(2028, 1, 31), at(2028, 2, 29)),   # leap year
    (at(2028, 1, 29), at(2028, 2, 29)),
    (at(2027, 1, 29), at(2027, 2, 28)),
    (at(2026, 3, 31), at(2026, 4, 30)),
    (at(2026, 12, 15), at(2027, 1, 15)),  # across the year end
    (at(2028, 2, 29), at(2028, 3, 29)),
])
def test_gdpr_answer_is_due_one_calendar_month_after_receipt(
    received: datetime, expected: datetime
) -> None:
    assert due("gdpr", received) == expected


def test_gdpr_extension_is_two_further_months_after_the_first() -> None:
    assert extended("gdpr", at(2026, 3, 15)) == at(2026, 6, 15)
    # 31 Jan -> 28 Feb -> 28 Apr: never later than three months from receipt.
    assert extended("gdpr", at(2027, 1, 31)) == at(2027, 4, 28)
    assert extended("gdpr", at(2026, 11, 30)) == at(2027, 2, 28)


@pytest.mark.parametrize(("jurisdiction", "received", "expected", "extended_to"), [
    ("ccpa", at(2026, 1, 1), at(2026, 2, 15), at(2026, 4, 1)),
    ("ccpa", at(2028, 2, 1), at(2028, 3, 17), at(2028, 5, 1)),     # 29 Feb counted
    ("ccpa", at(2027, 2, 1), at(2027, 3, 18), at(2027, 5, 2)),
    ("lgpd", at(2026, 12, 20), at(2027, 1, 4), None),
    ("lgpd", at(2028, 2, 20), at(2028, 3, 6), None),
    ("kvkk", at(2028, 2, 1), at(2028, 3, 2), None),
    ("kvkk", at(2027, 2, 1), at(2027, 3, 3), None),
    ("pipa", at(2026, 12, 25), at(2027, 1, 4), None),
    ("default", at(2028, 2, 15), at(2028, 3, 16), None),
    ("default", at(2027, 2, 15), at(2027, 3, 17), None),
])
def test_day_counted_jurisdictions(jurisdiction: str, received: datetime,
                                   expected: datetime, extended_to: datetime | None) -> None:
    assert due(jurisdiction, received) == expected
    assert extended(jurisdiction, received) == extended_to


def test_every_jurisdiction_has_a_rule_with_its_source_and_none_is_later_than_gdpr_plus_two(
) -> None:
    received = at(2026, 5, 31)
    for code in deadlines.JURISDICTIONS:
        found = deadlines.rule(code)
        assert found.source, code
        assert received < due(code, received) <= deadlines.add_months(received, 3)
    assert [c for c in deadlines.JURISDICTIONS if deadlines.rule(c).extendable] == [
        "gdpr", "ccpa"]


def test_the_time_of_day_and_zone_of_receipt_are_kept() -> None:
    late = datetime(2026, 1, 31, 23, 59, 59, tzinfo=UTC)
    assert due("gdpr", late) == datetime(2026, 2, 28, 23, 59, 59, tzinfo=UTC)


def test_an_unknown_jurisdiction_is_refused_by_name() -> None:
    with pytest.raises(UnknownJurisdiction, match="'eu'"):
        due("eu", at(2026, 1, 1))
