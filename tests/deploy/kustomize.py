"""A small kustomize, for machines without one: renders the kustomizations under
deploy/kubernetes when neither ``kustomize`` nor ``kubectl`` is on PATH.

Owns exactly the kustomization fields those files use — ``resources`` (files and
directories), ``namespace``, ``labels`` (``pairs``, metadata only), ``images``,
``configMapGenerator`` (``files``; ``behavior`` create or replace),
``secretGenerator`` (``literals``) and ``patches`` (a strategic-merge file by
``path``, or an inline JSON 6902 ``patch`` with a ``target``) — and refuses any other
field, so a kustomization that grows past it fails loudly instead of rendering wrong.
Generated names get a content-hash suffix like kustomize's (same length and alphabet,
not the same digits), and every reference to them in pod templates follows.
tests/deploy/test_kustomize.py checks the output equals ``kubectl kustomize``'s, hash
digits aside, wherever kubectl exists.
"""

from __future__ import annotations

import base64
import copy
import hashlib
import json
from pathlib import Path
from typing import Any

import yaml

Doc = dict[str, Any]

SUPPORTED = {"apiVersion", "kind", "resources", "namespace", "labels", "images",
             "configMapGenerator", "secretGenerator", "patches"}
CLUSTER_SCOPED = {"Namespace", "ClusterRole", "ClusterRoleBinding", "PersistentVolume",
                  "StorageClass", "CustomResourceDefinition", "PriorityClass"}
# Lists merged element by element (by this key) in a strategic merge; others replace.
MERGE_KEYS = {"containers": "name", "initContainers": "name", "env": "name",
              "volumes": "name", "volumeMounts": "mountPath"}
_NEEDS_HASH = "needs-hash"


class KustomizeError(ValueError):
    """The kustomization uses something this renderer does not do."""


def strategic_merge(target: Any, patch: Any, field: str | None = None) -> Any:
    """``patch`` merged into ``target`` the way kustomize merges these objects: maps
    recursively (a ``null`` deletes the key), lists named in MERGE_KEYS by their key
    (patched elements first, then the untouched ones), any other list replaced."""
    if isinstance(patch, dict) and isinstance(target, dict):
        merged = dict(target)
        for key, value in patch.items():
            if value is None:
                merged.pop(key, None)
            elif key in merged:
                merged[key] = strategic_merge(merged[key], value, key)
            else:
                merged[key] = copy.deepcopy(value)
        return merged
    if isinstance(patch, list) and isinstance(target, list) and field in MERGE_KEYS:
        key = MERGE_KEYS[field]
        by_key = {item[key]: item for item in target if isinstance(item, dict) and key in item}
        patched = [strategic_merge(by_key[p[key]], p, None) if p[key] in by_key
                   else copy.deepcopy(p) for p in patch]
        touched = {p[key] for p in patch}
        return patched + [t for t in target if t.get(key) not in touched]
    return copy.deepcopy(patch)


def json6902(doc: Doc, operations: list[Doc]) -> Doc:
    """``replace``, ``add`` and ``remove`` at JSON-pointer paths."""
    doc = copy.deepcopy(doc)
    for op in operations:
        *parents, last = [p.replace("~1", "/").replace("~0", "~")
                          for p in op["path"].lstrip("/").split("/")]
        node: Any = doc
        for part in parents:
            node = node[int(part)] if isinstance(node, list) else node[part]
        key: Any = int(last) if isinstance(node, list) and last != "-" else last
        if op["op"] in {"replace", "add"}:
            if isinstance(node, list) and op["op"] == "add":
                node.insert(len(node) if key == "-" else key, op["value"])
            else:
                if op["op"] == "replace" and (key not in node if isinstance(node, dict)
                                              else key >= len(node)):
                    raise KustomizeError(f"replace at missing {op['path']}")
                node[key] = op["value"]
        elif op["op"] == "remove":
            del node[key]
        else:
            raise KustomizeError(f"JSON patch op {op['op']!r}")
    return doc


def _key(doc: Doc) -> tuple[str, str]:
    return doc["kind"], doc["metadata"]["name"]


def _find(docs: list[Doc], kind: str, name: str) -> int:
    found = [i for i, d in enumerate(docs) if _key(d) == (kind, name)]
    if len(found) != 1:
        raise KustomizeError(f"{kind}/{name}: {len(found)} matches")
    return found[0]


def _generated(kind: str, name: str, data: dict[str, str]) -> Doc:
    doc: Doc = {"apiVersion": "v1", "kind": kind,
                "metadata": {"name": name, "annotations": {_NEEDS_HASH: "true"}}, "data": data}
    if kind == "Secret":
        doc["type"] = "Opaque"
    return doc


