#!/usr/bin/env bash
# The CUDA measurements of issue 13 in one run (planned for about 10 minutes on one H200; each step has a timeout):
#   1. the engine parity tests on the GPU (fp32 exact, bf16 vs peft in bf16, the six architectures), and CUDA's sync
#      detector over the decode step (bench/cuda_syncs.py),
#   2. bench/engine.py in bf16 and fp32 (16 streams x 16 adapters vs no adapter, hot swap, vs HF/peft),
#   3. bench/service.py in bf16 (needs redis-server on the machine; skipped with a note otherwise).
# Writes bench/results/parity-cuda.json, syncs-cuda.json, engine-cuda-bfloat16.json, engine-cuda-float32.json,
# service-cuda-bfloat16.json and gpu-run-cuda.json (what ran, exit codes, seconds).
#
#   bash bench/gpu.sh                  # PYTHON=/path/to/python to use another interpreter than .venv/bin/python
set -uo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
[ -x "$PY" ] || PY="$(command -v python3)"
RESULTS=bench/results
TMP="$(mktemp -d)"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-4}" HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1

if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "error: $PY sees no CUDA device (torch $("$PY" -c 'import torch; print(torch.__version__)'))" >&2
  exit 2
fi
"$PY" -c "import torch; print('GPU:', torch.cuda.get_device_name(0), 'torch', torch.__version__)"

declare -A RC SECONDS_TAKEN
step() {  # step NAME TIMEOUT_S COMMAND...
  local name=$1 limit=$2
  shift 2
  local start=$SECONDS
  echo "=== $name (timeout ${limit}s): $*"
  timeout "$limit" "$@"
  RC[$name]=$?
  SECONDS_TAKEN[$name]=$((SECONDS - start))
  echo "=== $name: exit ${RC[$name]} in ${SECONDS_TAKEN[$name]} s"
}

# 1. parity on the GPU
step parity 150 env ICM_LORA_TEST_DEVICE=cuda "$PY" -m pytest -q -p no:cacheprovider \
  tests/engine/test_low_precision.py tests/engine/test_architectures.py --junitxml="$TMP/parity.xml"
"$PY" - "$TMP/parity.xml" "$RESULTS/parity-cuda.json" <<'EOF'
import json, sys, xml.etree.ElementTree as ET
from pathlib import Path
source, target = Path(sys.argv[1]), Path(sys.argv[2])
cases = {}
if source.is_file():
    for case in ET.parse(source).iter("testcase"):
        outcome = "passed"
        for kind in ("failure", "error", "skipped"):
            node = case.find(kind)
            if node is not None:
                outcome = kind if kind != "failure" else "failed"
                cases[case.get("name")] = {"outcome": outcome, "message": (node.get("message") or "")[:500]}
                break
        else:
            cases[case.get("name")] = {"outcome": outcome, "seconds": float(case.get("time", 0))}
target.write_text(json.dumps({"device": "cuda", "tests": cases}, indent=2) + "\n")
print(f"wrote {target}: {sum(c['outcome'] == 'passed' for c in cases.values())}/{len(cases)} passed")
EOF

# 1b. CUDA's own sync detector inside the decode step (target: 1 per step, the sampled tokens)
step syncs 90 "$PY" bench/cuda_syncs.py --out "$RESULTS/syncs-cuda.json"

# 2. the engine benchmark (the first load dequantises SmolLM2 into the data dir, ~40 s, once)
step engine-bf16 240 "$PY" bench/engine.py --device cuda --dtype bfloat16 --pairs 4
step engine-fp32 150 "$PY" bench/engine.py --device cuda --dtype float32 --pairs 2 --swaps 300

# 3. the service benchmark over HTTP, with a private Redis
REDIS_PORT=6391
if command -v redis-server >/dev/null; then
  redis-server --daemonize yes --port "$REDIS_PORT" --bind 127.0.0.1 --save "" --appendonly no \
    --dir "$TMP" --logfile "$TMP/redis.log"
  sleep 1
  step service-bf16 180 "$PY" bench/service.py --device cuda --dtype bfloat16 \
    --redis-url "redis://127.0.0.1:$REDIS_PORT/0" --out "$RESULTS/service-cuda-bfloat16.json"
  redis-cli -p "$REDIS_PORT" shutdown nosave >/dev/null 2>&1 || true
else
  echo '{"skipped": "no redis-server on the GPU machine"}' >"$RESULTS/service-cuda-bfloat16.json"
  RC[service-bf16]=skipped
  SECONDS_TAKEN[service-bf16]=0
fi

{
  echo "{"
  first=1
  for name in parity syncs engine-bf16 engine-fp32 service-bf16; do
    [ $first -eq 1 ] || echo ","
    first=0
    printf '  "%s": {"exit": "%s", "seconds": %s}' "$name" "${RC[$name]:-not run}" "${SECONDS_TAKEN[$name]:-0}"
  done
  echo
  echo "}"
} >"$RESULTS/gpu-run-cuda.json"
cat "$RESULTS/gpu-run-cuda.json"
rm -rf "$TMP"
