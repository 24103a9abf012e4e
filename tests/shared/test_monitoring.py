"""The Sentry settings' edges: a DSN is validated at start-up with an error naming the
variable, and the CSP opens ``connect-src`` to the browser DSN's origin only when one is
set. (What the scrubber keeps and drops is proven against real SDKs: test_sentry.py in
tests/control_plane/web, tests/end_to_end and tests/browser.)"""

from __future__ import annotations

import pytest

from control_plane.settings import MonitoringSettings, SettingsError
from control_plane.web import security
from shared.monitoring import MonitoringError, dsn_origin


def test_a_dsn_gives_the_origin_its_events_go_to() -> None:
    assert dsn_origin("https://abc@o1.ingest.example.test/42") == \
        "https://o1.ingest.example.test"
    assert dsn_origin("http://abc@127.0.0.1:9000/1") == "http://127.0.0.1:9000"
    with pytest.raises(MonitoringError):
        dsn_origin("https://o1.ingest.example.test/42")  # no public key


def test_a_bad_dsn_is_a_start_up_error_naming_the_variable() -> None:
    with pytest.raises(SettingsError, match="QNP_SENTRY_BROWSER_DSN"):
        MonitoringSettings.from_env({"QNP_SENTRY_BROWSER_DSN": "not a dsn"})
    with pytest.raises(SettingsError, match="SENTRY_DSN"):
        MonitoringSettings.from_env({"SENTRY_DSN": "ftp://k@host/1"})
    assert MonitoringSettings.from_env({"SENTRY_DSN": ""}).sentry_dsn is None


def test_the_csp_allows_the_sentry_origin_only_when_configured() -> None:
    off = security.headers(https=True)["Content-Security-Policy"]
    on = security.headers(https=True, connect="https://o1.ingest.example.test")[
        "Content-Security-Policy"]
    assert "connect-src 'self';" in off
    assert "connect-src 'self' https://o1.ingest.example.test;" in on
    assert off.replace("connect-src 'self';", "") == \
        on.replace("connect-src 'self' https://o1.ingest.example.test;", "")
