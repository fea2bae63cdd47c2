#!/usr/bin/env bash
# Rebuild the packaged default generator for SmolLM2-135M from scratch, and its quality report. Every step is
# resumable: run it again after an interruption and finished work is kept.
#   bash scripts/build-default-generator.sh [RUN_FOLDER]            # default runs/smollm2-bigbench
# Env: SHARDS (parallel single-threaded oracle/evaluation processes, default 2 = one per core here).
# The generator is trained end to end with the contrastive term on the 111 training tasks of bench/suites/bigbench.txt
# (no LoRA collection); the report trains only the 16 held-out tasks' oracles, the multi-task LoRA and 16 seen tasks'
# LoRAs. Times on the 2-core CPU are in the README ("Real-task quality").
set -euo pipefail
cd "$(dirname "$0")/.."
run="${1:-runs/smollm2-bigbench}"
shards="${SHARDS:-2}"
seen_sample=16
data="${ICM_LORA_DATA_DIR:-$HOME/.cache/icm-lora}"
export HF_HUB_OFFLINE=1
bash scripts/fetch-bigbench.sh "$data/bigbench"
suite="bigbench:$data/bigbench/bigbench-1.0.0/bigbench/benchmark_tasks:bench/suites/bigbench.txt"
bin=.venv/bin

# 1. the generator, end to end: task vectors, then 600 contrastive steps (resumes from its saved state)
if [ ! -f "$run/generator/generator.json" ]; then
  args=()
  [ -f "$run/run.json" ] || args=(--suite "$suite" --settings bench/suites/bigbench-e2e-contrast-settings.json)
  OMP_NUM_THREADS=$shards "$bin/icm-lora" train-generator --run "$run" "${args[@]}"
fi

# 2. for the report: the held-out tasks' oracle LoRAs, a seeded sample of seen tasks' LoRAs and the multi-task LoRA
pids=()
for i in $(seq 1 "$shards"); do
  OMP_NUM_THREADS=1 "$bin/icm-lora" train-loras --run "$run" --seen-sample "$seen_sample" --multitask-steps 128 \
    --shard "$i/$shards" --no-progress & pids+=($!)
done
for pid in "${pids[@]}"; do wait "$pid"; done

# 3. the quality report: shards fill report/rows/, a last pass assembles it and times generation
pids=()
for i in $(seq 1 "$shards"); do
  OMP_NUM_THREADS=1 "$bin/python" bench/quality.py --run "$run" --seen-sample "$seen_sample" --shard "$i/$shards" \
    --no-progress & pids+=($!)
done
for pid in "${pids[@]}"; do wait "$pid"; done
OMP_NUM_THREADS=$shards "$bin/python" bench/quality.py --run "$run" --seen-sample "$seen_sample"

# 4. ship it where `icm-lora serve` finds it: the packed form (decoder only, int4; `icm-lora export-generator`)
"$bin/icm-lora" export-generator --generator "$run/generator" --out generator/assets/generators/smollm2-135m
echo "default generator installed in generator/assets/generators/smollm2-135m"
