"""Baselines: our proxy as another git commit built it, measured as one more target in
the same run (``--baseline REF``), so a change's cost is a ratio of two figures taken
side by side, rounds alternating, on the same machine at the same time.

Owns: resolving a ref to its commit and exporting that commit's tracked files into a
folder of the run's temporary directory (``git archive``: a plain copy of the tree,
with nothing registered in the repository, so nothing is left behind there if the run
is killed; the folder goes with the run's temp dir). Must not import ``proxy`` or
``control_plane``: the baseline's own source is what runs.
"""

from __future__ import annotations

import io
import subprocess
import tarfile
from dataclasses import dataclass
from pathlib import Path

from benchmarks.stack import BASELINE_PREFIX, ROOT, file_name

_GIT_TIMEOUT = 60.0


class BaselineError(RuntimeError):
    """The ref names no commit, or its tree could not be exported."""


@dataclass(frozen=True, slots=True)
class Baseline:
    name: str  # the target's name: proxy@<ref as given>
    ref: str
    commit: str
    tree: Path

    def to_json(self) -> dict[str, str]:
        return {"ref": self.ref, "commit": self.commit}


def _git(args: list[str]) -> bytes:
    try:
        out = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, check=True,
                             timeout=_GIT_TIMEOUT)
    except subprocess.CalledProcessError as e:
        detail = e.stderr.decode(errors="replace").strip()
        raise BaselineError(f"git {' '.join(args)}: {detail}") from None
    except (OSError, subprocess.TimeoutExpired) as e:
        raise BaselineError(f"git {' '.join(args)}: {e}") from None
    return out.stdout


def name_for(ref: str) -> str:
    return BASELINE_PREFIX + ref


def export(ref: str, into: Path) -> Baseline:
    """``ref``'s commit, its tracked files written under ``into``."""
    commit = _git(["rev-parse", "--verify", "--end-of-options", f"{ref}^{{commit}}"])
    sha = commit.decode().strip()
    tree = into / f"baseline-{file_name(ref)}-{sha[:12]}"
    tree.mkdir(parents=True)
    with tarfile.open(fileobj=io.BytesIO(_git(["archive", "--format=tar", sha]))) as tar:
        if hasattr(tarfile, "data_filter"):  # Python 3.11.4+
            tar.extractall(tree, filter="data")
        else:  # our own repository's archive: no foreign paths to guard against
            tar.extractall(tree)  # noqa: S202
    if not (tree / "proxy" / "__main__.py").is_file():
        raise BaselineError(f"{ref} ({sha[:12]}) has no proxy/__main__.py to run")
    return Baseline(name_for(ref), ref, sha, tree)
