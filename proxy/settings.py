"""Proxy settings: the one place that reads the environment.

``load()`` builds a frozen ``Settings`` from environment variables (and command-line
overrides), validating everything at start-up with errors that name the variable.
Every other module receives the object; none reads ``os.environ``.
"""

from __future__ import annotations

import ipaddress
import os
import re
import resource
import socket
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from proxy.catalog import Catalog, CatalogError
from proxy.catalog import load as load_catalog
from proxy.routing import RoutingPolicy
from proxy.tls import RedisTls
from shared.monitoring import MonitoringError, dsn_origin
from shared.redis_names import DEFAULT_PREFIX, RedisNames
from shared.secrets_env import SecretEnv, SecretFileError, with_secrets

# Cloudflare's published edge ranges (https://www.cloudflare.com/ips/). A
# CF-Connecting-IP header is believed only from a peer inside these (or the
# QNP_TRUSTED_PROXIES override); anyone else could forge it.
CLOUDFLARE_RANGES = (
    "173.245.48.0/20", "103.21.244.0/22", "103.22.200.0/22", "103.31.4.0/22",
    "141.101.64.0/18", "108.162.192.0/18", "190.93.240.0/20", "188.114.96.0/20",
    "197.234.240.0/22", "198.41.128.0/17", "162.158.0.0/15", "104.16.0.0/13",
    "104.24.0.0/14", "172.64.0.0/13", "131.0.72.0/22",
    "2400:cb00::/32", "2606:4700::/32", "2803:f800::/32", "2405:b500::/32",
    "2405:8100::/32", "2a06:98c0::/29", "2c0f:f248::/32",
)

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
# Internal: the supervisor names its per-instance metrics folder to its workers here.
METRICS_SOCKET_DIR = "QNP_METRICS_SOCKET_DIR"


class SettingsError(ValueError):
    """A setting is missing or invalid; the message names the variable."""


@dataclass(frozen=True, slots=True)
class Settings:
    redis_url: str
    catalog: Catalog
    catalog_path: Path
    host: str = "127.0.0.1"
    port: int = 8080
    workers: int = 1
    redis_names: RedisNames = field(default_factory=RedisNames)
    node_id: str = "proxy"
    max_body_bytes: int = 8 * 1024 * 1024
    connect_timeout: float = 5.0
    first_byte_timeout: float = 120.0
    read_timeout: float = 300.0
    key_cache_ttl: float = 60.0
    key_cache_size: int = 100_000
    shutdown_grace: float = 30.0
    event_queue_max: int = 100_000
    event_batch: int = 512
    event_flush_interval: float = 0.02
    trusted_proxies: tuple[Network, ...] = ()
    log_level: str = "INFO"
    spool_dir: Path = field(default_factory=lambda: Path(tempfile.gettempdir(), "qnp-spool"))
    spool_max_bytes: int = 256 * 1024 * 1024
    event_stream_max_len: int = 2_000_000  # per shard
    # Stream keys the events are spread over (shared.redis_names.event_shards); the
    # control plane's QNP_EVENT_SHARDS must be the same or larger.
    event_shards: int = 1
    rate_window_ms: int = 60_000
    default_max_tokens: int = 4096
    admission: bool = True
    degraded_policy: str = "local"
    fleet_processes: int = 1
    degraded_fraction: float = 0.5
    # SSE comments while a stream waits for its first token (Cloudflare cuts at 100 s).
    keepalive_interval: float = 15.0
    gc_threshold: int = 50_000  # youngest generation's; 0 keeps Python's own (700)
    routing: RoutingPolicy = field(default_factory=RoutingPolicy)
    # /metrics and /healthz on a listener of their own, never the public port; None: off.
    metrics_host: str = "127.0.0.1"
    metrics_port: int | None = 9464
    # Set by the supervisor for its workers only: each serves its registry on a Unix
    # socket there, and the supervisor's metrics listener sums them.
    metrics_socket_dir: Path | None = None
    # The public listener's edge limits (proxy.http_limits.HttpLimits); 0 caps: off.
    http_head_timeout: float = 10.0
    http_min_body_rate: float = 1024.0
    http_body_rate_window: float = 10.0
    http_max_connections: int = 0
    http_max_connections_per_ip: int = 256
    http_max_buffered_body: int = 256 * 1024 * 1024
    # The public listener serves TLS with this certificate chain and key; None: plain HTTP.
    tls_cert: Path | None = None
    tls_key: Path | None = None
    # Trust and client identity for a rediss:// REDIS_URL (proxy.tls.redis_options).
    redis_tls: RedisTls = field(default_factory=RedisTls)
    # Error monitoring (shared.monitoring): SENTRY_DSN unset or empty = no SDK at all.
    sentry_dsn: str | None = None
    sentry_environment: str | None = None


