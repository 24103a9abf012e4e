"""Control-plane settings: the one place that reads the environment.

Builds a frozen ``Settings`` validated at start-up; every error names the variable at
fault. Everything else receives ``Settings`` as an argument. Must not import other
control-plane modules or ``proxy``.
"""

from __future__ import annotations

import logging
import os
import secrets
import socket
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar
from urllib.parse import urlsplit

import orjson

from control_plane.mail.target import SmtpTarget, parse_smtp_url
from shared.inflight import IN_FLIGHT_LIFETIME_MS
from shared.monitoring import MonitoringError, dsn_origin
from shared.redis_names import DEFAULT_PREFIX, RedisNames
from shared.secrets_env import SecretEnv, SecretFileError, with_secrets

_T = TypeVar("_T")
_LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
# Settings that may also come from a mounted file, as NAME_FILE (shared.secrets_env).
# A new secret setting adds its name here.
SECRETS = (
    "DATABASE_URL", "REDIS_URL", "QNP_ADMIN_TOKEN",
    "QNP_SESSION_SECRET", "QNP_SESSION_SECRET_PREVIOUS",
    "QNP_STRIPE_SECRET_KEY", "QNP_STRIPE_WEBHOOK_SECRET",
    "SMTP_URL",
)
# Besides these, each sign-in provider's client secret may come from
# QNP_OIDC_<NAME>_CLIENT_SECRET (or its _FILE) instead of the provider list: see
# ``_providers``.
# Never echoed in an error: the secrets, the provider list that holds client secrets,
# and the publishable key (refused when it is not one: most likely a pasted secret key).
_CONFIDENTIAL = frozenset((*SECRETS, "QNP_OIDC_PROVIDERS", "QNP_STRIPE_PUBLISHABLE_KEY"))


class SettingsError(ValueError):
    """A missing or invalid environment variable; the message names it."""


_LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "[::1]")
_PROVIDER_NAME = frozenset("abcdefghijklmnopqrstuvwxyz0123456789-")


@dataclass(frozen=True, slots=True)
class AppleKey:
    """Sign in with Apple: the client secret is an ES256 JWT minted from this key."""

    team_id: str
    key_id: str
    private_key_file: str  # the .p8 file Apple issued


@dataclass(frozen=True, slots=True)
class OIDCProvider:
    """One OpenID provider people may sign in with (Google, Apple, a company's IdP, dev)."""

    name: str  # in URLs: /auth/<name>/start
    label: str  # on the sign-in page
    issuer: str  # discovery is <issuer>/.well-known/openid-configuration
    client_id: str
    client_secret: str = field(default="", repr=False)
    apple: AppleKey | None = None

    @property
    def discovery_url(self) -> str:
        return self.issuer.rstrip("/") + "/.well-known/openid-configuration"


