"""Plot the key Grafana panels from a Prometheus that scraped icm-lora: docs/img/dashboard-panels.png.

The expressions come from the dashboard JSON files themselves (by panel title), so the picture shows what the
dashboards show. Grafana variables become concrete values: ``$__rate_interval`` the given window, ``$instance``
every replica.

    python docker/render_panels.py --prometheus http://127.0.0.1:9090 --minutes 15
    python docker/render_panels.py --prometheus http://127.0.0.1:9090 --start 1760000000 --end 1760000600

Needs matplotlib (the ``train`` extra) and nothing else; tests/deploy runs it against a live Prometheus, and
regenerates the docs picture when ICM_LORA_PANELS_PNG is set (see docs/deployment.md).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import re
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

DASHBOARDS = Path(__file__).resolve().parent / "grafana" / "dashboards"
DEFAULT_OUT = Path(__file__).resolve().parent.parent / "docs" / "img" / "dashboard-panels.png"

# (dashboard file, panel title): the panels shown in docs/deployment.md
KEY_PANELS: list[tuple[str, str]] = [
    ("overview.json", "Requests per second by route"),
    ("overview.json", "Latency percentiles"),
    ("overview.json", "Errors by status"),
    ("adapters.json", "Adapter generation latency by stage (p50, p95)"),
    ("adapters.json", "Cache hit ratio by tier"),
    ("adapters.json", "Adapter swaps"),
    ("inference.json", "Tokens per second"),
    ("inference.json", "Time to first token"),
    ("inference.json", "Batch size"),
]

UNITS = {"reqps": "requests/s", "s": "seconds", "percentunit": "ratio", "ops": "per second", "short": "", "none": ""}
_VARIABLE = re.compile(r"\$(\{)?(\w+)(?(1)(?::\w+)?\})")


def concrete_expr(expr: str, window: str = "1m", variables: dict[str, str] | None = None) -> str:
    """A panel expression with Grafana's variables replaced: ``$__rate_interval``/``$__interval``/``$__range`` by
    ``window``, dashboard variables by ``variables`` (default ``.*``, i.e. All)."""
    values = {"__rate_interval": window, "__interval": window, "__range": window}
    values.update(variables or {})

    def replace(match: re.Match[str]) -> str:
        return values.get(match.group(2), ".*")

    return _VARIABLE.sub(replace, expr)


def load_dashboards(folder: Path = DASHBOARDS) -> dict[str, dict[str, Any]]:
    return {path.name: json.loads(path.read_text()) for path in sorted(folder.glob("*.json"))}


def find_panel(dashboard: dict[str, Any], title: str) -> dict[str, Any]:
    for panel in dashboard["panels"]:
        if panel.get("title") == title:
            return panel
    raise KeyError(f"no panel {title!r} in {dashboard.get('uid')}")


def query_range(prometheus: str, expr: str, start: float, end: float, step: float) -> list[dict[str, Any]]:
    params = urllib.parse.urlencode({"query": expr, "start": start, "end": end, "step": step})
    with urllib.request.urlopen(f"{prometheus.rstrip('/')}/api/v1/query_range?{params}", timeout=30) as response:
        body = json.loads(response.read())
    if body.get("status") != "success":
        raise RuntimeError(f"query failed: {expr}: {body}")
    return list(body["data"]["result"])


def legend(fmt: str, labels: dict[str, str]) -> str:
    return re.sub(r"\{\{\s*(\w+)\s*\}\}", lambda m: labels.get(m.group(1), ""), fmt) or json.dumps(labels)


def render(
    prometheus: str,
    start: float,
    end: float,
    out: Path = DEFAULT_OUT,
    window: str = "1m",
    step: float | None = None,
    panels: list[tuple[str, str]] | None = None,
) -> Path:
    """Query every key panel over [start, end] and plot them in a grid; returns the PNG's path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.dates import DateFormatter

    panels = panels or KEY_PANELS
    step = step or max(1.0, (end - start) / 240)
    dashboards = load_dashboards()
    columns = 3
    rows = math.ceil(len(panels) / columns)
    fig, axes = plt.subplots(rows, columns, figsize=(5.2 * columns, 3.2 * rows), squeeze=False)
    for ax, (file, title) in zip(axes.flat, panels, strict=False):
        dashboard = dashboards[file]
        panel = find_panel(dashboard, title)
        unit = panel.get("fieldConfig", {}).get("defaults", {}).get("unit", "")
        unit = UNITS.get(unit, unit)
        for target in panel["targets"]:
            for series in query_range(prometheus, concrete_expr(target["expr"], window), start, end, step):
                points = [(float(t), float(v)) for t, v in series["values"] if math.isfinite(float(v))]
                if not points:
                    continue
                xs = [dt.datetime.fromtimestamp(t) for t, _ in points]
                ax.plot(xs, [v for _, v in points], label=legend(target.get("legendFormat", ""), series["metric"]))
        ax.set_title(f"{dashboard['title'].split('/')[-1].strip()}: {title}", fontsize=9)
        ax.set_ylabel(unit, fontsize=8)
        ax.tick_params(labelsize=7)
        ax.xaxis.set_major_formatter(DateFormatter("%H:%M:%S"))
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=6, loc="best")
        else:
            ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    fig.suptitle(f"icm-lora dashboards (rate window {window})", fontsize=11)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prometheus", default="http://127.0.0.1:9090")
    parser.add_argument("--minutes", type=float, default=15.0, help="Plot the last N minutes (without --start)")
    parser.add_argument("--start", type=float, help="Unix time")
    parser.add_argument("--end", type=float, help="Unix time (default now)")
    parser.add_argument("--window", default="1m", help="Value of $__rate_interval")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()
    end = args.end or time.time()
    start = args.start or end - args.minutes * 60
    print(render(args.prometheus, start, end, args.out, args.window))


if __name__ == "__main__":
    main()