def _num(env: Mapping[str, str], name: str, default: float, *, minimum: float = 0) -> float:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        raise SettingsError(f"{name}={raw!r} is not a number") from None
    if not value >= minimum or value == float("inf"):
        raise SettingsError(f"{name}={raw!r} must be a finite number >= {minimum}")
    return value


def _int(env: Mapping[str, str], name: str, default: int, *, minimum: int = 0) -> int:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise SettingsError(f"{name}={raw!r} is not an integer") from None
    if value < minimum:
        raise SettingsError(f"{name}={raw!r} must be >= {minimum}")
    return value


def _networks(env: Mapping[str, str]) -> tuple[Network, ...]:
    raw = env.get("QNP_TRUSTED_PROXIES")
    ranges = CLOUDFLARE_RANGES if raw is None else [r for r in raw.split(",") if r.strip()]
    try:
        return tuple(ipaddress.ip_network(r.strip()) for r in ranges)
    except ValueError as e:
        raise SettingsError(f"QNP_TRUSTED_PROXIES: {e}") from None


def _metrics_port(env: Mapping[str, str]) -> int | None:
    raw = env.get("QNP_METRICS_PORT", "")
    if raw.strip().lower() == "off":
        return None
    port = _int(env, "QNP_METRICS_PORT", 9464)
    if port > 65535:
        raise SettingsError(f"QNP_METRICS_PORT={raw!r} must be a port (0 = any free), or off")
    return port


def _spool_dir(env: Mapping[str, str]) -> Path:
    """QNP_SPOOL_DIR, else a folder per deployment and node in the system temp dir
    (a spool replays into the stream of the prefix it was written for)."""
    raw = env.get("QNP_SPOOL_DIR")
    if raw:
        return Path(raw)
    prefix = env.get("QNP_REDIS_PREFIX") or DEFAULT_PREFIX
    node = env.get("QNP_NODE_ID") or socket.gethostname()
    name = re.sub(r"[^A-Za-z0-9._-]", "_", f"qnp-spool-{prefix}-{node}")
    return Path(tempfile.gettempdir(), name)


@dataclass(frozen=True, slots=True)
class CommandLine:
    """Overrides given on the command line; they win over the environment."""

    catalog_path: str | None = None
    host: str | None = None
    port: int | None = None
    workers: int | None = None
    tls_cert: str | None = None
    tls_key: str | None = None


def environment() -> dict[str, str]:
    """A snapshot of the process environment (handed to worker processes)."""
    return dict(os.environ)