@dataclass(frozen=True, slots=True)
class Settings:
    database_url: str
    redis_url: str
    redis_prefix: str = DEFAULT_PREFIX
    admin_token: str | None = None
    admin_host: str = "127.0.0.1"
    admin_port: int = 8081
    web_host: str = "127.0.0.1"
    web_port: int = 8082
    # How long SIGTERM waits for each role to finish what it has in hand.
    shutdown_grace_s: float = 10.0
    # The origin browsers see the web service at; redirect URIs and Origin checks
    # derive from it. Plain http only on a loopback host (development).
    public_url: str = "http://127.0.0.1:8082"
    session_secret: str | None = field(default=None, repr=False)
    # The secret before the last rotation: still accepted, never used to sign.
    session_secret_previous: str | None = field(default=None, repr=False)
    oidc_providers: tuple[OIDCProvider, ...] = ()
    policy_version: str = "2026-04"
    # The proxy's public base URL, shown in the dashboard's quick start.
    api_base_url: str = "http://127.0.0.1:8080"
    _dev_secret: str = field(default_factory=lambda: secrets.token_urlsafe(32), repr=False)
    bcrypt_rounds: int = 12
    consumer_name: str = "control-plane"
    ingest_batch_size: int = 500
    ingest_block_ms: int = 1000
    # Pending entries of a consumer silent this long are claimed by a live one.
    ingest_claim_idle_ms: int = 60_000
    # Shards of the event stream ingest reads; at least the proxies' QNP_EVENT_SHARDS.
    event_shards: int = 1
    # The reservation sweep: how often, and the age past which a reservation is refunded.
    sweep_interval_s: float = 30.0
    sweep_max_age_ms: int = IN_FLIGHT_LIFETIME_MS
    retention_days: int = 30
    maintenance_interval_s: int = 60
    log_level: str = "INFO"
    # TLS (H8): listeners' certificates and rediss:// trust; see TlsSettings below.
    tls: TlsSettings = field(default_factory=lambda: TlsSettings())
    # Mail (H12): the outbox's SMTP server (SMTP_URL; unset = nothing is sent) and From.
    smtp: SmtpTarget | None = None
    mail_from: str = "QNP <no-reply@localhost>"
    # Stripe top-ups (H13, issue 13); see BillingSettings below.
    billing: BillingSettings = field(default_factory=lambda: BillingSettings())
    # Auto top-up and the low-balance e-mail (H22): how often disarmed triggers are
    # re-checked and due charges retried (crossings are checked after every batch).
    balance_sweep_s: float = 5.0
    # The privacy policy and rights pages (H19): the complaint authorities file that
    # replaces control_plane/policy/authorities.toml, and how many data exports one
    # process streams at once (each holds a Postgres connection for its duration).
    complaint_authorities: Path | None = None
    exports_per_process: int = 2
    # Account deletion (H17, issue 14): days a deletion can be cancelled before the
    # purge (shortened where the law's clock is shorter, see privacy.deletion).
    deletion_grace_days: int = 7
    # Error monitoring (H16, issue 15); see MonitoringSettings below.
    monitoring: MonitoringSettings = field(default_factory=lambda: MonitoringSettings())

    @property
    def names(self) -> RedisNames:
        return RedisNames(self.redis_prefix)

    @property
    def log_level_number(self) -> int:
        return logging.getLevelNamesMapping()[self.log_level]

    def require_admin_token(self) -> str:
        """The admin token, which ``serve`` cannot run without."""
        if not self.admin_token:
            raise SettingsError("QNP_ADMIN_TOKEN is required to serve the admin API")
        return self.admin_token

    @property
    def public_is_https(self) -> bool:
        return self.public_url.startswith("https://")

    def require_session_secret(self) -> str:
        """The key sessions are signed with, which the web role cannot run without.

        In development (a loopback http public URL) a missing secret is made up for this
        process: sessions then end when it stops and are not shared with replicas."""
        if self.session_secret:
            return self.session_secret
        if not self.public_is_https:
            return self._dev_secret
        raise SettingsError("QNP_SESSION_SECRET is required to serve the web role")

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        """Read and validate every variable; ``env`` defaults to the process environment."""
        e = _secrets(os.environ if env is None else env)
        return cls(
            database_url=_required(e, "DATABASE_URL"),
            redis_url=_required(e, "REDIS_URL"),
            redis_prefix=_parse(e, "QNP_REDIS_PREFIX", DEFAULT_PREFIX, _prefix),
            admin_token=_admin_token(e),
            admin_host=_parse(e, "QNP_ADMIN_HOST", "127.0.0.1", _non_empty),
            admin_port=_parse(e, "QNP_ADMIN_PORT", 8081, _int_in(1, 65535)),
            web_host=_parse(e, "QNP_WEB_HOST", "127.0.0.1", _non_empty),
            web_port=_parse(e, "QNP_WEB_PORT", 8082, _int_in(1, 65535)),
            shutdown_grace_s=_parse(e, "QNP_SHUTDOWN_GRACE", 10.0, _seconds(0.1, 600.0)),
            public_url=_parse(e, "QNP_PUBLIC_URL", _default_public_url(e), _public_url),
            session_secret=_parse(e, "QNP_SESSION_SECRET", None, _secret),
            session_secret_previous=_parse(e, "QNP_SESSION_SECRET_PREVIOUS", None, _secret),
            oidc_providers=_parse(e, "QNP_OIDC_PROVIDERS", (),
                                  lambda raw: _providers(raw, e)),
            policy_version=_parse(e, "QNP_POLICY_VERSION", "2026-04", _non_empty),
            api_base_url=_parse(e, "QNP_API_URL", "http://127.0.0.1:8080", _public_url),
            bcrypt_rounds=_parse(e, "QNP_BCRYPT_ROUNDS", 12, _int_in(4, 31)),
            consumer_name=_parse(
                e, "QNP_CONSUMER_NAME", f"{socket.gethostname()}-{os.getpid()}", _non_empty
            ),
            ingest_batch_size=_parse(e, "QNP_INGEST_BATCH_SIZE", 500, _int_in(1, 10_000)),
            ingest_block_ms=_parse(e, "QNP_INGEST_BLOCK_MS", 1000, _int_in(1, 60_000)),
            ingest_claim_idle_ms=_parse(
                e, "QNP_INGEST_CLAIM_IDLE_MS", 60_000, _int_in(100, 86_400_000)
            ),
            event_shards=_parse(e, "QNP_EVENT_SHARDS", 1, _int_in(1, 256)),
            sweep_interval_s=_parse(e, "QNP_SWEEP_INTERVAL_S", 30.0, _seconds(0.1, 86_400)),
            sweep_max_age_ms=_parse(e, "QNP_SWEEP_MAX_AGE_S", IN_FLIGHT_LIFETIME_MS,
                                    _ms_from_seconds(1, 7 * 86_400)),
            retention_days=_parse(e, "QNP_RETENTION_DAYS", 30, _int_in(1, 3650)),
            maintenance_interval_s=_parse(
                e, "QNP_MAINTENANCE_INTERVAL_S", 60, _int_in(1, 86_400)
            ),
            log_level=_parse(e, "QNP_LOG_LEVEL", "INFO", _log_level),
            tls=TlsSettings.from_env(e),  # TLS (H8)
            smtp=_smtp(e),
            mail_from=_parse(e, "QNP_MAIL_FROM", "QNP <no-reply@localhost>", _non_empty),
            billing=BillingSettings.from_env(e),  # Stripe top-ups (H13)
            balance_sweep_s=_parse(e, "QNP_BALANCE_SWEEP_S", 5.0, _seconds(0.1, 3600.0)),
            complaint_authorities=_parse(e, "QNP_COMPLAINT_AUTHORITIES", None,
                                         _readable_file),  # H19
            exports_per_process=_parse(e, "QNP_EXPORTS_PER_PROCESS", 2, _int_in(1, 64)),
            # Account deletion (H17): the policy promises personal data gone within 30
            # days of deletion, so the grace ends inside them.
            deletion_grace_days=_parse(e, "QNP_DELETION_GRACE_DAYS", 7, _int_in(0, 29)),
            monitoring=MonitoringSettings.from_env(e),  # Sentry (H16)
        )


