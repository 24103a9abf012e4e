"""tests/deploy/kustomize.py, the renderer used where no kustomize is installed: it must
render our kustomizations exactly as kustomize does, and merge the way kustomize merges.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tests.deploy import kustomize, manifests
from tests.deploy.manifests import BASE, OVERLAYS, Doc


def _comparable(docs: list[Doc]) -> list[str]:
    """Objects as sorted JSON, with what may differ between the two renderers evened
    out: the digits of generated names' hash suffixes, and line breaks kubectl puts into
    long base64 values (the API server ignores them)."""
    docs = json.loads(json.dumps(docs))
    for doc in docs:
        if doc["kind"] == "Secret":
            doc["data"] = {k: "".join(v.split()) for k, v in doc["data"].items()}
    text = json.dumps(docs, sort_keys=True)
    for doc in docs:
        if doc["kind"] in {"ConfigMap", "Secret"}:
            name = doc["metadata"]["name"]
            stem, _, suffix = name.rpartition("-")
            assert len(suffix) == 10 and suffix.isalnum(), name
            text = text.replace(f'"{name}"', f'"{stem}-HASH"')
    return sorted(json.dumps(d, sort_keys=True) for d in json.loads(text))


@pytest.mark.skipif(manifests.kustomize_binary() is None, reason="no kustomize to compare with")
@pytest.mark.parametrize("directory", [BASE, *OVERLAYS], ids=lambda p: p.name)
def test_renders_what_kustomize_renders(directory: Path) -> None:
    command = manifests.kustomize_binary()
    assert command is not None
    theirs = manifests.render_with(command, directory)
    ours = kustomize.render(directory)
    assert len(ours) == len(theirs)
    assert _comparable(ours) == _comparable(theirs)


def test_a_changed_catalog_changes_the_name_pods_mount(tmp_path: Path) -> None:
    """The point of the hash suffix: new content, new name, so the Deployment rolls."""
    (tmp_path / "kustomization.yaml").write_text(
        "resources: [deploy.yaml]\nconfigMapGenerator:\n- name: cat\n  files: [c.toml]\n")
    (tmp_path / "deploy.yaml").write_text(
        "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: d}\nspec:\n  template:\n"
        "    spec:\n      containers: [{name: c, image: i}]\n"
        "      volumes: [{name: v, configMap: {name: cat}}]\n")
    names = []
    for content in ("a = 1\n", "a = 2\n"):
        (tmp_path / "c.toml").write_text(content)
        docs = kustomize.render(tmp_path)
        (config_map,) = [d for d in docs if d["kind"] == "ConfigMap"]
        (deployment,) = [d for d in docs if d["kind"] == "Deployment"]
        mounted = deployment["spec"]["template"]["spec"]["volumes"][0]["configMap"]["name"]
        assert mounted == config_map["metadata"]["name"]
        assert "annotations" not in config_map["metadata"]
        names.append(mounted)
    assert names[0] != names[1] and all(n.startswith("cat-") for n in names)


def test_lists_of_named_things_merge_by_name_and_others_are_replaced() -> None:
    target = {"containers": [{"name": "a", "args": ["x", "--workers", "2"],
                              "env": [{"name": "A", "value": "1"}, {"name": "B", "value": "2"}]},
                             {"name": "b", "image": "i"}]}
    patch = {"containers": [{"name": "a", "args": ["--workers", "4"],
                             "env": [{"name": "B", "value": "3"}, {"name": "C", "value": "4"}]}]}
    merged = kustomize.strategic_merge(target, patch)
    a, b = merged["containers"]
    assert b == {"name": "b", "image": "i"}  # untouched element kept
    assert a["args"] == ["--workers", "4"]  # a plain list is replaced whole
    # kustomize puts the patched elements first, then the ones the patch left alone.
    assert a["env"] == [{"name": "B", "value": "3"}, {"name": "C", "value": "4"},
                        {"name": "A", "value": "1"}]
    assert target["containers"][0]["env"][1]["value"] == "2", "the input is not changed"


def test_null_in_a_strategic_patch_deletes_the_key() -> None:
    merged = kustomize.strategic_merge({"spec": {"replicas": 2, "x": 1}},
                                       {"spec": {"replicas": None}})
    assert merged == {"spec": {"x": 1}}


def test_json_patch_operations() -> None:
    doc = {"spec": {"minReplicas": 2, "metrics": [{"a": 1}]}}
    out = kustomize.json6902(doc, [
        {"op": "replace", "path": "/spec/minReplicas", "value": 3},
        {"op": "add", "path": "/spec/metrics/-", "value": {"b": 2}},
        {"op": "remove", "path": "/spec/metrics/0"},
    ])
    assert out == {"spec": {"minReplicas": 3, "metrics": [{"b": 2}]}}
    with pytest.raises(kustomize.KustomizeError):
        kustomize.json6902(doc, [{"op": "replace", "path": "/spec/maxReplicas", "value": 1}])


@pytest.mark.parametrize("field", [
    "namePrefix: x-\n",
    "replicas: [{name: d, count: 2}]\n",
    "labels: [{pairs: {a: b}, includeSelectors: true}]\n",
])
def test_what_it_cannot_do_is_an_error_not_a_guess(tmp_path: Path, field: Any) -> None:
    (tmp_path / "kustomization.yaml").write_text("resources: []\n" + field)
    with pytest.raises(kustomize.KustomizeError):
        kustomize.render(tmp_path)
