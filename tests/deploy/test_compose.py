"""deploy/compose.yaml: valid by the Compose Specification's schema (vendored, offline),
and a stack that starts in order, keeps its data and secrets, and stops gracefully."""

from __future__ import annotations

import copy
import hashlib
import json
import os
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from proxy.settings import CommandLine, load
from tests.deploy.manifests import DEPLOY, load_compose

SCHEMA = Path(__file__).with_name("compose-spec.json")
SCHEMA_SHA256 = "56bab44c85c0ce8affb74474950293f37d510673283a243bcd7eeadb900fa35c"
QNP_SERVICES = ("migrate", "proxy", "ingest", "web", "admin")


def _errors(doc: dict[str, Any]) -> list[str]:
    schema = json.loads(SCHEMA.read_text())
    # The file says draft 2019-09 under a URL jsonschema does not know; name it.
    validator = jsonschema.Draft201909Validator(schema)
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}"
            for e in validator.iter_errors(doc)]


def test_schema_is_the_vendored_copy() -> None:
    assert hashlib.sha256(SCHEMA.read_bytes()).hexdigest() == SCHEMA_SHA256
    jsonschema.Draft201909Validator.check_schema(json.loads(SCHEMA.read_text()))


def test_compose_file_validates_against_the_compose_schema() -> None:
    assert _errors(load_compose()) == []


@pytest.mark.parametrize("break_it", [
    lambda d: d["services"]["proxy"].update(stop_grace=40),
    lambda d: d["services"]["ingest"]["depends_on"]["migrate"].update(
        condition="service_finished"),
    lambda d: d["services"]["redis"]["healthcheck"].update(interval=5),
])
def test_the_schema_catches_mistakes(break_it: Any) -> None:
    """The check is not vacuous: a misspelt key, an unknown start condition, a duration
    without a unit are each refused."""
    doc = copy.deepcopy(load_compose())
    break_it(doc)
    assert _errors(doc) != []


def test_start_order_follows_health() -> None:
    services = load_compose()["services"]
    for name, service in services.items():
        for needed in service.get("depends_on", {}):
            assert needed in services, f"{name} depends on unknown {needed}"
    cond = {name: {k: v["condition"] for k, v in s.get("depends_on", {}).items()}
            for name, s in services.items()}
    assert cond["migrate"] == {"postgres": "service_healthy", "redis": "service_healthy"}
    for role in ("ingest", "web", "admin"):
        assert cond[role]["migrate"] == "service_completed_successfully"
    assert cond["proxy"]["redis"] == "service_healthy"
    assert cond["postgres"]["secrets"] == "service_completed_successfully"
    # One-shots must not be restarted after they succeeded.
    assert services["migrate"]["restart"] == "no" and services["secrets"]["restart"] == "no"
    waited_for = {k for c in cond.values() for k, v in c.items() if v == "service_healthy"}
    for name in waited_for | {"proxy", "ingest", "web", "admin"}:
        assert "healthcheck" in services[name], f"{name} has no health check"


def test_redis_keeps_an_append_only_file_on_a_volume() -> None:
    redis = load_compose()["services"]["redis"]
    command = redis["command"]
    assert command[command.index("--appendonly") + 1] == "yes"
    assert any(v.endswith(":/data") for v in redis["volumes"])


def test_qnp_containers_run_read_only_with_scratch_on_tmpfs() -> None:
    services = load_compose()["services"]
    for name in (*QNP_SERVICES, "demo-upstream"):
        service = services[name]
        assert service["read_only"] is True, name
        assert "/tmp" in service["tmpfs"], name
        assert "ALL" in service["cap_drop"], name
        assert "user" not in service, f"{name} must run as the image's uid 10001"
        writable = [v for v in service.get("volumes", []) if not v.endswith(":ro")]
        assert all(v.split(":")[1] == "/var/spool/qnp" for v in writable), (name, writable)