def load(env: Mapping[str, str] | None = None, cli: CommandLine | None = None) -> Settings:
    """Settings from the environment and the command line."""
    env = os.environ if env is None else env
    # Secrets may come as NAME_FILE too (shared.secrets_env): REDIS_URL, and every
    # provider key variable the catalog names.
    catalog_env = SecretEnv(env, _read_secret_file)
    env = _secrets(env, ("REDIS_URL",))
    cli = cli or CommandLine()
    catalog_path, host, port, workers = cli.catalog_path, cli.host, cli.port, cli.workers
    redis_url = env.get("REDIS_URL")
    if not redis_url:
        raise SettingsError("REDIS_URL is not set (e.g. redis://127.0.0.1:6379/0)")
    path_str = catalog_path or env.get("QNP_CATALOG")
    if not path_str:
        raise SettingsError("no catalog: pass --catalog PATH or set QNP_CATALOG")
    path = Path(path_str)
    try:
        catalog = load_catalog(path, catalog_env)
    except CatalogError as e:
        raise SettingsError(f"QNP_CATALOG: {e}") from None
    except SecretFileError as e:
        raise SettingsError(str(e)) from None
    level = env.get("QNP_LOG_LEVEL", "INFO").upper()
    if level not in {"DEBUG", "INFO", "WARNING", "ERROR"}:
        raise SettingsError(f"QNP_LOG_LEVEL={level!r} must be DEBUG, INFO, WARNING or ERROR")
    return Settings(
        redis_url=redis_url,
        catalog=catalog,
        catalog_path=path,
        host=host or env.get("QNP_PROXY_HOST", "127.0.0.1"),
        port=port if port is not None else _int(env, "QNP_PROXY_PORT", 8080),
        workers=workers if workers is not None else _int(env, "QNP_WORKERS", 1, minimum=1),
        redis_names=RedisNames(env.get("QNP_REDIS_PREFIX") or DEFAULT_PREFIX),
        node_id=env.get("QNP_NODE_ID") or socket.gethostname(),
        max_body_bytes=_int(env, "QNP_MAX_BODY_BYTES", 8 * 1024 * 1024, minimum=1024),
        connect_timeout=_num(env, "QNP_CONNECT_TIMEOUT", 5.0, minimum=0.001),
        first_byte_timeout=_num(env, "QNP_FIRST_BYTE_TIMEOUT", 120.0, minimum=0.001),
        read_timeout=_num(env, "QNP_READ_TIMEOUT", 300.0, minimum=0.001),
        key_cache_ttl=_num(env, "QNP_KEY_CACHE_TTL", 60.0, minimum=0.1),
        key_cache_size=_int(env, "QNP_KEY_CACHE_SIZE", 100_000, minimum=16),
        shutdown_grace=_num(env, "QNP_SHUTDOWN_GRACE", 30.0),
        event_queue_max=_int(env, "QNP_EVENT_QUEUE_MAX", 100_000, minimum=1),
        event_batch=_int(env, "QNP_EVENT_BATCH", 512, minimum=1),
        event_flush_interval=_num(env, "QNP_EVENT_FLUSH_MS", 20.0, minimum=1.0) / 1000,
        trusted_proxies=_networks(env),
        log_level=level,
        spool_dir=_spool_dir(env),
        spool_max_bytes=_int(env, "QNP_SPOOL_MAX_MB", 256, minimum=1) * 1024 * 1024,
        event_stream_max_len=_int(env, "QNP_EVENT_STREAM_MAXLEN", 2_000_000),
        event_shards=_int(env, "QNP_EVENT_SHARDS", 1, minimum=1),
        rate_window_ms=_int(env, "QNP_RATE_WINDOW_MS", 60_000, minimum=100),
        default_max_tokens=_int(env, "QNP_DEFAULT_MAX_TOKENS", 4096, minimum=1),
        admission=_choice(env, "QNP_ADMISSION", ("on", "off")) == "on",
        degraded_policy=_choice(env, "QNP_DEGRADED_POLICY", ("local", "allow", "deny")),
        fleet_processes=_int(env, "QNP_FLEET_PROCESSES", 1, minimum=1),
        degraded_fraction=_num(env, "QNP_DEGRADED_FRACTION", 0.5, minimum=0.0),
        keepalive_interval=_num(env, "QNP_KEEPALIVE_INTERVAL", 15.0, minimum=0.01),
        gc_threshold=_int(env, "QNP_GC_THRESHOLD", 50_000),
        routing=RoutingPolicy(
            eject_after=_int(env, "QNP_EJECT_AFTER", 3, minimum=1),
            base_ejection=_num(env, "QNP_EJECT_BASE_SECONDS", 5.0, minimum=0.001),
            max_ejection=_num(env, "QNP_EJECT_MAX_SECONDS", 300.0, minimum=0.001),
            retry_budget=_num(env, "QNP_RETRY_BUDGET", 0.2),
            min_retry_concurrency=_int(env, "QNP_MIN_RETRY_CONCURRENCY", 3),
        ),
        metrics_host=env.get("QNP_METRICS_HOST") or "127.0.0.1",
        metrics_port=_metrics_port(env),
        metrics_socket_dir=Path(raw_dir) if (raw_dir := env.get(METRICS_SOCKET_DIR)) else None,
        http_head_timeout=_num(env, "QNP_HTTP_HEAD_TIMEOUT", 10.0, minimum=0.01),
        http_min_body_rate=_num(env, "QNP_HTTP_MIN_BODY_RATE", 1024.0),
        http_body_rate_window=_num(env, "QNP_HTTP_BODY_RATE_WINDOW", 10.0, minimum=0.01),
        http_max_connections=_int(env, "QNP_HTTP_MAX_CONNECTIONS", _default_max_connections()),
        http_max_connections_per_ip=_int(env, "QNP_HTTP_MAX_CONNECTIONS_PER_IP", 256),
        http_max_buffered_body=_int(env, "QNP_HTTP_MAX_BUFFERED_BODY_MB", 256, minimum=1)
        * 1024 * 1024,
        **_tls(env, cli),
        **_sentry(env),
    )


