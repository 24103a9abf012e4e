"""deploy/kubernetes: every manifest, base and rendered overlays, valid by the Kubernetes
schemas (kubernetes-validate, offline), and the promises the runbook makes about them."""

from __future__ import annotations

import copy
import tomllib
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from proxy.catalog import load as load_catalog
from tests.deploy import manifests
from tests.deploy.manifests import ADAPTER_RULES, BASE, OVERLAYS, Doc, by_kind, containers

# The oldest release the manifests promise to work on (preStop exec, autoscaling/v2,
# policy/v1 all GA well before) and the newest the validator knows.
KUBERNETES_VERSIONS = ("1.29.0", "1.37.0")
COMPONENTS = ("proxy", "web", "ingest", "admin")

@pytest.fixture(scope="module")
def rendered() -> dict[str, list[Doc]]:
    """``kustomize build`` of the base and of every overlay."""
    out = {"base": manifests.render(BASE)}
    out |= {f"overlays/{o.name}": manifests.render(o) for o in OVERLAYS}
    return out


def _sets(rendered: dict[str, list[Doc]]) -> list[tuple[str, list[Doc]]]:
    return sorted(rendered.items())


def _workload(docs: list[Doc], component: str) -> Doc:
    (found,) = [d for d in docs if d["kind"] == "Deployment"
                and d["spec"]["template"]["metadata"]["labels"].get(
                    "app.kubernetes.io/component") == component]
    return found


def _main(deployment: Doc) -> Doc:
    return deployment["spec"]["template"]["spec"]["containers"][0]


def test_there_is_an_example_overlay() -> None:
    assert [o.name for o in OVERLAYS] == ["example"]


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_every_base_manifest_validates(version: str) -> None:
    docs = [d for p in manifests.base_resource_files() for d in manifests.load_docs(p)]
    assert len(docs) >= 15
    for doc in docs:
        kubernetes_validate.validate(doc, version, strict=True)


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_every_rendered_manifest_validates(rendered: dict[str, list[Doc]], version: str) -> None:
    for _, docs in _sets(rendered):
        for doc in docs:
            kubernetes_validate.validate(doc, version, strict=True)
    assert {d["kind"] for d in rendered["overlays/example"]} >= {
        "Namespace", "Deployment", "Service", "HorizontalPodAutoscaler",
        "PodDisruptionBudget", "NetworkPolicy", "Secret", "ConfigMap"}


@pytest.mark.parametrize("break_it", [
    lambda d: d["spec"]["template"]["spec"]["containers"][0]["readinessProbe"].update(
        httpGett={"path": "/readyz"}),
    lambda d: d["spec"].update(revisionHistoryLimit="five"),
    lambda d: d["spec"]["template"]["spec"]["containers"][0].pop("name"),
])
def test_validation_catches_mistakes(break_it: Any) -> None:
    """Not vacuous: a misspelt field, a wrong type and a missing required field fail."""
    doc = copy.deepcopy(manifests.load_docs(BASE / "proxy.yaml")[0])
    kubernetes_validate.validate(doc, KUBERNETES_VERSIONS[0], strict=True)
    break_it(doc)
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(doc, KUBERNETES_VERSIONS[0], strict=True)


def test_probes_use_readyz_and_healthz_on_real_ports(rendered: dict[str, list[Doc]]) -> None:
    for where, docs in _sets(rendered):
        proxy = _main(_workload(docs, "proxy"))
        assert proxy["readinessProbe"]["httpGet"]["path"] == "/readyz", where
        assert proxy["livenessProbe"]["httpGet"]["path"] == "/healthz", where
        for component in COMPONENTS:
            container = _main(_workload(docs, component))
            ports = {p["name"] for p in container["ports"]}
            for probe in ("readinessProbe", "livenessProbe"):
                assert container[probe]["httpGet"]["port"] in ports, (where, component, probe)


def test_grace_outlasts_prestop_and_shutdown_grace(rendered: dict[str, list[Doc]]) -> None:
    for where, docs in _sets(rendered):
        for component in COMPONENTS:
            pod = _workload(docs, component)["spec"]["template"]["spec"]
            container = pod["containers"][0]
            grace = float(manifests.env_value(container, "QNP_SHUTDOWN_GRACE") or 30)
            pre_stop = container.get("lifecycle", {}).get("preStop", {})
            sleep = float(pre_stop["exec"]["command"][1]) if pre_stop else 0.0
            assert pod["terminationGracePeriodSeconds"] > sleep + grace, (where, component)
        proxy = _main(_workload(docs, "proxy"))
        assert proxy["lifecycle"]["preStop"]["exec"]["command"][0] == "sleep"


def _cpu(value: str | int) -> float:
    text = str(value)
    return float(text[:-1]) / 1000 if text.endswith("m") else float(text)