def _secrets(env: Mapping[str, str]) -> dict[str, str]:
    try:
        return with_secrets(env, SECRETS, lambda path: Path(path).read_text("utf-8"))
    except SecretFileError as e:
        raise SettingsError(str(e)) from None


def _required(env: Mapping[str, str], name: str) -> str:
    value = env.get(name, "").strip()
    if not value:
        raise SettingsError(f"{name} is required")
    return value


def _smtp(env: Mapping[str, str]) -> SmtpTarget | None:
    raw = env.get("SMTP_URL", "").strip()
    try:  # not through _parse: its message would echo a password in the URL
        return parse_smtp_url(raw) if raw else None
    except ValueError as e:
        raise SettingsError(f"SMTP_URL is invalid: {e}") from None


def _admin_token(env: Mapping[str, str]) -> str | None:
    token = env.get("QNP_ADMIN_TOKEN", "").strip()
    return token or None


def _parse(env: Mapping[str, str], name: str, default: _T, convert: Callable[[str], _T]) -> _T:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        return convert(raw)
    except ValueError as e:
        # A secret's value never goes into the message (start-up errors are logged).
        shown = "<secret>" if name in _CONFIDENTIAL else repr(raw)
        raise SettingsError(f"{name}={shown} is invalid: {e}") from None


