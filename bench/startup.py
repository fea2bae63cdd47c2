"""Start-up benchmark: `icm-lora serve` as its own process (SmolLM2-135M + the packaged generator), from launch to an
open port (``/healthz`` 200) and to ready (``/readyz`` 200), on a warm data dir and on an empty one (the first run
converts the packaged GGUF). Also checks the service log holds the conversion as one line and no progress bar.

    python bench/startup.py                       # both cases, about two minutes on 2 cores
    python bench/startup.py --no-fresh            # the warm data dir only (ICM_LORA_DATA_DIR or ~/.cache/icm-lora)
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.servers import ServiceProcess

TARGET_PORT_OPEN_S = 3.0  # the port answers before torch is imported: a process start and uvicorn, not the load


def measure(env: dict[str, str], log_path: Path) -> dict[str, object]:
    service = ServiceProcess(env, log_path)
    launched = time.monotonic()
    service.launch()
    port_open_s = ready_s = None
    loading_seen = False
    try:
        with httpx.Client(base_url=service.url, timeout=5) as client:
            while ready_s is None and time.monotonic() - launched < 900:
                try:
                    if port_open_s is None and client.get("/healthz").status_code == 200:
                        port_open_s = time.monotonic() - launched
                    ready = client.get("/readyz")
                    loading_seen |= ready.status_code == 503 and ready.json().get("status") == "loading"
                    if ready.status_code == 200:
                        ready_s = time.monotonic() - launched
                except httpx.HTTPError:
                    pass
                time.sleep(0.05)
    finally:
        service.stop()
    log = service.log()
    return {
        "port_open_s": round(port_open_s, 2) if port_open_s is not None else None,
        "ready_s": round(ready_s, 2) if ready_s is not None else None,
        "loading_answered": loading_seen,
        "conversion_log_lines": [line for line in log.splitlines() if "converted the packaged" in line],
        "progress_bars_in_log": "%|" in log or "\r" in log,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--no-fresh", action="store_true", help="skip the first-run case (empty data dir)")
    parser.add_argument("--out", type=Path, default=Path("bench/results/startup.json"))
    args = parser.parse_args()
    results: dict[str, object] = {
        "machine": f"{platform.machine()}, {platform.processor() or 'cpu'}",
        "targets": {"port_open_s": f"<= {TARGET_PORT_OPEN_S}", "loading_answered": True},
    }
    with tempfile.TemporaryDirectory() as tmp:
        results["warm"] = measure({}, Path(tmp) / "warm.log")
        if not args.no_fresh:
            results["first_run"] = measure({"ICM_LORA_DATA_DIR": str(Path(tmp) / "data")}, Path(tmp) / "fresh.log")
    cases = [v for k, v in results.items() if k in ("warm", "first_run") and isinstance(v, dict)]
    results["met"] = all(
        c["port_open_s"] is not None and c["port_open_s"] <= TARGET_PORT_OPEN_S and c["loading_answered"] for c in cases
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
