"""localstripe (PyPI), served on 127.0.0.1 only: its own ``start()`` binds every
interface and saves its state to /tmp/localstripe.pickle, which parallel runs on this
machine would share. Usage: ``python -m tests.control_plane.billing.localstripe_server
PORT``."""

from __future__ import annotations

import sys

from aiohttp import web
from localstripe import resources, server


def main() -> None:
    port = int(sys.argv[1])
    resources.Store.dump_to_disk = lambda self: None  # state lives in this process only
    print(f"localstripe on 127.0.0.1:{port}", flush=True)
    web.run_app(server.app, host="127.0.0.1", port=port, print=None)


if __name__ == "__main__":
    main()
