"""The web service's fixtures (a real OIDC provider, the web app) for the export's
HTTP tests, taken from the web tests' conftest rather than copied."""

from tests.control_plane.web.conftest import fake_idp, oidc_mock, web  # noqa: F401
