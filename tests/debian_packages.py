"""Debian packages some tests need (Chromium for the browser tests; redis-server and
PostgreSQL built with OpenSSL for the TLS tests), installed here when missing.

A fresh machine of this project's kind has Python and pip; the test set-up runs as root
there and may install Debian packages, so a missing one is installed, once per session,
and the tests run: never skipped. Where that is impossible (not root, no apt-get) the
test fails loudly, naming the command that would fix it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Callable

APT_TIMEOUT_S = 1200

_updated: list[bool] = []  # `apt-get update` runs at most once per session


class PackageMissing(RuntimeError):
    """A package could not be installed; the message says how to install it."""


def _apt(*args: str) -> None:
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    done = subprocess.run(["apt-get", *args], env=env, capture_output=True, text=True,
                          timeout=APT_TIMEOUT_S, check=False)
    if done.returncode != 0:
        raise PackageMissing(f"`apt-get {' '.join(args)}` failed ({done.returncode}):\n"
                             f"{done.stderr[-3000:]}")


def ensure(package: str, present: Callable[[], bool]) -> None:
    """Install ``package`` unless ``present()``; ``present()`` must hold afterwards."""
    if present():
        return
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        raise PackageMissing(f"the Debian package {package} is missing and cannot be "
                             f"installed here (needs root and apt-get): run "
                             f"`apt-get install -y {package}` and test again")
    if not _updated:
        _apt("update")
        _updated.append(True)
    _apt("install", "-y", "--no-install-recommends", package)
    if not present():
        raise PackageMissing(f"apt-get installed {package}, but what the tests need of it "
                             "is still missing")
