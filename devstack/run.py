"""``make run``: the whole gateway on one machine, in one terminal.

Starts (or uses, when DATABASE_URL / REDIS_URL are set) PostgreSQL and Redis, applies
migrations, creates a demo account with one API key and $10 of credit, and runs the demo upstream (our
OpenAI-format mock), a local aiosmtpd that prints every e-mail the control plane sends
in this terminal, localstripe (a Stripe fake: the control plane's Stripe API, the
credits page's Stripe.js and the signed webhooks to our /webhooks/stripe), the control
plane and the proxy as child processes. Prints the
lines to paste into a shell, then runs until Ctrl-C or SIGTERM and stops everything in
order: proxy first (so its events are flushed), then the control plane (so they are
ingested), then the upstream, then the servers it started. The catalog and the proxy's
spool live in a temporary folder of this run, removed on exit.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping
from pathlib import Path

from devstack.servers import dev_servers

CATALOG = """\
# The demo catalog `make run` writes: models in all three wire formats, each served by
# a built-in demo upstream (OpenAI, Anthropic and Gemini format).
[providers.demo]
kind = "openai"
base_url = "http://127.0.0.1:{upstream_port}/v1"
api_key_env = "QNP_DEMO_UPSTREAM_KEY"

[models."demo-mini"]
provider = "demo"
upstream_model = "demo-mini-2024"
prompt_price = 0.15        # USD per million tokens
completion_price = 0.60

[models."demo-large"]
provider = "demo"
upstream_model = "demo-large-2024"
prompt_price = 2.50
completion_price = 10.00

[providers.demo-anthropic]
kind = "anthropic"
base_url = "http://127.0.0.1:{anthropic_port}/v1"
api_key_env = "QNP_DEMO_UPSTREAM_KEY"

[providers.demo-gemini]
kind = "gemini"
base_url = "http://127.0.0.1:{gemini_port}/v1beta"
api_key_env = "QNP_DEMO_UPSTREAM_KEY"

[models."demo-claude"]
provider = "demo-anthropic"
upstream_model = "claude-demo-haiku"
prompt_price = 0.80
completion_price = 4.00
cache_read_price = 0.08
cache_write_price = 1.00

[models."demo-gemini"]
provider = "demo-gemini"
upstream_model = "gemini-demo-flash"
prompt_price = 0.10
completion_price = 0.40
cache_read_price = 0.025
"""


def _port(preferred: int) -> int:
    """``preferred`` if it is free on 127.0.0.1, else any free port."""
    for candidate in (preferred, 0):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", candidate))
            except OSError:
                continue
            return int(s.getsockname()[1])
    raise RuntimeError("no free port")


def _wait_http(url: str, proc: subprocess.Popen[bytes], what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with status {proc.returncode} while starting")
        try:
            with urllib.request.urlopen(url, timeout=1) as resp:
                if resp.status == 200:
                    return
        except urllib.error.HTTPError:
            return  # it answers (e.g. 401 without a key): it is up
        except (urllib.error.URLError, OSError):
            time.sleep(0.1)
    raise RuntimeError(f"{what} did not answer {url} within {timeout:.0f}s")


def _wait_tcp(port: int, proc: subprocess.Popen[bytes], what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with status {proc.returncode} while starting")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"{what} did not listen on port {port} within {timeout:.0f}s")


def _cli_json(args: list[str], env: Mapping[str, str]) -> dict[str, object]:
    out = subprocess.run(
        [sys.executable, "-m", "control_plane", *args, "--json"],
        env=dict(env),
        check=True,
        capture_output=True,
        text=True,
    )
    doc = json.loads(out.stdout)
    assert isinstance(doc, dict)
    return doc


def _stripe_env(base: str) -> dict[str, str]:
    """The control plane's Stripe settings, pointed at localstripe (any sk_/pk_ key
    works there); a fee like a real deployment's, unless the shell sets one."""
    return {
        "QNP_STRIPE_SECRET_KEY": "sk_test_make_run",
        "QNP_STRIPE_PUBLISHABLE_KEY": "pk_test_make_run",
        "QNP_STRIPE_WEBHOOK_SECRET": "whsec_" + secrets.token_hex(16),
        "QNP_STRIPE_API_BASE": base,
        "QNP_STRIPE_JS_URL": f"{base}/js.stripe.com/v3/",
        "QNP_TOPUP_FEE_BPS": os.environ.get("QNP_TOPUP_FEE_BPS") or "500",
        "QNP_TOPUP_FEE_FIXED_CENTS": os.environ.get("QNP_TOPUP_FEE_FIXED_CENTS") or "30",
    }


def _register_webhook(stripe_base: str, url: str, secret: str) -> None:
    """localstripe signs its events with ``secret`` and posts them to ``url``."""
    form = urllib.parse.urlencode({"url": url, "secret": secret}).encode()
    with urllib.request.urlopen(f"{stripe_base}/_config/webhooks/qnp", data=form,
                                timeout=10) as resp:
        if resp.status != 200:
            raise RuntimeError(f"localstripe refused the webhook ({resp.status})")


