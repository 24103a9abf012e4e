"""The data plane: authenticate, admit, route, stream, record.

Stateless; talks to Redis and upstream providers only. Must never import
``control_plane``, asyncpg or stripe.
"""
