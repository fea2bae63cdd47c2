"""Prometheus for real: promtool accepts the config and rules, and every dashboard and alert expression is valid
and has data once the service has served a short load (see conftest.py)."""

from __future__ import annotations

import math
import os
import subprocess
from pathlib import Path

from tests.deploy.conftest import PROMETHEUS_DIR, Prometheus, Stack, prometheus_binaries
from tests.deploy.helpers import alert_rules, dashboard_targets, dashboards, metric_names, render_module, signal_of

WINDOW = "1m"  # $__rate_interval: the whole load and 2+ scrapes fall inside it

# Alert expressions that have data only while something is wrong, so under the healthy test load they are empty.
# They must still be valid PromQL that Prometheus evaluates without error, every metric they read must exist,
# and what they watch (the left side of the threshold, or what absent() looks for) must have data.
FIRES_ONLY_ON_FAILURE = {
    "IcmLoraTargetDown": "a replica does not answer scrapes",
    "IcmLoraNoTargets": "service discovery finds no replica",
    "IcmLoraHighErrorRate": "more than 5% of API requests get a 5xx",
    "IcmLoraRedisDown": "a replica cannot reach Redis",
    "IcmLoraHighLatencyP95": "task/adapter routes' p95 above 2.5 s",
    "IcmLoraSlowTimeToFirstToken": "p95 time to first token above 2 s",
    "IcmLoraSlowAdapterGeneration": "p95 adapter generation above 5 s",
    "IcmLoraQueueSaturation": "the inference queue stays near capacity",
    "IcmLoraRequestsRejected": "more than 5% of requests get a 429",
    "IcmLoraAdapterSlotThrashing": "more than 0.5 swaps per completion",
    "IcmLoraEngineStalled": "requests queued and no token generated for 5 minutes",
    "IcmLoraAdapterCacheCorruption": "a cached adapter failed its checksum",
}


def _has_finite_value(result: dict[str, object]) -> bool:
    data = result.get("data", {})
    assert isinstance(data, dict)
    samples = data.get("result", [])
    assert isinstance(samples, list)
    return any(math.isfinite(float(sample["value"][1])) for sample in samples)


def test_promtool_checks_config_and_rules(tmp_path: Path) -> None:
    _, promtool = prometheus_binaries()
    for args in (
        ["check", "config", str(PROMETHEUS_DIR / "prometheus.yml")],
        ["check", "rules", str(PROMETHEUS_DIR / "alerts.yml")],
    ):
        result = subprocess.run([promtool, *args], capture_output=True, text=True)
        assert result.returncode == 0, result.stdout + result.stderr
    # the test's own variant (static target, 1 s intervals) too
    generated = Prometheus("prometheus", promtool, tmp_path, "127.0.0.1:8000").config_path
    result = subprocess.run([promtool, "check", "config", str(generated)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_load_reached_the_service(stack: Stack) -> None:
    assert stack.statuses.get("201", 0) >= 4 and stack.statuses.get("404", 0) >= 8, stack.statuses
    assert set(stack.statuses) <= {"200", "201", "404", "422"}, stack.statuses
    targets = stack.prometheus.api("targets")["data"]["activeTargets"]
    assert {t["labels"]["job"]: t["health"] for t in targets}["icm-lora"] == "up"


def test_every_dashboard_expression_returns_data(stack: Stack) -> None:
    render = render_module()
    failures = []
    for uid, where, expr in dashboard_targets():
        result = stack.prometheus.query(render.concrete_expr(expr, WINDOW))
        if result.get("status") != "success":
            failures.append(f"{uid} / {where}: invalid: {result.get('error')}")
        elif not _has_finite_value(result):
            failures.append(f"{uid} / {where}: no data: {render.concrete_expr(expr, WINDOW)}")
    # the replica variable's label_values(metric, label) has values
    for board in dashboards().values():
        for variable in board["templating"]["list"]:
            metric, label = variable["definition"].removeprefix("label_values(").rstrip(")").split(",")
            result = stack.prometheus.query(f"group by ({label.strip()}) ({metric.strip()})")
            if not result["data"]["result"]:
                failures.append(f"{board['uid']}: variable {variable['name']} has no values")
    assert not failures, "\n".join(failures)


def test_every_alert_expression_is_valid_and_watches_live_series(stack: Stack) -> None:
    rules = alert_rules()
    assert set(FIRES_ONLY_ON_FAILURE) <= {r["alert"] for r in rules}, "stale allow-list entries"
    failures = []
    for rule in rules:
        name, expr = rule["alert"], rule["expr"]
        result = stack.prometheus.query(expr)
        if result.get("status") != "success":
            failures.append(f"{name}: invalid: {result.get('error')}")
            continue
        if name not in FIRES_ONLY_ON_FAILURE:
            if not result["data"]["result"]:
                failures.append(f"{name}: no data")
            continue
        for metric in metric_names(expr):
            if not stack.prometheus.query(f"group({metric})")["data"]["result"]:
                failures.append(f"{name}: reads {metric}, which has no series")
        signal = signal_of(expr)
        if signal is not None and not _has_finite_value(stack.prometheus.query(signal)):
            failures.append(f"{name}: its signal has no data: {signal}")
    # Prometheus loaded every rule and evaluates each without error
    loaded = {
        rule["name"]: rule
        for group in stack.prometheus.api("rules")["data"]["groups"]
        for rule in group["rules"]
        if rule["type"] == "alerting"
    }
    assert set(loaded) == {r["alert"] for r in rules}
    failures += [f"{n}: evaluation: {r.get('lastError')}" for n, r in loaded.items() if r["health"] != "ok"]
    assert not failures, "\n".join(failures)


def test_render_key_panels(stack: Stack, tmp_path: Path) -> None:
    """docker/render_panels.py plots the key panels from query_range; ICM_LORA_PANELS_PNG=path keeps a copy."""
    render = render_module()
    out = Path(os.environ.get("ICM_LORA_PANELS_PNG") or tmp_path / "panels.png")
    start = stack.load_start - 5
    path = render.render(stack.prometheus.url, start, stack.load_end, out, window="30s", step=1.0)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 20_000
    for file, title in render.KEY_PANELS:  # every key panel has points in the plotted range
        panel = render.find_panel(dashboards()[file], title)
        expr = render.concrete_expr(panel["targets"][0]["expr"], "30s")
        assert render.query_range(stack.prometheus.url, expr, start, stack.load_end, 1.0), title