class _Children:
    """Child processes, stopped in reverse start order, each by its own pid."""

    def __init__(self) -> None:
        self.procs: list[tuple[str, subprocess.Popen[bytes]]] = []

    def start(self, what: str, args: list[str], env: Mapping[str, str]) -> subprocess.Popen[bytes]:
        # A session of their own: Ctrl-C reaches only us, and we stop them in order.
        proc = subprocess.Popen([sys.executable, *args], env=dict(env), start_new_session=True)
        self.procs.append((what, proc))
        return proc

    def dead(self) -> str | None:
        return next((what for what, p in self.procs if p.poll() is not None), None)

    def stop(self) -> None:
        for what, proc in reversed(self.procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=35)
                except subprocess.TimeoutExpired:
                    print(f"{what} did not stop in time; killing it", file=sys.stderr)
                    proc.kill()
                    proc.wait()


def main() -> int:
    stop_requested = False

    def request_stop(_sig: int, _frame: object) -> None:
        nonlocal stop_requested
        stop_requested = True

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    children = _Children()
    with (
        dev_servers() as (database_url, redis_url),
        tempfile.TemporaryDirectory(prefix="qnp-run-") as tmp,
    ):
        upstream_port, proxy_port, admin_port = _port(8090), _port(8080), _port(8081)
        anthropic_port, gemini_port = _port(8091), _port(8092)
        web_port, oidc_port = _port(8082), _port(9400)
        smtp_port, stripe_port = _port(1025), _port(8420)
        stripe_base = f"http://127.0.0.1:{stripe_port}"
        catalog = Path(tmp) / "catalog.toml"
        catalog.write_text(CATALOG.format(upstream_port=upstream_port,
                                          anthropic_port=anthropic_port, gemini_port=gemini_port))
        env = {
            **os.environ,
            "DATABASE_URL": database_url,
            "REDIS_URL": redis_url,
            "QNP_CATALOG": str(catalog),
            "QNP_DEMO_UPSTREAM_KEY": "sk-demo-" + secrets.token_hex(16),
            "QNP_ADMIN_TOKEN": os.environ.get("QNP_ADMIN_TOKEN") or secrets.token_urlsafe(24),
            "QNP_ADMIN_PORT": str(admin_port),
            "QNP_WEB_PORT": str(web_port),
            # "Dev sign-in": a local oidc-provider-mock, so no Google or Apple account is needed.
            "QNP_OIDC_PROVIDERS": json.dumps([{
                "name": "dev", "label": "Dev sign-in", "issuer": f"http://127.0.0.1:{oidc_port}",
                "client_id": "qnp-dev", "client_secret": secrets.token_urlsafe(16)}]),
            "QNP_PROXY_PORT": str(proxy_port),
            "SMTP_URL": f"smtp://127.0.0.1:{smtp_port}",  # the outbox's sender (mail/)
            **_stripe_env(stripe_base),
            "QNP_API_URL": f"http://127.0.0.1:{proxy_port}",  # the dashboard's quick start
            "QNP_METRICS_PORT": str(_port(9464)),  # its own listener; another run may hold 9464
            # A throwaway stack's spool is its own: the default folder (per prefix and
            # node) would replay an earlier run's events into this run's new database.
            "QNP_SPOOL_DIR": str(Path(tmp) / "spool"),
        }
        try:
            subprocess.run([sys.executable, "-m", "control_plane", "migrate"], env=env, check=True)
            account = _cli_json(["create-account", "demo"], env)
            key = _cli_json(["issue-key", str(account["id"]), "--name", "demo"], env)
            _cli_json(["credit", str(account["id"]), "10"], env)  # $10 of demo credit
            up = children.start(
                "demo upstream",
                [
                    "-m",
                    "devstack.upstream_openai",
                    "--port",
                    str(upstream_port),
                    "--api-key",
                    env["QNP_DEMO_UPSTREAM_KEY"],
                ],
                env,
            )
            _wait_http(f"http://127.0.0.1:{upstream_port}/v1/models", up, "demo upstream")
            for fmt, port, probe in (("anthropic", anthropic_port, "/v1/models"),
                                     ("gemini", gemini_port, "/v1beta/models/x:generateContent")):
                demo = children.start(f"demo {fmt} upstream", [
                    "-m", f"devstack.upstream_{fmt}", "--port", str(port),
                    "--api-key", env["QNP_DEMO_UPSTREAM_KEY"]], env)
                _wait_http(f"http://127.0.0.1:{port}{probe}", demo, f"demo {fmt} upstream")
            dev_user = json.dumps({"sub": "dev", "email": "dev@example.test",
                                   "email_verified": True, "name": "Dev User"})
            idp = children.start("dev OpenID provider", ["-m", "oidc_provider_mock", "--port",
                                 str(oidc_port), "--user-claims", dev_user], env)
            _wait_http(f"http://127.0.0.1:{oidc_port}/.well-known/openid-configuration", idp,
                       "dev OpenID provider")
            # aiosmtpd's Debugging handler prints each message it accepts to stdout.
            smtp = children.start("local SMTP server", [
                "-m", "aiosmtpd", "-n", "-l", f"127.0.0.1:{smtp_port}",
                "-c", "aiosmtpd.handlers.Debugging", "stdout"],
                {**env, "PYTHONUNBUFFERED": "1"})
            _wait_tcp(smtp_port, smtp, "local SMTP server")
            fake_stripe = children.start("localstripe", [
                "-m", "devstack.localstripe_server", str(stripe_port)], env)
            _wait_http(f"{stripe_base}/js.stripe.com/v3/", fake_stripe, "localstripe")
            _register_webhook(stripe_base, f"http://127.0.0.1:{web_port}/webhooks/stripe",
                              env["QNP_STRIPE_WEBHOOK_SECRET"])
            cp = children.start("control plane", ["-m", "control_plane", "serve"], env)
            _wait_http(f"http://127.0.0.1:{admin_port}/healthz", cp, "control plane")
            px = children.start("proxy", ["-m", "proxy"], env)
            _wait_http(f"http://127.0.0.1:{proxy_port}/readyz", px, "proxy")
            _banner(env, proxy_port, admin_port, str(key["key"]), str(account["id"]))
            while not stop_requested:
                dead = children.dead()
                if dead is not None:
                    print(f"{dead} exited unexpectedly; stopping", file=sys.stderr)
                    return 1
                time.sleep(0.2)
            print("\nstopping…", file=sys.stderr)
            return 0
        except (subprocess.CalledProcessError, RuntimeError) as e:
            print(f"make run: {e}", file=sys.stderr)
            return 1
        finally:
            children.stop()


