"""The API-key format: ``qnp_<key id>_<secret><checksum>``.

- ``qnp_`` is a public prefix, so secret scanners and people recognise a key.
- the key id (12 lowercase base32 characters, 60 random bits) is public: it names the
  key in the dashboard, logs and events, and is what the proxy looks up.
- the secret is 32 base62 characters (~190 random bits); only its bcrypt hash is kept.
- the checksum (6 base62 characters of CRC-32 over everything before it) lets a
  mistyped or truncated key be refused without any lookup at all.

No I/O here; hashing with bcrypt belongs to the services.
"""

from __future__ import annotations

import re
import secrets
import zlib
from dataclasses import dataclass

import orjson

PREFIX = "qnp_"
KEY_ID_LEN = 12
SECRET_LEN = 32
CHECKSUM_LEN = 6
KEY_LEN = len(PREFIX) + KEY_ID_LEN + 1 + SECRET_LEN + CHECKSUM_LEN

_B62 = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
_B32 = "abcdefghijklmnopqrstuvwxyz234567"
_SHAPE = re.compile(
    rf"^{PREFIX}([a-z2-7]{{{KEY_ID_LEN}}})_([0-9A-Za-z]{{{SECRET_LEN}}})([0-9A-Za-z]{{{CHECKSUM_LEN}}})$"
)
KEY_ID_SHAPE = re.compile(rf"^[a-z2-7]{{{KEY_ID_LEN}}}$")


class MalformedKey(ValueError):
    """The string is not a well-formed QNP key (shape or checksum)."""


@dataclass(frozen=True, slots=True)
class ParsedKey:
    key_id: str
    secret: str


def _checksum(body: str) -> str:
    n = zlib.crc32(body.encode("ascii"))
    out = []
    for _ in range(CHECKSUM_LEN):
        n, r = divmod(n, 62)
        out.append(_B62[r])
    return "".join(reversed(out))


def generate() -> tuple[str, ParsedKey]:
    """A fresh key: the full string (shown to the user once) and its parts."""
    key_id = "".join(secrets.choice(_B32) for _ in range(KEY_ID_LEN))
    secret = "".join(secrets.choice(_B62) for _ in range(SECRET_LEN))
    body = f"{PREFIX}{key_id}_{secret}"
    return body + _checksum(body), ParsedKey(key_id, secret)


def parse(key: str) -> ParsedKey:
    """Split a presented key into id and secret, refusing malformed keys.

    Raises MalformedKey for anything of the wrong length, alphabet, shape or checksum;
    callers can refuse such a key without touching Redis or bcrypt.
    """
    if len(key) != KEY_LEN:
        raise MalformedKey("wrong length")
    m = _SHAPE.match(key)
    if m is None:
        raise MalformedKey("wrong shape")
    key_id, secret, check = m.groups()
    if not secrets.compare_digest(_checksum(key[: -CHECKSUM_LEN]), check):
        raise MalformedKey("bad checksum")
    return ParsedKey(key_id, secret)


class KeyRecordError(ValueError):
    """Bytes in Redis that are not a valid key record."""


KEY_STATUSES = frozenset({"active", "revoked", "suspended"})
LIMIT_RESETS = frozenset({None, "daily", "weekly", "monthly"})


def _optional_int(value: object) -> int | None:
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool):
        raise ValueError("not an integer")
    return value


@dataclass(frozen=True, slots=True)
class KeyRecord:
    """What the control plane publishes to Redis for each key and the proxy caches.

    ``secret_hash`` is the bcrypt hash of the secret (never the secret itself);
    ``limits`` is reserved for per-key limits (requests/tokens per minute, concurrency).
    Optional, added later (a record without them reads as "none"): ``credit_limit_micros``
    (the key's spend cap), ``limit_reset`` (``daily``/``weekly``/``monthly`` at UTC
    midnight, weeks from Monday; none = a lifetime cap), ``expires_at`` (Unix seconds).
    """

    key_id: str
    account_id: str
    status: str
    secret_hash: str
    limits: dict[str, int]
    credit_limit_micros: int | None = None
    limit_reset: str | None = None
    expires_at: int | None = None

    @property
    def active(self) -> bool:
        return self.status == "active"

    def encode(self) -> bytes:
        return orjson.dumps(self)

    @classmethod
    def decode(cls, raw: bytes | str) -> KeyRecord:
        try:
            d = orjson.loads(raw)
            rec = cls(
                key_id=d["key_id"],
                account_id=d["account_id"],
                status=d["status"],
                secret_hash=d["secret_hash"],
                limits=dict(d.get("limits") or {}),
                credit_limit_micros=_optional_int(d.get("credit_limit_micros")),
                limit_reset=d.get("limit_reset"),
                expires_at=_optional_int(d.get("expires_at")),
            )
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError) as e:
            raise KeyRecordError("malformed key record") from e
        if rec.limit_reset not in LIMIT_RESETS:
            raise KeyRecordError("malformed key record")
        if rec.status not in KEY_STATUSES or not all(
            isinstance(v, str) for v in (rec.key_id, rec.account_id, rec.secret_hash)
        ):
            raise KeyRecordError("malformed key record")
        return rec