def _int_in(low: int, high: int) -> Callable[[str], int]:
    def convert(raw: str) -> int:
        value = int(raw)
        if not low <= value <= high:
            raise ValueError(f"must be between {low} and {high}")
        return value

    return convert


def _seconds(low: float, high: float) -> Callable[[str], float]:
    def convert(raw: str) -> float:
        value = float(raw)
        if not low <= value <= high:  # also refuses nan
            raise ValueError(f"must be between {low} and {high} seconds")
        return value

    return convert


def _default_public_url(env: Mapping[str, str]) -> str:
    return f"http://127.0.0.1:{env.get('QNP_WEB_PORT', '').strip() or 8082}"


def _public_url(raw: str) -> str:
    url = raw.rstrip("/")
    scheme, _, rest = url.partition("://")
    host = rest.split("/", 1)[0].rsplit(":", 1)[0] if not rest.startswith("[") else \
        rest.split("]", 1)[0] + "]"
    if "/" in rest or not host:
        raise ValueError("must be an origin such as https://qnp.example (no path)")
    if scheme == "https" or (scheme == "http" and host in _LOOPBACK_HOSTS):
        return url
    raise ValueError("must be https (plain http only on 127.0.0.1 in development)")


def _secret(raw: str) -> str:
    if len(raw) < 32:
        raise ValueError("must be at least 32 characters")
    return raw


def _apple(item: dict[str, object]) -> AppleKey | None:
    raw = item.get("apple")
    if raw is None:
        return None
    if not isinstance(raw, dict) or not all(
            isinstance(raw.get(k), str) and raw.get(k)
            for k in ("team_id", "key_id", "private_key_file")):
        raise ValueError("apple needs team_id, key_id and private_key_file")
    return AppleKey(str(raw["team_id"]), str(raw["key_id"]), str(raw["private_key_file"]))


def client_secret_variable(name: str) -> str:
    """Where a provider's client secret may come from instead of the provider list:
    ``google`` → ``QNP_OIDC_GOOGLE_CLIENT_SECRET`` (or ``…_FILE``, a mounted secret)."""
    return f"QNP_OIDC_{name.upper().replace('-', '_')}_CLIENT_SECRET"


def _providers(raw: str, env: Mapping[str, str] | None = None) -> tuple[OIDCProvider, ...]:
    """A JSON list of {name, label, issuer, client_id, client_secret}; an Apple provider
    has {"apple": {team_id, key_id, private_key_file}} instead of client_secret. A
    provider without ``client_secret`` takes it from ``client_secret_variable(name)``,
    so the list itself holds no secret and can be plain configuration."""
    secret_env = SecretEnv(env or {}, lambda path: Path(path).read_text("utf-8"))
    try:
        items = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise ValueError("must be a JSON list of providers") from None
    if not isinstance(items, list):
        raise ValueError("must be a JSON list of providers")
    found: list[OIDCProvider] = []
    for item in items:
        if not isinstance(item, dict):
            raise ValueError("each provider must be a JSON object")
        apple = _apple(item)
        if not apple and not item.get("client_secret") and isinstance(item.get("name"), str):
            try:
                item["client_secret"] = secret_env.get(client_secret_variable(item["name"]))
            except SecretFileError as e:
                raise ValueError(str(e)) from None
        needed = ("name", "issuer", "client_id") + (() if apple else ("client_secret",))
        values = {k: item.get(k) for k in needed}
        if not all(isinstance(v, str) and v for v in values.values()):
            raise ValueError("each provider needs name, issuer, client_id and client_secret "
                             "(or QNP_OIDC_<NAME>_CLIENT_SECRET)")
        name = str(values["name"])
        if not set(name) <= _PROVIDER_NAME or name in {p.name for p in found}:
            raise ValueError(f"provider name {name!r} must be unique, a-z 0-9 and -")
        issuer = str(values["issuer"])
        if not (issuer.startswith("https://") or _public_url_ok(issuer)):
            raise ValueError(f"provider {name!r}: issuer must be https")
        label = item.get("label")
        found.append(OIDCProvider(
            name=name, label=label if isinstance(label, str) and label else name,
            issuer=issuer, client_id=str(values["client_id"]),
            client_secret=str(values.get("client_secret") or ""), apple=apple,
        ))
    return tuple(found)


