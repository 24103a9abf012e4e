"""``python -m proxy``: parse the command line, load settings, run the workers."""

from __future__ import annotations

import argparse
import sys

from proxy import server
from proxy.settings import CommandLine, SettingsError, environment, load
from shared import monitoring


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m proxy", description="QNP gateway proxy")
    parser.add_argument("--catalog", help="provider catalog TOML (default: $QNP_CATALOG)")
    parser.add_argument("--host", help="listen address (default: $QNP_PROXY_HOST or 127.0.0.1)")
    parser.add_argument("--port", type=int, help="listen port (default: $QNP_PROXY_PORT or 8080)")
    parser.add_argument("--workers", type=int, help="worker processes sharing the port")
    parser.add_argument("--tls-cert", help="serve HTTPS with this PEM certificate chain "
                        "(default: $QNP_TLS_CERT)")
    parser.add_argument("--tls-key", help="the certificate's PEM private key "
                        "(default: $QNP_TLS_KEY)")
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    cli = CommandLine(args.catalog, args.host, args.port, args.workers, args.tls_cert,
                      args.tls_key)
    try:
        settings = load(environment(), cli)
    except SettingsError as e:
        print(f"proxy: configuration error: {e}", file=sys.stderr)
        return 2
    # Before the workers start: the supervisor and each worker (the same entry point,
    # --workers 1) have an SDK of their own when SENTRY_DSN is set.
    monitoring.init(settings.sentry_dsn, service="proxy",
                    environment=settings.sentry_environment)
    return server.supervise(settings, argv)


if __name__ == "__main__":
    sys.exit(main())
