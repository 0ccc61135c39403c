"""The Kubernetes manifests (deploy/k8s), as `kubectl kustomize` renders each of the two paths.

Every rendered object is validated strictly against the Kubernetes OpenAPI schemas (kubernetes-validate,
which refuses unknown fields), at the oldest release the manifests need (1.30: the preStop sleep action) and
the newest it knows. The Prometheus Operator's kinds are not in those schemas: ServiceMonitor and
PrometheusRule are parsed with models generated from the operator's CRDs
(cloudcoil-models-prometheus-operator) and must survive the round trip unchanged (a misspelt field would be
dropped, and fail), and the rule expressions go through `promtool check rules`. Then the numbers that must
agree with the service do: probes, drain, resources, the autoscaler's metric, the alerts; and yamllint
lints the files as written.

    python tests/test_k8s.py --write-rules   # regenerate base/prometheusrule.yaml from the compose alerts
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections.abc import Callable
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
K8S = REPO / "deploy" / "k8s"
ALERTS = REPO / "docker" / "prometheus" / "alerts.yml"
RULE_FILE = K8S / "base" / "prometheusrule.yaml"
PATHS = {"in-process": K8S / "base", "triton-gpu": K8S / "overlays" / "triton-gpu"}
SCHEMA_VERSIONS = ("1.30.0", "latest")
CRD_KINDS = {"ServiceMonitor", "PrometheusRule"}


def prometheus_rule() -> dict[str, Any]:
    """The PrometheusRule object: docker/prometheus/alerts.yml's groups, unchanged (one source of truth)."""
    return {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PrometheusRule",
        "metadata": {
            "name": "cervigate",
            # Prometheus's ruleSelector must match this (the kube-prometheus-stack default selects its own
            # release label: add it here, or set ruleSelectorNilUsesHelmValues=false).
            "labels": {"app.kubernetes.io/name": "cervigate", "app.kubernetes.io/part-of": "cervigate"},
        },
        "spec": {"groups": yaml.safe_load(ALERTS.read_text())["groups"]},
    }


def _block_strings(dumper: yaml.SafeDumper, text: str) -> yaml.ScalarNode:
    style = "|" if "\n" in text else None  # multi-line PromQL stays readable
    return dumper.represent_scalar("tag:yaml.org,2002:str", text, style=style)


def rule_file_text() -> str:
    class Dumper(yaml.SafeDumper):
        pass

    Dumper.add_representer(str, _block_strings)
    header = "# Generated from docker/prometheus/alerts.yml by `python tests/test_k8s.py --write-rules`.\n"
    return header + yaml.dump(prometheus_rule(), Dumper=Dumper, sort_keys=False, width=200)


