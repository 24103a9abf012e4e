"""QNP control plane: ingest, accounts, API keys and the admin API.

Owns everything behind the proxy that touches Postgres. Imports ``shared`` and its own
dependencies; never imports ``proxy``.
"""