def _banner(
    env: Mapping[str, str], proxy_port: int, admin_port: int, key: str, account_id: str
) -> None:
    base = f"http://127.0.0.1:{proxy_port}/v1"
    print(
        f"""
QNP gateway is running. Paste these into another shell:

export OPENAI_BASE_URL={base}
export OPENAI_API_KEY={key}
export ANTHROPIC_BASE_URL={base.removesuffix("/v1")}
export ANTHROPIC_API_KEY={key}
export DATABASE_URL={env["DATABASE_URL"]}
export REDIS_URL={env["REDIS_URL"]}
export QNP_ADMIN_TOKEN={env["QNP_ADMIN_TOKEN"]}
export QNP_DASHBOARD_URL=http://127.0.0.1:{env["QNP_WEB_PORT"]}

Try it:
curl -s $OPENAI_BASE_URL/chat/completions -H "Authorization: Bearer $OPENAI_API_KEY" -H 'Content-Type: application/json' -d '{{"model": "demo-mini", "messages": [{{"role": "user", "content": "Hello!"}}]}}'

The dashboard: open http://127.0.0.1:{env["QNP_WEB_PORT"]} and choose "Dev sign-in" (a local
OpenID provider: no Google or Apple account needed; a new sign-in is a new account).

Usage and balance of the demo account ({account_id}, credited $10):
curl -s http://127.0.0.1:{admin_port}/admin/accounts/{account_id}/usage -H "Authorization: Bearer $QNP_ADMIN_TOKEN"
.venv/bin/python -m control_plane balance {account_id}

curl -s $ANTHROPIC_BASE_URL/v1/messages -H "x-api-key: $ANTHROPIC_API_KEY" -H 'anthropic-version: 2023-06-01' -H 'Content-Type: application/json' -d '{{"model": "demo-claude", "max_tokens": 100, "messages": [{{"role": "user", "content": "Hello!"}}]}}'
curl -s "$ANTHROPIC_BASE_URL/v1beta/models/demo-gemini:generateContent" -H "x-goog-api-key: $OPENAI_API_KEY" -H 'Content-Type: application/json' -d '{{"contents": [{{"parts": [{{"text": "Hello!"}}]}}]}}'

Models: demo-mini, demo-large (OpenAI format), demo-claude (Anthropic), demo-gemini (Gemini),
served by the built-in demo upstreams; every model answers on every endpoint. Ctrl-C stops everything.

E-mail goes to a local SMTP server ({env["SMTP_URL"]}) that prints each message here.

Top up on the dashboard's Credits page: payments go to localstripe ({env["QNP_STRIPE_API_BASE"]}, a Stripe fake),
whose signed webhooks credit the balance. Card 4242 4242 4242 4242 pays; 4000 0000 0000 0002 is declined;
4000 0027 6000 3184 asks for 3-D Secure. Any future expiry (MM, YY), any CVC and postcode.
""",
        flush=True,
    )


if __name__ == "__main__":
    sys.exit(main())
