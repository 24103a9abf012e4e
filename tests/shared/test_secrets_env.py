"""Secrets as ``NAME`` or ``NAME_FILE``: the value, the errors, what counts as unset."""

from __future__ import annotations

import pytest

from shared.secrets_env import SecretEnv, SecretFileError, secret, with_secrets

FILES = {"/run/s/token": "t0k\n", "/run/s/crlf": "abc\r\n", "/run/s/two": "x\n\n",
         "/run/s/empty": "\n", "/run/s/bare": "raw"}


def read(path: str) -> str:
    if path not in FILES:
        raise FileNotFoundError(path)
    return FILES[path]


@pytest.mark.parametrize(("path", "value"), [
    ("/run/s/token", "t0k"), ("/run/s/crlf", "abc"), ("/run/s/two", "x\n"),
    ("/run/s/bare", "raw"), ("/run/s/empty", None),
])
def test_a_file_holds_the_value_less_one_trailing_newline(path: str, value: str | None
                                                          ) -> None:
    assert secret({"TOKEN_FILE": path}, "TOKEN", read) == value


def test_the_variable_itself_and_empty_values() -> None:
    assert secret({"TOKEN": "v"}, "TOKEN", read) == "v"
    assert secret({"TOKEN": ""}, "TOKEN", read) is None
    assert secret({}, "TOKEN", read) is None
    # An empty variable next to a file is unset, not a second value.
    assert secret({"TOKEN": "", "TOKEN_FILE": "/run/s/token"}, "TOKEN", read) == "t0k"


def test_both_set_is_an_error_naming_both() -> None:
    with pytest.raises(SecretFileError, match="TOKEN and TOKEN_FILE are both set"):
        secret({"TOKEN": "v", "TOKEN_FILE": "/run/s/token"}, "TOKEN", read)


def test_a_missing_file_is_an_error_naming_variable_and_path() -> None:
    with pytest.raises(SecretFileError, match="TOKEN_FILE='/run/s/nope'.*FileNotFoundError"):
        secret({"TOKEN_FILE": "/run/s/nope"}, "TOKEN", read)


def test_with_secrets_resolves_only_the_names_given() -> None:
    env = {"A_FILE": "/run/s/token", "B": "", "C_FILE": "/run/s/nope", "D": "d"}
    out = with_secrets(env, ("A", "B", "D"), read)
    assert out == {"A_FILE": "/run/s/token", "A": "t0k", "C_FILE": "/run/s/nope", "D": "d"}
    with pytest.raises(SecretFileError, match="C_FILE"):
        with_secrets(env, ("C",), read)


def test_secret_env_reads_any_name_on_lookup() -> None:
    env = SecretEnv({"KEY_FILE": "/run/s/token", "OTHER": "o", "NONE_FILE": "/run/s/empty"},
                    read)
    assert (env.get("KEY"), env["OTHER"], env.get("NONE"), env.get("ABSENT")) == (
        "t0k", "o", None, None)
    assert sorted(env) == ["KEY", "OTHER"] and len(env) == 2
