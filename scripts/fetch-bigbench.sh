#!/usr/bin/env bash
# Download the bigbench==1.0.0 sdist (358 MB, PyPI) once and extract only the task.json files a suite names.
#   bash scripts/fetch-bigbench.sh [SUITE_FILE] [DEST]
# Defaults: bench/suites/bigbench.txt, $ICM_LORA_DATA_DIR/bigbench (or ~/.cache/icm-lora/bigbench).
# The files stay outside the repository: BIG-bench asks not to end up in training corpora (its canary string).
set -euo pipefail
cd "$(dirname "$0")/.."
suite="${1:-bench/suites/bigbench.txt}"
dest="${2:-${ICM_LORA_DATA_DIR:-$HOME/.cache/icm-lora}/bigbench}"
python="${PYTHON:-.venv/bin/python}"
[ -x "$python" ] || python=python3
mkdir -p "$dest/download"
sdist="$dest/download/bigbench-1.0.0.tar.gz"
if [ ! -s "$sdist" ]; then
  "$python" -m pip download --no-deps --no-build-isolation --no-binary :all: "bigbench==1.0.0" -d "$dest/download" \
    || [ -s "$sdist" ]  # pip may fail preparing metadata after the download; the tarball is all we need
fi
mapfile -t names < <(sed -e 's/#.*//' -e 's/[[:space:]]unseen[[:space:]]*$//' -e 's/[[:space:]]*$//' "$suite" | grep -v '^$')
members=()
for name in "${names[@]}"; do members+=("bigbench-1.0.0/bigbench/benchmark_tasks/$name/task.json"); done
tar -xzf "$sdist" -C "$dest" "${members[@]}"
echo "${#names[@]} BIG-bench tasks in $dest/bigbench-1.0.0/bigbench/benchmark_tasks"
