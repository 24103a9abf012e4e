"""Privacy rights (issue 14): legal deadlines, the recorded privacy requests and the
account's data export. Never imports ``proxy``."""
