"""Secret settings given as the variable itself or as a file named by ``NAME_FILE``.

Kubernetes and compose hand secrets to a container as files; every secret setting
``NAME`` may therefore come as ``NAME`` or as ``NAME_FILE``, the path of a file holding
the value (the convention of the official PostgreSQL image). The rules, the same in
both services:

- the file's content is the value, with one trailing newline (``\\n`` or ``\\r\\n``)
  removed, so ``echo secret > file`` works;
- ``NAME`` and ``NAME_FILE`` both set is an error naming both;
- ``NAME_FILE`` naming a file that is missing or unreadable is an error naming the
  variable and the path, never a silent empty secret;
- an empty value, from either, is the same as unset.

Pure: the caller hands in the environment and the function that reads a file, and
turns ``SecretFileError`` into its own settings error. Imports only the standard
library; never ``proxy`` or ``control_plane``.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterator, Mapping

FILE_SUFFIX = "_FILE"

Reader = Callable[[str], str]  # a path → the file's text; raises OSError if unreadable


class SecretFileError(ValueError):
    """A secret given twice, or its file unreadable; the message names the variables."""


def secret(env: Mapping[str, str], name: str, read: Reader) -> str | None:
    """``name``'s value from the variable or from the file ``name_FILE`` names; None if
    unset or empty."""
    value = env.get(name, "")
    file_var = name + FILE_SUFFIX
    path = env.get(file_var, "")
    if value and path:
        raise SecretFileError(f"{name} and {file_var} are both set: set only one")
    if not path:
        return value or None
    try:
        text = read(path)
    except (OSError, UnicodeDecodeError) as e:
        # The error's class, not its text: no part of a secret ever reaches a message.
        raise SecretFileError(
            f"{file_var}={path!r} cannot be read ({type(e).__name__})") from None
    if text.endswith("\n"):
        text = text[:-2] if text.endswith("\r\n") else text[:-1]
    return text or None


def with_secrets(env: Mapping[str, str], names: Collection[str], read: Reader
                 ) -> dict[str, str]:
    """A copy of ``env`` in which each of ``names`` holds its value from the variable or
    its file, and is absent if that is empty; every one of them checked now."""
    out = dict(env)
    for name in names:
        value = secret(env, name, read)
        if value is None:
            out.pop(name, None)
        else:
            out[name] = value
    return out


class SecretEnv(Mapping[str, str]):
    """``env`` where every name looked up may come as ``NAME_FILE``, checked on lookup.

    For secrets whose names are known only later, such as the provider key variables a
    catalog names (``api_key_env``).
    """

    def __init__(self, env: Mapping[str, str], read: Reader) -> None:
        self._env = env
        self._read = read

    def __getitem__(self, name: str) -> str:
        value = secret(self._env, name, self._read)
        if value is None:
            raise KeyError(name)
        return value

    def __iter__(self) -> Iterator[str]:
        seen: set[str] = set()
        for name in self._env:
            base = name.removesuffix(FILE_SUFFIX)
            if base not in seen and self.get(base) is not None:
                seen.add(base)
                yield base

    def __len__(self) -> int:
        return sum(1 for _ in self)