def _bytes(value: str) -> float:
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30}
    return float(value[:-2]) * units[value[-2:]] if value[-2:] in units else float(value)


def test_every_container_has_requests_and_limits(rendered: dict[str, list[Doc]]) -> None:
    for where, docs in _sets(rendered):
        for name, spec in manifests.pod_specs(docs):
            for container in containers(spec):
                requests = container["resources"]["requests"]
                limits = container["resources"]["limits"]
                assert _cpu(limits["cpu"]) >= _cpu(requests["cpu"]) > 0, (where, name)
                assert _bytes(limits["memory"]) >= _bytes(requests["memory"]) > 0
        # One proxy worker per requested core, as the benchmark sizes them.
        proxy = _main(_workload(docs, "proxy"))
        workers = int(manifests.flag(proxy["args"], "--workers") or 1)
        assert _cpu(proxy["resources"]["requests"]["cpu"]) == workers, where


def test_pods_run_non_root_on_a_read_only_root(rendered: dict[str, list[Doc]]) -> None:
    for where, docs in _sets(rendered):
        for name, spec in manifests.pod_specs(docs):
            assert spec["securityContext"]["runAsNonRoot"] is True
            assert spec["automountServiceAccountToken"] is False
            empty_dirs = {v["name"] for v in spec["volumes"] if "emptyDir" in v}
            for container in containers(spec):
                context = container["securityContext"]
                assert context["readOnlyRootFilesystem"] is True, (where, name)
                assert context["allowPrivilegeEscalation"] is False
                assert context["capabilities"]["drop"] == ["ALL"]
                for mount in container.get("volumeMounts", []):
                    if not mount.get("readOnly"):
                        assert mount["name"] in empty_dirs, (where, name, mount)
        proxy = _main(_workload(docs, "proxy"))
        spool = manifests.env_value(proxy, "QNP_SPOOL_DIR")
        assert spool in {m["mountPath"] for m in proxy["volumeMounts"] if not m.get("readOnly")}


def test_proxy_autoscales_on_cpu_and_open_streams(rendered: dict[str, list[Doc]]) -> None:
    rules = yaml.safe_load(ADAPTER_RULES.read_text())["rules"]["custom"]
    adapter_metrics = {r["name"]["as"] for r in rules if "qnp_inflight_streams" in r["seriesQuery"]}
    for where, docs in _sets(rendered):
        (hpa,) = by_kind(docs, "HorizontalPodAutoscaler").values()
        target = hpa["spec"]["scaleTargetRef"]
        deployment = by_kind(docs, "Deployment")[target["name"]]
        assert deployment is _workload(docs, "proxy")
        assert "replicas" not in deployment["spec"], "the HPA owns replicas"
        kinds = {m["type"]: m for m in hpa["spec"]["metrics"]}
        assert kinds["Resource"]["resource"]["name"] == "cpu"
        assert kinds["Pods"]["pods"]["metric"]["name"] in adapter_metrics
        # Degraded admission's divisor covers the largest fleet the HPA can make.
        proxy = _main(deployment)
        workers = int(manifests.flag(proxy["args"], "--workers") or 1)
        fleet = int(manifests.env_value(proxy, "QNP_FLEET_PROCESSES") or 1)
        assert fleet >= hpa["spec"]["maxReplicas"] * workers, where


def test_every_deployment_has_a_disruption_budget(rendered: dict[str, list[Doc]]) -> None:
    for where, docs in _sets(rendered):
        budgets = list(by_kind(docs, "PodDisruptionBudget").values())
        for name, deployment in by_kind(docs, "Deployment").items():
            labels = deployment["spec"]["template"]["metadata"]["labels"]
            matching = [b for b in budgets if b["spec"]["selector"]["matchLabels"].items()
                        <= labels.items()]
            assert len(matching) == 1, (where, name)


def test_services_reach_named_ports_and_admin_stays_internal(
    rendered: dict[str, list[Doc]]
) -> None:
    for where, docs in _sets(rendered):
        deployments = list(by_kind(docs, "Deployment").values())
        for name, service in by_kind(docs, "Service").items():
            selected = [d for d in deployments if service["spec"]["selector"].items()
                        <= d["spec"]["template"]["metadata"]["labels"].items()]
            assert len(selected) == 1, (where, name)
            ports = {p["name"] for p in _main(selected[0])["ports"]}
            assert {p["targetPort"] for p in service["spec"]["ports"]} <= ports
        admin = by_kind(docs, "Service")["qnp-admin"]
        assert admin["spec"].get("type", "ClusterIP") == "ClusterIP", where


