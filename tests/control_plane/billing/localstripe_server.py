"""localstripe (PyPI), served on 127.0.0.1 only: its own ``start()`` binds every
interface and saves its state to /tmp/localstripe.pickle, which parallel runs on this
machine would share. PaymentIntents are listed newest first, as Stripe lists them
(localstripe lists them in creation order; its refunds it already lists newest first),
which the reconciliation job's "stop at the first older one" relies on.
Usage: ``python -m tests.control_plane.billing.localstripe_server PORT``."""

from __future__ import annotations

import sys
from typing import Any

from aiohttp import web
from localstripe import resources, server


def _newest_first(cls: Any) -> None:
    listed = cls._api_list_all.__func__

    def list_all(klass: Any, url: str, **kwargs: Any) -> Any:
        found = listed(klass, url, **kwargs)
        found._list.sort(key=lambda obj: obj.created, reverse=True)
        return found

    cls._api_list_all = classmethod(list_all)


def main() -> None:
    port = int(sys.argv[1])
    resources.Store.dump_to_disk = lambda self: None  # state lives in this process only
    _newest_first(resources.PaymentIntent)
    print(f"localstripe on 127.0.0.1:{port}", flush=True)
    web.run_app(server.app, host="127.0.0.1", port=port, print=None)


if __name__ == "__main__":
    main()
