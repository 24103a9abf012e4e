"""How long a request counts as in flight: one constant both services agree on.

The proxy's admission script keeps a request in the concurrency sets for at most this
long (a proxy that died mid-request cannot hold a slot for ever), and the control
plane's reservation sweep refunds credit reservations older than this by default (a
request past it is no longer in flight, so no proxy will settle it). Pure constants,
no imports.
"""

from __future__ import annotations

# Far above a normal request's life; what happens to a rarer, longer one is said in
# control_plane/sweeper.py (it is charged in full at settlement, nothing is lost).
IN_FLIGHT_LIFETIME_MS = 15 * 60_000
