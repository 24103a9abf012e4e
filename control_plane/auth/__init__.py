"""Sign-in and sessions for the public web service: OpenID Connect (``oidc``), the
signed session cookie and its server-side state (``sessions``), API-key callers of the
account API (``apikey``). Never imports ``proxy`` or ``control_plane.web``."""
