"""The web app (with the real OpenID provider mock) and the mail fixtures, for the
consent tests over HTTP."""

from tests.control_plane.mail.conftest import outbox_pool, smtp, smtp_down  # noqa: F401
from tests.control_plane.web.conftest import fake_idp, oidc_mock, web  # noqa: F401
