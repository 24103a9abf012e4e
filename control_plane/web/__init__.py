"""The public web service: sign-in, sessions, the account API (and later the dashboard).
Faces the internet; never imports ``proxy``."""