def _public_url_ok(url: str) -> bool:
    try:
        _public_url(url.split("/", 3)[0] + "//" + url.split("/", 3)[2])
    except (ValueError, IndexError):
        return False
    return True


def _ms_from_seconds(low: float, high: float) -> Callable[[str], int]:
    seconds = _seconds(low, high)
    return lambda raw: round(seconds(raw) * 1000)


def _non_empty(raw: str) -> str:
    return raw


def _prefix(raw: str) -> str:
    if any(c.isspace() or c in "{}" for c in raw):
        raise ValueError("must not contain spaces or braces")
    return raw


def _log_level(raw: str) -> str:
    level = raw.upper()
    if level not in _LOG_LEVELS:
        raise ValueError(f"must be one of {', '.join(_LOG_LEVELS)}")
    return level


# --- TLS (H8): certificates for the listeners, trust for rediss:// ---------------------


@dataclass(frozen=True, slots=True)
class ListenerTls:
    """One listener's certificate chain and key; both None: it serves plain HTTP."""

    cert: Path | None = None
    key: Path | None = None


@dataclass(frozen=True, slots=True)
class TlsSettings:
    web: ListenerTls = ListenerTls()
    admin: ListenerTls = ListenerTls()
    # For a rediss:// REDIS_URL: the CA to trust (None: the system's) and a client
    # certificate for a Redis that asks for one (Redis' default).
    redis_ca: Path | None = None
    redis_cert: Path | None = None
    redis_key: Path | None = None

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> TlsSettings:
        redis_cert, redis_key = _pair(env, "QNP_REDIS_TLS_CERT", "QNP_REDIS_TLS_KEY")
        return cls(
            web=ListenerTls(*_pair(env, "QNP_WEB_TLS_CERT", "QNP_WEB_TLS_KEY")),
            admin=ListenerTls(*_pair(env, "QNP_ADMIN_TLS_CERT", "QNP_ADMIN_TLS_KEY")),
            redis_ca=_parse(env, "QNP_REDIS_TLS_CA", None, _readable_file),
            redis_cert=redis_cert,
            redis_key=redis_key,
        )


def _readable_file(raw: str) -> Path | None:
    path = Path(raw)
    if not path.is_file():
        raise ValueError("not a readable file")
    return path


def _pair(env: Mapping[str, str], cert: str, key: str) -> tuple[Path | None, Path | None]:
    pair = (_parse(env, cert, None, _readable_file), _parse(env, key, None, _readable_file))
    if (pair[0] is None) != (pair[1] is None):
        raise SettingsError(f"{cert} and {key} go together: set both or neither")
    return pair


# --- Stripe top-ups (H13, issue 13) ----------------------------------------------------


