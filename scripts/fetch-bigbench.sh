#!/usr/bin/env bash
# Download the bigbench==1.0.0 sdist (358 MB, PyPI) once and keep only the task.json files.
#   bash scripts/fetch-bigbench.sh [DEST]
# Default DEST: $ICM_LORA_DATA_DIR/bigbench (or ~/.cache/icm-lora/bigbench); the tasks end up in
# DEST/bigbench-1.0.0/bigbench/benchmark_tasks. The files stay outside the repository: BIG-bench asks not to end up in
# training corpora (its canary string).
#
# pip cannot build bigbench's metadata (it declares a direct-URL dependency), and recent pips delete the downloaded
# sdist when that fails; `--no-clean` keeps pip's unpacked copy, from which the task files are taken.
# BIGBENCH_SDIST=/path/to/bigbench-1.0.0.tar.gz (or an unpacked copy's folder) takes the tasks from a local copy
# instead: on 2026-12-07 the package index this project's machines reach listed only bigbench 0.0.1.
set -euo pipefail
cd "$(dirname "$0")/.."
dest="${1:-${ICM_LORA_DATA_DIR:-$HOME/.cache/icm-lora}/bigbench}"
tasks="$dest/bigbench-1.0.0/bigbench/benchmark_tasks"
python="${PYTHON:-.venv/bin/python}"
[ -x "$python" ] || python=python3
if [ -f "$tasks/.complete" ]; then
  echo "BIG-bench tasks already in $tasks"; exit 0
fi
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
keep_tasks() {  # copy every task.json under $1 (a bigbench/benchmark_tasks folder) to $tasks
  mkdir -p "$tasks"
  (cd "$1" && find . -name task.json -print0 | tar --null -cf - -T -) | tar -xf - -C "$tasks"
  touch "$tasks/.complete"
  echo "$(find "$tasks" -name task.json | wc -l) BIG-bench task files in $tasks"
}
if [ -n "${BIGBENCH_SDIST:-}" ]; then
  if [ -d "$BIGBENCH_SDIST" ]; then
    src=$(find "$BIGBENCH_SDIST" -maxdepth 6 -type d -path '*/bigbench/benchmark_tasks' | head -n 1)
  else
    tar -xzf "$BIGBENCH_SDIST" -C "$work" --wildcards '*/benchmark_tasks/*/task.json'
    src=$(find "$work" -maxdepth 6 -type d -path '*/bigbench/benchmark_tasks' | head -n 1)
  fi
  [ -n "$src" ] || { echo "no bigbench/benchmark_tasks in $BIGBENCH_SDIST" >&2; exit 1; }
  keep_tasks "$src"
  exit 0
fi
TMPDIR="$work" "$python" -m pip download --no-clean --no-deps --no-build-isolation --no-binary :all: \
  "bigbench==1.0.0" -d "$work/sdist" >"$work/pip.log" 2>&1 || true
src=$(find "$work" -maxdepth 6 -type d -path '*/bigbench/benchmark_tasks' | head -n 1)
if [ -z "$src" ] && [ -s "$work/sdist/bigbench-1.0.0.tar.gz" ]; then  # older pips keep the tarball instead
  tar -xzf "$work/sdist/bigbench-1.0.0.tar.gz" -C "$work" --wildcards '*/benchmark_tasks/*/task.json'
  src=$(find "$work" -maxdepth 6 -type d -path '*/bigbench/benchmark_tasks' | head -n 1)
fi
if [ -z "$src" ]; then
  tail -n 20 "$work/pip.log" >&2
  echo "could not fetch bigbench==1.0.0 from the package index; with a copy of its sdist (or an unpacked one):" >&2
  echo "  BIGBENCH_SDIST=/path/to/bigbench-1.0.0.tar.gz bash scripts/fetch-bigbench.sh" >&2
  exit 1
fi
keep_tasks "$src"