def _generate(directory: Path, spec: Doc, docs: list[Doc]) -> None:
    for entry in spec.get("configMapGenerator", []):
        unknown = set(entry) - {"name", "files", "behavior"}
        if unknown:
            raise KustomizeError(f"configMapGenerator fields {sorted(unknown)}")
        data = {Path(f).name: (directory / f).read_text() for f in entry["files"]}
        behavior = entry.get("behavior", "create")
        if behavior == "create":
            docs.append(_generated("ConfigMap", entry["name"], data))
        elif behavior == "replace":
            docs[_find(docs, "ConfigMap", entry["name"])]["data"] = data
        else:
            raise KustomizeError(f"configMapGenerator behavior {behavior!r}")
    for entry in spec.get("secretGenerator", []):
        if set(entry) - {"name", "literals"}:
            raise KustomizeError(f"secretGenerator fields {sorted(set(entry))}")
        pairs = (literal.split("=", 1) for literal in entry["literals"])
        docs.append(_generated("Secret", entry["name"], {
            k: base64.b64encode(v.encode()).decode() for k, v in pairs}))


def _patch(directory: Path, spec: Doc, docs: list[Doc]) -> None:
    for entry in spec.get("patches", []):
        if "path" in entry:
            for patch in yaml.safe_load_all((directory / entry["path"]).read_text()):
                i = _find(docs, patch["kind"], patch["metadata"]["name"])
                docs[i] = strategic_merge(docs[i], patch)
        elif "patch" in entry and "target" in entry:
            i = _find(docs, entry["target"]["kind"], entry["target"]["name"])
            docs[i] = json6902(docs[i], yaml.safe_load(entry["patch"]))
        else:
            raise KustomizeError(f"patch {entry}")


def _pod_spec(doc: Doc) -> Doc | None:
    spec = doc.get("spec", {}).get("template", {}).get("spec")
    return spec if isinstance(spec, dict) else None


def _transform(spec: Doc, docs: list[Doc]) -> None:
    for doc in docs:
        metadata = doc["metadata"]
        if "namespace" in spec and doc["kind"] not in CLUSTER_SCOPED:
            metadata["namespace"] = spec["namespace"]
        for group in spec.get("labels", []):
            metadata["labels"] = {**metadata.get("labels", {}), **group["pairs"]}
        pod = _pod_spec(doc)
        for image in spec.get("images", []) if pod else []:
            for container in pod.get("containers", []) + pod.get("initContainers", []):
                name = container["image"].split("@")[0].rsplit(":", 1)[0]
                if name == image["name"]:
                    container["image"] = f"{image.get('newName', name)}:{image['newTag']}"


def _build(directory: Path) -> list[Doc]:
    spec = yaml.safe_load((directory / "kustomization.yaml").read_text())
    unknown = set(spec) - SUPPORTED
    if unknown:
        raise KustomizeError(f"{directory}: kustomization fields {sorted(unknown)}")
    if any(set(group) - {"pairs"} for group in spec.get("labels", [])):
        raise KustomizeError("labels: only `pairs` (metadata labels) is supported")
    docs: list[Doc] = []
    for resource in spec.get("resources", []):
        path = directory / resource
        if path.is_dir():
            docs += _build(path)
        else:
            docs += [d for d in yaml.safe_load_all(path.read_text()) if d]
    _generate(directory, spec, docs)
    _patch(directory, spec, docs)
    _transform(spec, docs)
    return docs


def _hash_suffix(doc: Doc) -> str:
    text = json.dumps({"kind": doc["kind"], "name": doc["metadata"]["name"],
                       "data": doc.get("data", {})}, sort_keys=True, separators=(",", ":"))
    digest = hashlib.sha256(text.encode()).hexdigest()[:10]
    return digest.translate(str.maketrans("013ae", "ghkmt"))  # kustomize's alphabet


def _rename_references(pod: Doc, renamed: dict[tuple[str, str], str]) -> None:
    for volume in pod.get("volumes", []):
        if "configMap" in volume:
            ref = volume["configMap"]
            ref["name"] = renamed.get(("ConfigMap", ref["name"]), ref["name"])
        if "secret" in volume:
            ref = volume["secret"]
            ref["secretName"] = renamed.get(("Secret", ref["secretName"]), ref["secretName"])
    for container in pod.get("containers", []) + pod.get("initContainers", []):
        for entry in container.get("env", []):
            source = entry.get("valueFrom", {})
            for field, kind in (("secretKeyRef", "Secret"), ("configMapKeyRef", "ConfigMap")):
                if field in source:
                    ref = source[field]
                    ref["name"] = renamed.get((kind, ref["name"]), ref["name"])
        if "envFrom" in container:
            raise KustomizeError("envFrom references are not followed")


def render(directory: Path) -> list[Doc]:
    """What ``kustomize build directory`` prints, as objects."""
    docs = copy.deepcopy(_build(directory))
    renamed: dict[tuple[str, str], str] = {}
    for doc in docs:
        annotations = doc["metadata"].get("annotations", {})
        if annotations.pop(_NEEDS_HASH, None):
            if not annotations:
                del doc["metadata"]["annotations"]
            new_name = f"{doc['metadata']['name']}-{_hash_suffix(doc)}"
            renamed[_key(doc)] = new_name
            doc["metadata"]["name"] = new_name
    for doc in docs:
        pod = _pod_spec(doc)
        if pod is not None:
            _rename_references(pod, renamed)
    return docs
