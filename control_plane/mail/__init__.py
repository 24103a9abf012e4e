"""E-mail: the outbox table's writes (``outbox``), the SMTP target (``target``) and the
sender task that delivers each row once (``sender``). Never imports ``proxy`` or
``control_plane.web``: callers hand it a connection and message text.
"""
