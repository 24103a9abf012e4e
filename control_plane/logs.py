"""Process-wide logging set-up: one line per record, ``key=value`` style.

Log lines carry ids, counts and reasons; never event content, key secrets or hashes.
Never imports ``proxy``.
"""

from __future__ import annotations

import logging
import sys

FORMAT = "%(asctime)s level=%(levelname)s logger=%(name)s %(message)s"


def configure(level: int) -> None:
    logging.basicConfig(level=level, format=FORMAT, stream=sys.stderr, force=True)