def test_network_policies_keep_admin_and_metrics_private(
    rendered: dict[str, list[Doc]]
) -> None:
    for where, docs in _sets(rendered):
        policies = list(by_kind(docs, "NetworkPolicy").values())
        for component in COMPONENTS:
            labels = _workload(docs, component)["spec"]["template"]["metadata"]["labels"]
            (policy,) = [p for p in policies
                         if p["spec"]["podSelector"]["matchLabels"].items() <= labels.items()]
            assert policy["spec"]["policyTypes"] == ["Ingress"]
            for rule in policy["spec"]["ingress"]:
                ports = {p["port"] for p in rule["ports"]}
                public = not rule.get("from")
                if component == "admin" or 9464 in ports:
                    assert not public, (where, component, rule)
                if public:
                    assert ports <= {8080, 8082}, (where, component, rule)
        admin_policy = next(p for p in policies if p["metadata"]["name"] == "qnp-admin")
        assert {p["port"] for r in admin_policy["spec"]["ingress"] for p in r["ports"]} == {8081}


def test_the_base_creates_no_secret() -> None:
    """Applying the base (or an overlay built on it) must never overwrite real keys."""
    for path in manifests.base_resource_files():
        assert all(d["kind"] != "Secret" for d in manifests.load_docs(path)), path
    kustomization = manifests.load_docs(BASE / "kustomization.yaml")[0]
    assert "secretGenerator" not in kustomization


def _secret_keys(docs: list[Doc]) -> dict[str, set[str]]:
    return {name: set(s.get("data", {})) | set(s.get("stringData", {}))
            for name, s in by_kind(docs, "Secret").items()}


@pytest.mark.parametrize("overlay", [o.name for o in OVERLAYS])
def test_every_secret_reference_resolves(rendered: dict[str, list[Doc]], overlay: str) -> None:
    """Env from secretKeyRef and every ``<NAME>_FILE`` path name a key that exists in a
    Secret the overlay makes, mounted where the path points."""
    docs = rendered[f"overlays/{overlay}"]
    secrets = _secret_keys(docs)
    files_checked = 0
    for name, spec in manifests.pod_specs(docs):
        secret_volumes = {v["name"]: v["secret"]["secretName"] for v in spec["volumes"]
                          if "secret" in v}
        for container in containers(spec):
            mounts = {m["mountPath"]: m["name"] for m in container.get("volumeMounts", [])}
            for var, entry in manifests.env_of(container).items():
                ref = entry.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    assert ref["key"] in secrets[ref["name"]], (name, var)
                if var.endswith("_FILE"):
                    folder, _, key = entry["value"].rpartition("/")
                    assert key == var.removesuffix("_FILE"), (name, var)
                    assert mounts[folder] in secret_volumes, (name, var)
                    assert key in secrets[secret_volumes[mounts[folder]]], (name, var)
                    files_checked += 1
    assert files_checked >= 10


def test_proxy_catalog_is_mounted_and_every_key_it_names_is_provided(
    rendered: dict[str, list[Doc]], tmp_path: Path
) -> None:
    for where, docs in _sets(rendered):
        deployment = _workload(docs, "proxy")
        proxy = _main(deployment)
        catalog_path = manifests.flag(proxy["args"], "--catalog")
        assert catalog_path is not None
        folder, _, filename = catalog_path.rpartition("/")
        (mount,) = [m for m in proxy["volumeMounts"] if m["mountPath"] == folder]
        (volume,) = [v for v in deployment["spec"]["template"]["spec"]["volumes"]
                     if v["name"] == mount["name"]]
        config_map = by_kind(docs, "ConfigMap")[volume["configMap"]["name"]]
        text = config_map["data"][filename]
        names = {p["api_key_env"] for p in tomllib.loads(text)["providers"].values()}
        env = manifests.env_of(proxy)
        for name in names:
            assert name in env or f"{name}_FILE" in env, (where, name)
        # The proxy would load it: every model priced, every provider known.
        (tmp_path / "catalog.toml").write_text(text)
        catalog = load_catalog(tmp_path / "catalog.toml", {n: "placeholder" for n in names})
        assert catalog.models, where


def test_prometheus_scrapes_a_port_each_pod_listens_on(rendered: dict[str, list[Doc]]) -> None:
    """A wrong port in the scrape annotation leaves the dashboards, and the HPA's
    stream metric, blind."""
    for where, docs in _sets(rendered):
        for component in COMPONENTS:
            template = _workload(docs, component)["spec"]["template"]
            annotations = template["metadata"]["annotations"]
            assert annotations["prometheus.io/scrape"] == "true"
            assert annotations["prometheus.io/path"] == "/metrics"
            ports = {p["containerPort"] for p in template["spec"]["containers"][0]["ports"]}
            assert int(annotations["prometheus.io/port"]) in ports, (where, component)