def test_secrets_are_files_never_values() -> None:
    """Services read secrets from the secrets volume (``NAME_FILE``); no secret value
    is written in the compose file itself."""
    services = load_compose()["services"]
    for name in QNP_SERVICES:
        env = services[name].get("environment", {})
        for secret in ("DATABASE_URL", "QNP_ADMIN_TOKEN", "QNP_SESSION_SECRET"):
            assert secret not in env, f"{name} sets {secret} in clear"
        for key, value in env.items():
            if key.endswith("_FILE"):
                assert str(value).startswith("/run/qnp-secrets/"), (name, key)
                assert "qnp-secrets:/run/qnp-secrets:ro" in services[name]["volumes"]
    assert "QNP_ADMIN_TOKEN_FILE" in services["admin"]["environment"]
    for role in ("web", "ingest"):
        assert "QNP_ADMIN_TOKEN_FILE" not in services[role]["environment"], \
            f"{role} must not hold the admin token"


def test_admin_api_is_published_on_loopback_only() -> None:
    services = load_compose()["services"]
    assert services["admin"]["ports"] == ["127.0.0.1:8081:8081"]
    for name, service in services.items():
        for port in service.get("ports", []):
            host = str(port).rsplit(":", 2)[0]
            assert host in {"127.0.0.1", "${QNP_BIND:-127.0.0.1}"}, (name, port)


def test_proxy_gets_longer_to_stop_than_its_shutdown_grace() -> None:
    proxy = load_compose()["services"]["proxy"]
    grace = float(proxy["environment"]["QNP_SHUTDOWN_GRACE"])
    assert float(proxy["stop_grace_period"].removesuffix("s")) > grace


def test_demo_catalog_loads_with_the_proxys_compose_environment() -> None:
    """What the proxy does at start-up in compose: the mounted demo catalog, with the
    service's environment, loads (every price set, every key variable present), and the
    key it sends is the one the demo upstream requires."""
    services = load_compose()["services"]
    proxy = services["proxy"]
    (mount,) = [v for v in proxy["volumes"] if v.endswith(":/etc/qnp/catalog.toml:ro")]
    env = {k: str(v) for k, v in proxy["environment"].items()}
    settings = load(env, CommandLine(catalog_path=str(DEPLOY / mount.split(":")[0])))
    assert {"demo-mini", "demo-large"} <= set(settings.catalog.models)
    upstream = services["demo-upstream"]["command"]
    assert upstream[upstream.index("--api-key") + 1] == env["QNP_DEMO_UPSTREAM_KEY"]
    port = upstream[upstream.index("--port") + 1]
    assert f"http://demo-upstream:{port}/v1" in (DEPLOY / "demo-catalog.toml").read_text()


def _run_secrets_maker(folder: Path) -> None:
    script = load_compose()["services"]["secrets"]["command"][0]
    assert "/run/qnp-secrets" in script
    # Not root (a developer's machine): the hand-over to uid 10001 is what cannot run.
    prelude = "import os\nif os.geteuid() != 0:\n    os.chown = lambda *a: None\n"
    subprocess.run([sys.executable, "-c", prelude + script.replace("/run/qnp-secrets",
                                                                   str(folder))],
                   check=True, capture_output=True, timeout=30)


def test_secrets_are_made_once_and_kept(tmp_path: Path) -> None:
    """`docker compose up` a second time must not change a secret: PostgreSQL's data
    volume keeps the first password. Every `*_FILE` a service reads is made, readable
    by uid 10001 only (the password also by the postgres image's own user)."""
    _run_secrets_maker(tmp_path)
    first = {p.name: p.read_text() for p in tmp_path.iterdir()}
    _run_secrets_maker(tmp_path)
    assert {p.name: p.read_text() for p in tmp_path.iterdir()} == first
    password = first["postgres_password"]
    assert first["DATABASE_URL"] == f"postgresql://qnp:{password}@postgres:5432/qnp"
    assert len(first["QNP_SESSION_SECRET"]) >= 48
    services = load_compose()["services"]
    wanted = {str(value).removeprefix("/run/qnp-secrets/")
              for service in services.values()
              for key, value in service.get("environment", {}).items() if key.endswith("_FILE")}
    assert wanted and wanted <= set(first)
    for name in first:
        mode = stat.S_IMODE((tmp_path / name).stat().st_mode)
        assert mode == (0o444 if name == "postgres_password" else 0o440), name
        if os.geteuid() == 0:
            assert (tmp_path / name).stat().st_uid == 10001
