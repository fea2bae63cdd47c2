"""Reading the deployment files: dashboard targets, alert rules, the metric names an expression reads."""

from __future__ import annotations

import importlib.util
import re
from functools import cache
from pathlib import Path
from types import ModuleType
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
DOCKER = ROOT / "docker"
DASHBOARDS = DOCKER / "grafana" / "dashboards"
ALERTS = DOCKER / "prometheus" / "alerts.yml"

# Series that Prometheus itself records for every target; everything else must come from service/metrics.py.
PROMETHEUS_SERIES = {"up"}
_PROMQL_WORDS = {
    "sum", "min", "max", "avg", "count", "group", "by", "without", "on", "ignoring", "and", "or", "unless", "bool",
    "rate", "irate", "increase", "histogram_quantile", "avg_over_time", "min_over_time", "max_over_time", "absent",
    "vector", "timestamp", "le", "offset", "group_left", "group_right", "label_values",
}  # fmt: skip


@cache
def render_module() -> ModuleType:
    """docker/render_panels.py (not a package) as a module."""
    spec = importlib.util.spec_from_file_location("render_panels", DOCKER / "render_panels.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def dashboards() -> dict[str, dict[str, Any]]:
    return dict(render_module().load_dashboards(DASHBOARDS))


def dashboard_targets() -> list[tuple[str, str, str]]:
    """(dashboard uid, panel title + refId, expr) for every target of every panel."""
    found = []
    for board in dashboards().values():
        for panel in board["panels"]:
            for target in panel.get("targets", []):
                found.append((board["uid"], f"{panel['title']} [{target['refId']}]", target["expr"]))
    return found


def alert_rules() -> list[dict[str, Any]]:
    groups = yaml.safe_load(ALERTS.read_text())["groups"]
    return [rule for group in groups for rule in group["rules"]]


def _strip_strings(expr: str) -> str:
    """Quoted label values blanked out (they may hold parentheses, words and operators)."""
    return re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)


def metric_names(expr: str) -> set[str]:
    """Metric names an expression selects: identifiers that are not PromQL words, label names or durations."""
    text = _strip_strings(expr)
    text = re.sub(r"\{[^}]*\}", "{}", text)  # label matchers
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", text)  # label lists
    text = re.sub(r"\[[^\]]*\]", "", text)  # range durations
    names = set(re.findall(r"(?<![\w.])([a-zA-Z_:][\w:]*)(?=\s*(?:\{|\[|\)|$|\s|,|[-+*/<>=!]))", text))
    return {n for n in names if n not in _PROMQL_WORDS and not re.fullmatch(r"[0-9.eE+-]+", n)}


def _top_level(expr: str) -> str:
    """The expression with everything inside brackets and quotes blanked (same length), to find top-level ops."""
    out, depth, quoted = [], 0, False
    for i, ch in enumerate(expr):
        if quoted:
            out.append(" ")
            if ch == '"' and expr[i - 1] != "\\":
                quoted = False
            continue
        if ch == '"':
            quoted = True
            out.append(" ")
        elif ch in "([{":
            depth += 1
            out.append(" ")
        elif ch in ")]}":
            depth -= 1
            out.append(" ")
        else:
            out.append(ch if depth == 0 else " ")
    return "".join(out)


def signal_of(expr: str) -> str | None:
    """What an alert watches: the inside of ``absent(X)``, or the left side of a final ``<op> <number>``; None for
    expressions combined with and/or/unless at the top level."""
    expr = expr.strip()
    absent = re.fullmatch(r"absent\s*\((.*)\)", expr, re.S)
    if absent:
        return absent.group(1).strip()
    top = _top_level(expr)
    if re.search(r"\b(and|or|unless)\b", top):
        return None
    match = re.search(r"(==|!=|>=|<=|>|<)\s*(?:bool\s+)?-?[0-9.]+(?:e[-+]?[0-9]+)?\s*$", top)
    return expr[: match.start()].strip() if match else expr


@cache
def exported_sample_names() -> frozenset[str]:
    """Every sample name the service can export (with prometheus_client's _total/_bucket/_sum/_count suffixes)."""
    from service.metrics import ServiceMetrics

    metrics = ServiceMetrics(redis_configured=True)
    metrics.cache.labels("memory", "hit").inc()
    metrics.requests.labels("/x", "200").inc()
    metrics.request_seconds.labels("/x").observe(0.1)
    metrics.generation_seconds.labels("total").observe(0.1)
    return frozenset(s.name for family in metrics.registry.collect() for s in family.samples)


@cache
def exported_families() -> frozenset[str]:
    from service.metrics import ServiceMetrics

    registry = ServiceMetrics(redis_configured=True).registry
    return frozenset(family.name for family in registry.collect())