def _sentry(env: Mapping[str, str]) -> dict[str, Any]:
    dsn = env.get("SENTRY_DSN") or None
    if dsn is not None:
        try:
            dsn_origin(dsn)
        except MonitoringError as e:
            raise SettingsError(f"SENTRY_DSN {e}") from None
    return {"sentry_dsn": dsn, "sentry_environment": env.get("SENTRY_ENVIRONMENT") or None}


def _file(env: Mapping[str, str], name: str, given: str | None = None) -> Path | None:
    """A file named by ``given`` (the command line) or the variable; it must exist."""
    raw = given or env.get(name)
    if not raw:
        return None
    path = Path(raw)
    if not path.is_file():
        where = f"--{name.removeprefix('QNP_').lower().replace('_', '-')}" if given else name
        raise SettingsError(f"{where}={raw!r} is not a readable file")
    return path


def _tls(env: Mapping[str, str], cli: CommandLine) -> dict[str, Any]:
    cert = _file(env, "QNP_TLS_CERT", cli.tls_cert)
    key = _file(env, "QNP_TLS_KEY", cli.tls_key)
    if (cert is None) != (key is None):
        raise SettingsError("QNP_TLS_CERT (--tls-cert) and QNP_TLS_KEY (--tls-key) "
                            "go together: set both or neither")
    redis = RedisTls(_file(env, "QNP_REDIS_TLS_CA"), _file(env, "QNP_REDIS_TLS_CERT"),
                     _file(env, "QNP_REDIS_TLS_KEY"))
    if (redis.cert is None) != (redis.key is None):
        raise SettingsError("QNP_REDIS_TLS_CERT and QNP_REDIS_TLS_KEY go together: "
                            "set both or neither")
    return {"tls_cert": cert, "tls_key": key, "redis_tls": redis}


def _read_secret_file(path: str) -> str:
    return Path(path).read_text("utf-8")


def _secrets(env: Mapping[str, str], names: tuple[str, ...]) -> Mapping[str, str]:
    try:
        return with_secrets(env, names, _read_secret_file)
    except SecretFileError as e:
        raise SettingsError(str(e)) from None


def _default_max_connections() -> int:
    """Client connections one process accepts by default: under half its file
    descriptors, since each client request may hold an upstream connection too."""
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return 0
    return max(64, int(soft * 0.45))


def _choice(env: Mapping[str, str], name: str, choices: tuple[str, ...]) -> str:
    value = env.get(name) or choices[0]
    if value not in choices:
        raise SettingsError(f"{name}={value!r} must be one of {', '.join(choices)}")
    return value
