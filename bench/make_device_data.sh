#!/usr/bin/env bash
# Recreates .device_data/ (ignored by git; carried to the device with carry=[".whl", ".device_data"]):
# the tiny-Shakespeare files and the code snapshots that bench/gpu_perf*.sh compare:
#   baseline  the step before the performance work (model/loss of 02d8119, step.py of 95102af)
#   v0        + custom-VJP cross-entropy, bfloat16 logits, model.scan_unroll      (384a70c)
#   v1        + GELU/SwiGLU gradients that keep only their inputs                (167a9fe)
# Each snapshot gets today's data/, bench.py, profiling.py and configs/ so that all of them read the
# same batches and take the same flags.
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"
grep -qx '/.device_data/' .git/info/exclude 2>/dev/null || echo '/.device_data/' >> .git/info/exclude
mkdir -p .device_data
cp ../shared/data/tinyshakespeare_train.txt ../shared/data/tinyshakespeare_val.txt .device_data/
snapshot() {
  local name=$1 commit=$2 dir=.device_data/$1
  rm -rf "$dir" && mkdir -p "$dir"
  git archive "$commit" llm_jax | tar -x -C "$dir"
  rm -rf "$dir/llm_jax/data" "$dir/configs"
  cp -r llm_jax/data "$dir/llm_jax/data"
  cp -r configs "$dir/configs"
  cp llm_jax/bench.py "$dir/llm_jax/bench.py"
  cp llm_jax/train/profiling.py "$dir/llm_jax/train/profiling.py"
}
snapshot baseline 02d8119
git show 95102af:llm_jax/train/step.py > .device_data/baseline/llm_jax/train/step.py
snapshot v0 384a70c
snapshot v1 167a9fe
find .device_data -name __pycache__ -prune -exec rm -rf {} +
du -sh .device_data
