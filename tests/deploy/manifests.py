"""The deployment files under deploy/, loaded for the tests: compose, the Kubernetes
base and overlays (rendered with kustomize), and the commands they give the image.

Owns: where those files are, YAML loading, kustomize rendering (``kustomize build`` or
``kubectl kustomize`` — kustomize's own code, no cluster contacted — and, where neither
is installed, the small renderer in ``tests/deploy/kustomize.py``) and walking the pod
templates of a set of Kubernetes objects. Imports nothing from the services.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

from tests.deploy import kustomize

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
COMPOSE = DEPLOY / "compose.yaml"
DOCKERFILE = DEPLOY / "Dockerfile"
KUBERNETES = DEPLOY / "kubernetes"
BASE = KUBERNETES / "base"
OVERLAYS = sorted(p.parent for p in (KUBERNETES / "overlays").glob("*/kustomization.yaml"))
ADAPTER_RULES = KUBERNETES / "prometheus-adapter" / "rules.yaml"

Doc = dict[str, Any]


def load_compose() -> Doc:
    doc = yaml.safe_load(COMPOSE.read_text())
    assert isinstance(doc, dict)
    return doc


def load_docs(path: Path) -> list[Doc]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def base_resource_files() -> list[Path]:
    """The plain manifests the base lists (not the kustomization itself)."""
    kustomization = load_docs(BASE / "kustomization.yaml")[0]
    return [BASE / name for name in kustomization["resources"]]


def kustomize_binary() -> list[str] | None:
    """How to run kustomize here: ``kustomize build`` or ``kubectl kustomize``."""
    if shutil.which("kustomize"):
        return ["kustomize", "build"]
    if shutil.which("kubectl"):
        return ["kubectl", "kustomize"]
    return None


def render(directory: Path) -> list[Doc]:
    """``kustomize build directory`` as a list of objects."""
    command = kustomize_binary()
    if command is None:
        return kustomize.render(directory)
    return render_with(command, directory)


def render_with(command: list[str], directory: Path) -> list[Doc]:
    result = subprocess.run(
        [*command, str(directory)], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
    return [d for d in yaml.safe_load_all(result.stdout) if d]


def by_kind(docs: list[Doc], kind: str) -> dict[str, Doc]:
    return {d["metadata"]["name"]: d for d in docs if d["kind"] == kind}


def pod_specs(docs: list[Doc]) -> Iterator[tuple[str, Doc]]:
    """``(workload name, pod spec)`` of every Deployment (and Job/StatefulSet)."""
    for d in docs:
        if d["kind"] in {"Deployment", "StatefulSet", "DaemonSet", "Job"}:
            yield d["metadata"]["name"], d["spec"]["template"]["spec"]


def containers(spec: Doc, *, init: bool = True) -> list[Doc]:
    found = list(spec.get("containers", []))
    return found + list(spec.get("initContainers", [])) if init else found


def env_of(container: Doc) -> dict[str, Doc]:
    """A container's env entries by name (each the whole entry: value or valueFrom)."""
    return {e["name"]: e for e in container.get("env", [])}


def env_value(container: Doc, name: str) -> str | None:
    entry = env_of(container).get(name)
    return None if entry is None else entry.get("value")


def flag(args: list[str], name: str) -> str | None:
    """The value after ``name`` in an argument list."""
    return args[args.index(name) + 1] if name in args else None