@cache
def render(path: str) -> tuple[dict[str, Any], ...]:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip(
            "kubectl (with its built-in kustomize, v4 or newer) is not installed: install kubectl 1.21+"
        )
    result = subprocess.run(
        [kubectl, "kustomize", str(PATHS[path])], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
    return tuple(doc for doc in yaml.safe_load_all(result.stdout) if doc)


def _one(docs: tuple[dict[str, Any], ...], kind: str, name: str) -> dict[str, Any]:
    [found] = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    return found


@pytest.mark.parametrize("version", SCHEMA_VERSIONS)
@pytest.mark.parametrize("path", PATHS)
def test_every_rendered_object_is_valid_for_kubernetes(path: str, version: str) -> None:
    import kubernetes_validate

    desired = kubernetes_validate.latest_version() if version == "latest" else version
    docs = render(path)
    kinds = {"Deployment", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget", "NetworkPolicy"}
    assert {d["kind"] for d in docs} >= kinds | {"ConfigMap", *CRD_KINDS}
    for doc in docs:
        if doc["kind"] not in CRD_KINDS:
            kubernetes_validate.validate(doc, desired, strict=True)  # raises, naming the field


@pytest.mark.parametrize("path", PATHS)
def test_the_prometheus_operator_objects_fit_the_operator_crds(path: str) -> None:
    from cloudcoil.models.prometheus_operator import v1

    models: dict[str, Callable[..., Any]] = {
        "ServiceMonitor": v1.ServiceMonitor.model_validate,
        "PrometheusRule": v1.PrometheusRule.model_validate,
    }
    for doc in render(path):
        if doc["kind"] in CRD_KINDS:
            parsed = models[doc["kind"]](doc)
            assert parsed.model_dump(by_alias=True, exclude_unset=True, mode="json") == doc


def test_the_prometheus_rule_is_the_compose_alerts_and_promtool_accepts_it(tmp_path: Path) -> None:
    assert RULE_FILE.read_text() == rule_file_text(), "run `python tests/test_k8s.py --write-rules`"
    rule = _one(render("in-process"), "PrometheusRule", "cervigate")
    assert rule["spec"]["groups"] == yaml.safe_load(ALERTS.read_text())["groups"]
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed (Debian package prometheus; .ci/run installs it)")
    rules = tmp_path / "rules.yml"
    rules.write_text(yaml.safe_dump({"groups": rule["spec"]["groups"]}))
    result = subprocess.run(
        [promtool, "check", "rules", str(rules)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_manifests_pass_yamllint() -> None:
    """What a YAML linter catches and a schema does not: duplicate keys, odd indentation, stray spaces."""
    from yamllint import linter
    from yamllint.config import YamlLintConfig

    config = YamlLintConfig(file=str(K8S / ".yamllint.yaml"))
    problems = [
        f"{path.relative_to(REPO)}:{problem.line}: {problem.message}"
        for path in sorted(K8S.rglob("*.yaml"))
        if path.name != ".yamllint.yaml"
        for problem in linter.run(path.read_text(), config, str(path.relative_to(K8S)))
    ]
    assert problems == []


def _cervigate(docs: tuple[dict[str, Any], ...]) -> tuple[dict[str, Any], dict[str, str]]:
    pod = _one(docs, "Deployment", "cervigate")["spec"]["template"]["spec"]
    return pod, _one(docs, "ConfigMap", "cervigate-settings")["data"]


def _settings(env: dict[str, str]) -> Any:
    from service.settings import Settings

    return Settings(**{k.removeprefix("CERVIGATE_").lower(): v for k, v in env.items()})


@pytest.mark.parametrize("path", PATHS)
def test_probes_and_the_termination_grace_follow_the_drain(path: str) -> None:
    pod, env = _cervigate(render(path))
    [container] = pod["containers"]
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    settings = _settings(env)
    # The remote backend waits for its engine at start-up: the startup probe must outlast that wait.
    startup = container["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] > settings.remote_startup_wait_s
    pre_stop = container["lifecycle"]["preStop"]["sleep"]["seconds"]
    needed = pre_stop + settings.shutdown_drain_s + settings.shutdown_grace_s
    assert needed < pod["terminationGracePeriodSeconds"] <= needed + 5


@pytest.mark.parametrize("path", PATHS)
def test_resources_are_the_sizing_the_service_computes(path: str) -> None:
    from service import sizing

    pod, env = _cervigate(render(path))
    resources = pod["containers"][0]["resources"]
    assert resources["requests"] == resources["limits"]  # Guaranteed QoS: no CPU throttling surprises
    cpus = int(resources["limits"]["cpu"])
    memory = resources["limits"]["memory"]
    assert memory.endswith("Gi")
    limit = int(memory.removesuffix("Gi")) << 30
    settings = _settings(env)
    workers = min(settings.inference_workers, cpus)  # in the pod, the CPU quota caps the default workers
    bound = sizing.memory_bound(
        settings.max_inflight, settings.max_upload_bytes, workers, settings.max_pixels
    )
    assert bound.total <= limit, bound.describe()
    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())["services"]["cervigate"]
    assert compose["deploy"]["resources"]["limits"] == {"cpus": str(cpus), "memory": f"{limit >> 30}g"}
    assert {k: v for k, v in compose["environment"].items()} == {
        k: env[k] for k in ("CERVIGATE_MAX_INFLIGHT", "CERVIGATE_MAX_PIXELS")
    }


def test_the_autoscaler_scales_on_a_metric_the_service_exports_through_the_adapter() -> None:
    from prometheus_client import generate_latest
    from prometheus_client.parser import text_string_to_metric_families

    from service.telemetry import Metrics

    hpa = _one(render("in-process"), "HorizontalPodAutoscaler", "cervigate")
    assert hpa["spec"]["scaleTargetRef"]["name"] == "cervigate"
    by_type = {m["type"]: m for m in hpa["spec"]["metrics"]}
    assert by_type["Resource"]["resource"]["name"] == "cpu"
    pods_metric = by_type["Pods"]["pods"]["metric"]["name"]
    [rule] = yaml.safe_load((K8S / "prometheus-adapter" / "values.yaml").read_text())["rules"]["custom"]
    assert rule["name"]["as"] == pods_metric
    exported = {f.name for f in text_string_to_metric_families(generate_latest(Metrics().registry).decode())}
    assert rule["seriesQuery"].split("{")[0] in exported
    target = float(by_type["Pods"]["pods"]["target"]["averageValue"])
    _, env = _cervigate(render("in-process"))
    assert 0 < target < _settings(env).max_inflight  # pods are added before any of them sheds load


def test_the_gpu_path_points_cervigate_at_triton_serving_the_generated_repository() -> None:
    docs = render("triton-gpu")
    _, env = _cervigate(docs)
    settings = _settings(env)
    assert settings.inference_backend == "remote"
    service = _one(docs, "Service", "triton")
    http = next(p for p in service["spec"]["ports"] if p["name"] == "http")
    assert settings.remote_url == f"http://{service['metadata']['name']}:{http['port']}"
    triton = _one(docs, "Deployment", "triton")["spec"]["template"]["spec"]
    [init] = triton["initContainers"]
    assert init["command"][:3] == ["python", "-m", "service.triton_repo"] and "gpu" in init["command"]
    [server] = triton["containers"]
    assert f"--model-repository={init['command'][3]}" in server["args"]
    assert server["resources"]["limits"]["nvidia.com/gpu"] == "1"
    policy = _one(docs, "NetworkPolicy", "cervigate")
    allowed = [
        rule for rule in policy["spec"]["egress"] if any("podSelector" in t for t in rule.get("to", []))
    ]
    assert any(
        t["podSelector"]["matchLabels"] == service["spec"]["selector"]
        and rule["ports"][0]["port"] == http["port"]
        for rule in allowed
        for t in rule["to"]
        if "namespaceSelector" not in t
    )
    assert _one(docs, "Deployment", "cervigate")  # the CPU path's objects are all still there


if __name__ == "__main__":
    if sys.argv[1:] == ["--write-rules"]:
        RULE_FILE.write_text(rule_file_text())
        print(RULE_FILE)
    else:
        sys.exit(f"usage: python {sys.argv[0]} --write-rules")
