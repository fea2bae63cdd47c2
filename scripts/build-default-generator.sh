#!/usr/bin/env bash
# Rebuild the packaged default generator for SmolLM2-135M from scratch, and its quality report. Every step is
# resumable: run it again after an interruption and finished work is kept.
#   bash scripts/build-default-generator.sh [RUN_FOLDER]            # default runs/smollm2-bigbench
# Env: SHARDS (parallel single-threaded collection/evaluation processes, default 2 = one per core here).
# On the 2-core CPU this took about 45 min of collection, 7.5 min of CVAE training and 70 min of evaluation
# (README, "Real-task quality").
set -euo pipefail
cd "$(dirname "$0")/.."
run="${1:-runs/smollm2-bigbench}"
shards="${SHARDS:-2}"
suite_file=bench/suites/bigbench-v1.txt  # the shipped generator's suite (bigbench.txt: the pilot's new one)
data="${ICM_LORA_DATA_DIR:-$HOME/.cache/icm-lora}"
export HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1
bash scripts/fetch-bigbench.sh "$data/bigbench"
suite="bigbench:$data/bigbench/bigbench-1.0.0/bigbench/benchmark_tasks:$suite_file"
bin=.venv/bin

# 1. one LoRA per seen task (+ the multi-task LoRA), SHARDS processes in parallel
pids=()
for i in $(seq 1 "$shards"); do
  if [ ! -f "$run/run.json" ]; then  # the first shard creates the run folder; the others open it
    "$bin/icm-lora" train-loras --run "$run" --suite "$suite" --settings bench/suites/bigbench-settings.json \
      --no-oracles --shard "$i/$shards" & pids+=($!)
    while [ ! -f "$run/run.json" ] && kill -0 "${pids[-1]}" 2>/dev/null; do sleep 1; done
  else
    "$bin/icm-lora" train-loras --run "$run" --no-oracles --shard "$i/$shards" & pids+=($!)
  fi
done
for pid in "${pids[@]}"; do wait "$pid"; done

# 2. the CVAE
if [ ! -f "$run/generator/generator.json" ]; then
  OMP_NUM_THREADS=$shards "$bin/icm-lora" train-generator --run "$run"
fi

# 3. the quality report: shards fill report/rows/, a last pass assembles it and times generation
pids=()
for i in $(seq 1 "$shards"); do
  "$bin/python" bench/quality.py --run "$run" --shard "$i/$shards" & pids+=($!)
done
for pid in "${pids[@]}"; do wait "$pid"; done
OMP_NUM_THREADS=$shards "$bin/python" bench/quality.py --run "$run"

# 4. ship it where `icm-lora serve` finds it: the packed form (decoder only, fp16; `icm-lora export-generator`)
"$bin/icm-lora" export-generator --generator "$run/generator" --out generator/assets/generators/smollm2-135m
echo "default generator installed in generator/assets/generators/smollm2-135m"