@dataclass(frozen=True, slots=True)
class BillingSettings:
    """Top-ups through Stripe. Without a secret key the top-up API answers 503."""

    stripe_secret_key: str | None = field(default=None, repr=False)
    stripe_webhook_secret: str | None = field(default=None, repr=False)
    # Stripe's API base: https://api.stripe.com, or a localstripe for tests and `make run`.
    stripe_api_base: str = "https://api.stripe.com"
    stripe_timeout_s: float = 20.0
    min_topup_cents: int = 500
    max_topup_cents: int = 1_000_000
    # The fee charged on top of the credit: a percentage (basis points) plus a fixed part.
    fee_bps: int = 0
    fee_fixed_cents: int = 0
    # Reconciliation (H21): how often the ingest role lists Stripe's payments and
    # refunds, and how far before its last run each listing reaches back (a payment
    # is listed by when it was created, and may succeed a while later).
    reconcile_interval_s: float = 300.0
    reconcile_lookback_s: int = 86_400
    # The credits page's card form (h20): Stripe.js from this URL (localstripe's stand-in
    # in `make run` and tests), with this publishable key. The CSP allows its origin on
    # the credits page only.
    stripe_publishable_key: str | None = None
    stripe_js_url: str = "https://js.stripe.com/v3/"

    @property
    def page_topups(self) -> bool:
        """Whether the credits page offers a top-up: both Stripe keys are set."""
        return bool(self.stripe_secret_key and self.stripe_publishable_key)

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> BillingSettings:
        low = _parse(env, "QNP_TOPUP_MIN_CENTS", 500, _int_in(50, 100_000_000))
        high = _parse(env, "QNP_TOPUP_MAX_CENTS", 1_000_000, _int_in(50, 100_000_000))
        if high < low:
            raise SettingsError("QNP_TOPUP_MAX_CENTS must be at least QNP_TOPUP_MIN_CENTS")
        return cls(
            stripe_secret_key=_parse(env, "QNP_STRIPE_SECRET_KEY", None, _non_empty),
            stripe_webhook_secret=_parse(env, "QNP_STRIPE_WEBHOOK_SECRET", None, _non_empty),
            stripe_api_base=_parse(env, "QNP_STRIPE_API_BASE", "https://api.stripe.com",
                                   _stripe_base),
            stripe_timeout_s=_parse(env, "QNP_STRIPE_TIMEOUT_S", 20.0, _seconds(0.5, 120.0)),
            min_topup_cents=low,
            max_topup_cents=high,
            fee_bps=_parse(env, "QNP_TOPUP_FEE_BPS", 0, _int_in(0, 5_000)),
            fee_fixed_cents=_parse(env, "QNP_TOPUP_FEE_FIXED_CENTS", 0, _int_in(0, 10_000)),
            reconcile_interval_s=_parse(env, "QNP_STRIPE_RECONCILE_INTERVAL_S", 300.0,
                                        _seconds(0.1, 86_400.0)),
            reconcile_lookback_s=_parse(env, "QNP_STRIPE_RECONCILE_LOOKBACK_S", 86_400,
                                        _int_in(0, 90 * 86_400)),
            stripe_publishable_key=_parse(env, "QNP_STRIPE_PUBLISHABLE_KEY", None,
                                          _publishable_key),
            stripe_js_url=_parse(env, "QNP_STRIPE_JS_URL", "https://js.stripe.com/v3/",
                                 _stripe_js_url),
        )


def _publishable_key(raw: str) -> str:
    if not raw.startswith("pk_"):
        raise ValueError("must be a Stripe publishable key (pk_...)")
    return raw


def _stripe_js_url(raw: str) -> str:
    # The page loads a script from here: https, or http from a fake on this machine.
    _stripe_base(raw)
    if urlsplit(raw).path in ("", "/"):
        raise ValueError("must be the script's URL, such as https://js.stripe.com/v3/")
    return raw


def _stripe_base(raw: str) -> str:
    # Plain http only for a fake on this machine (localstripe); the key travels in it.
    if raw.startswith("https://") or any(
            raw.startswith(f"http://{host}:") for host in _LOOPBACK_HOSTS):
        return raw.rstrip("/")
    raise ValueError("must be an https:// URL, or http:// on a loopback host")


# --- Error monitoring (H16, issue 15) ---------------------------------------------------


@dataclass(frozen=True, slots=True)
class MonitoringSettings:
    """Sentry, off unless a DSN is set: the service's own (``SENTRY_DSN``) and the one
    the dashboard's pages report to (``QNP_SENTRY_BROWSER_DSN``, only with consent)."""

    sentry_dsn: str | None = None
    sentry_environment: str | None = None
    browser_dsn: str | None = None

    @property
    def browser_origin(self) -> str | None:
        """Where the browser SDK sends (the CSP's connect-src allows it), if on."""
        return dsn_origin(self.browser_dsn) if self.browser_dsn else None

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> MonitoringSettings:
        return cls(
            sentry_dsn=_parse(env, "SENTRY_DSN", None, _dsn),
            sentry_environment=_parse(env, "SENTRY_ENVIRONMENT", None, _non_empty),
            browser_dsn=_parse(env, "QNP_SENTRY_BROWSER_DSN", None, _dsn),
        )


def _dsn(raw: str) -> str | None:
    if not raw.strip():
        return None
    try:
        dsn_origin(raw)
    except MonitoringError as e:
        raise ValueError(str(e)) from None
    return raw
