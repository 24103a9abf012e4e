"""The key format refuses typos and truncations before any lookup."""

import pytest

from shared import apikeys
from shared.apikeys import KeyRecord, KeyRecordError, MalformedKey


def test_generated_key_round_trips_and_carries_enough_entropy() -> None:
    key, parts = apikeys.generate()
    assert key.startswith("qnp_")
    assert apikeys.parse(key) == parts
    # 32 base62 characters: ~190 bits, well above the 128 a secret needs.
    assert len(parts.secret) == 32
    assert len({apikeys.generate()[1].secret for _ in range(50)}) == 50


@pytest.mark.parametrize(
    "mangle",
    [
        lambda k: k[:-1],  # truncated
        lambda k: k + "x",  # extra character
        lambda k: k[:20] + ("A" if k[20] != "A" else "B") + k[21:],  # one typo in the secret
        lambda k: k.replace("qnp_", "sk-_"),  # wrong prefix
        lambda k: k[:4] + k[4:16].upper() + k[16:],  # key id case changed
        lambda k: "",
        lambda k: k[:-6] + "ééééé",  # non-ASCII
    ],
)
def test_mistyped_or_truncated_keys_are_refused(mangle: object) -> None:
    key, _ = apikeys.generate()
    with pytest.raises(MalformedKey):
        apikeys.parse(mangle(key))  # type: ignore[operator]


def test_every_single_character_typo_in_the_secret_is_caught() -> None:
    key, _ = apikeys.generate()
    body_start = len("qnp_") + apikeys.KEY_ID_LEN + 1
    for i in range(body_start, len(key) - apikeys.CHECKSUM_LEN):
        typo = "0" if key[i] != "0" else "1"
        with pytest.raises(MalformedKey):
            apikeys.parse(key[:i] + typo + key[i + 1:])


def test_key_record_round_trips_and_rejects_garbage() -> None:
    rec = KeyRecord("abcdefghijkl", "acct", "active", "$2b$04$hash", {"rpm": 10})
    assert KeyRecord.decode(rec.encode()) == rec
    for raw in (b"", b"[]", b'{"key_id": 1}', b'{"key_id":"a","account_id":"b",'
                b'"status":"weird","secret_hash":"c"}'):
        with pytest.raises(KeyRecordError):
            KeyRecord.decode(raw)
