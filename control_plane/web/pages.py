"""The few server-rendered pages of the web service (Jinja2, autoescape on): sign-in,
first-run acceptance, refusals and errors. Compiled once at start-up. The dashboard
pages come with issue 12. Never imports ``proxy``."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jinja2
from aiohttp import web

from control_plane.web.state import CONSENT

_PARTIALS = Path(__file__).parent / "templates"

# The consent partials (banner, footer links, theme, scripts by category) are the
# dashboard's own files in templates/, shared through the loader below, not copied.
_LAYOUT = """<!doctype html>
<html lang="en"{% include "_consent_html_attrs.html" %}><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="color-scheme" content="light dark">
<title>{% block title %}QNP{% endblock %}</title>
<link rel="stylesheet" href="/static/app.css">
<script src="/static/consent.js" defer></script></head>
<body>{% include "_consent_banner.html" %}<main>{% block main %}{% endblock %}</main>
<footer class="foot">{% include "_theme_toggle.html" %}{% include "_consent_footer.html" %}
</footer>
{% include "_analytics.html" ignore missing %}</body></html>"""

_TEMPLATES: Mapping[str, str] = {
    "layout.html": _LAYOUT,
    "signin.html": """{% extends "layout.html" %}{% block title %}Sign in · QNP{% endblock %}
{% block main %}<h1>Sign in to QNP</h1>
{% if not providers %}<p>No sign-in provider is configured.</p>{% endif %}
<ul>{% for p in providers %}
<li><a href="/auth/{{ p.name }}/start?next={{ next | urlencode }}">{{ p.label }}</a></li>
{% endfor %}</ul>{% endblock %}""",
    "signup.html": """{% extends "layout.html" %}{% block title %}Welcome · QNP{% endblock %}
{% block main %}<h1>Welcome{% if name %}, {{ name }}{% endif %}</h1>
<form method="post" action="/signup">
<input type="hidden" name="csrf_token" value="{{ csrf_token }}">
<input type="hidden" name="next" value="{{ next }}">
<p><label><input type="checkbox" name="age_18" required> I am 18 or older.</label></p>
<p><label><input type="checkbox" name="terms" required> I accept the terms of service.
</label></p>
<p><label><input type="checkbox" name="privacy_policy" required> I accept the
<a href="/privacy" target="_blank" rel="noopener">privacy policy</a> (version
{{ policy_version }}).</label></p>
<p><button type="submit">Create my account</button></p>
</form>{% endblock %}""",
    "message.html": """{% extends "layout.html" %}{% block title %}{{ title }} · QNP{% endblock %}
{% block main %}<h1>{{ title }}</h1><p>{{ message }}</p>
{% if failed %}<p><a href="/signin">Back to sign-in</a></p>{% endif %}{% endblock %}""",
}


class Pages:
    def __init__(self, sentry_browser_dsn: str = "") -> None:
        self._env = jinja2.Environment(
            loader=jinja2.ChoiceLoader([jinja2.DictLoader(dict(_TEMPLATES)),
                                        jinja2.FileSystemLoader(_PARTIALS)]),
            autoescape=True, undefined=jinja2.StrictUndefined,
        )
        # The partials shared with the dashboard (``_analytics.html``) read it there too.
        self._env.globals["sentry_browser_dsn"] = sentry_browser_dsn
        self._compiled = {name: self._env.get_template(name) for name in _TEMPLATES}

    def render(self, template: str, status: int = 200, request: web.Request | None = None,
               **values: Any) -> web.Response:
        """A page; with ``request``, the cookie banner and the consent context too."""
        if request is not None and CONSENT in request:
            values.setdefault("consent", request[CONSENT])
        found = self._compiled.get(template) or self._env.get_template(template)
        return web.Response(text=found.render(**values), status=status,
                            content_type="text/html", charset="utf-8")

    def message(self, title: str, message: str, status: int,
                request: web.Request | None = None) -> web.Response:
        return self.render("message.html", status, request, title=title, message=message,
                           failed=status >= 400)


def redirect(location: str) -> web.Response:
    """A 302 returned (not raised), so middlewares can still set cookies on it."""
    return web.Response(status=302, headers={"Location": location})


PAGES = web.AppKey("pages", Pages)
