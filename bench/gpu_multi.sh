#!/usr/bin/env bash
# Multi-GPU figures for docs/launch.md: gpt_small tokens/s per GPU under data-parallel, FSDP and
# tensor-parallel meshes, as one process over all GPUs and as one process per GPU (launch/local.sh),
# against one GPU; llama_8b with FSDP over 4+ GPUs (memory per device). Synthetic tokens, the real step.
#
#   bash bench/gpu_multi.sh [STAGE ...]     (repo root; on the device machine $OUT is set)
#   stages: base dp fsdp tp llama8b llama8b_sweep table
#   (default: base dp fsdp tp, llama8b on 4+ GPUs, table). llama8b_sweep (4+ GPUs): llama_8b FSDP with
#   remat full / none / dots_no_batch, 1-2 rows per GPU, scanned or unrolled layers, and the
#   collective flags MaxText uses on GPUs (latency-hiding scheduler, combine thresholds); one row each
#   env: ROWS (rows per GPU per pass, default 16), STEPS (timed steps, default 10), EXTRA (more arguments
#   for bench/gpu_multi.py, e.g. --config.model.remat=dots_no_batch)
#
# Writes $OUT/gpu_multi.jsonl (one JSON row per run), $OUT/gpu_multi.log (each run's tail) and
# $OUT/topology.txt (nvidia-smi topo -m); prints the table last. Each stage keeps going on failure.
set -u
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1  # multicast off
export PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=1 NCCL_DEBUG=${NCCL_DEBUG:-WARN}
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.90}
export PYTHON=python3
OUT=${OUT:-runs/gpu_multi}
mkdir -p "$OUT" /tmp/gpu_multi
RES=$OUT/gpu_multi.jsonl LOG=$OUT/gpu_multi.log
T0=$(date +%s)

source bench/gpu_common.sh  # python_env: pip install -e . done, or wheels in .whl/
python_env
N=$(nvidia-smi -L | wc -l)
{ nvidia-smi --query-gpu=name,memory.total --format=csv,noheader; nvidia-smi topo -m; } > "$OUT/topology.txt" 2>&1
python3 -c 'import jax, flax, optax; print("jax", jax.__version__, "flax", flax.__version__, jax.devices())' \
  2>&1 | tail -1 | tee -a "$LOG"

# shellcheck disable=SC2206
GS=(--config=configs/gpt_small.py --rows_per_gpu="${ROWS:-16}" --steps="${STEPS:-10}" --warmup=2
    --json="$RES" ${EXTRA:-})

run() {  # run NAME LIMIT_S COMMAND...: one measurement; its output's tail goes to the log
  local name=$1 limit=$2; shift 2
  echo "=== [$(( $(date +%s) - T0 ))s] $name" | tee -a "$LOG"
  timeout "$limit" "$@" > "/tmp/gpu_multi/$name.log" 2>&1
  local rc=$?
  grep -v -E '^[IW][0-9]{4} |^\s*$' "/tmp/gpu_multi/$name.log" | tail -15 >> "$LOG"
  echo "--- $name rc=$rc" | tee -a "$LOG"
}

mesh_stage() {  # mesh_stage MESH: one process over all GPUs, then one process per GPU
  local mesh=$1
  run "${mesh}_1proc" 240 python3 bench/gpu_multi.py "${GS[@]}" --mesh="$mesh" \
    --label="gpt_small $mesh, 1 process x $N GPUs"
  run "${mesh}_${N}proc" 240 bash launch/local.sh -n "$N" --gpus_per_process 1 --grace 30 \
    --logdir "/tmp/gpu_multi/${mesh}_logs" -- python3 bench/gpu_multi.py "${GS[@]}" --mesh="$mesh" \
    --label="gpt_small $mesh, $N processes x 1 GPU"
}

llama8b_sweep() {  # one process over all GPUs per variant; failures (OOM, unknown flag) keep going
  local lhs="--xla_gpu_enable_latency_hiding_scheduler=true"
  local combine="$lhs --xla_gpu_enable_highest_priority_async_stream=true \
--xla_gpu_all_gather_combine_threshold_bytes=1073741824 \
--xla_gpu_reduce_scatter_combine_threshold_bytes=134217728 \
--xla_gpu_all_reduce_combine_threshold_bytes=134217728"
  local l8=(python3 bench/gpu_multi.py --config=configs/llama_8b.py --mesh=fsdp --steps=3 --warmup=1
            --json="$RES")
  run l8_none_r1_u 300 "${l8[@]}" --rows_per_gpu=1 --config.model.remat=none \
    --config.model.scan_unroll=32 --label="llama_8b none r1 unrolled"
  run l8_none_r2_u 300 "${l8[@]}" --rows_per_gpu=2 --config.model.remat=none \
    --config.model.scan_unroll=32 --label="llama_8b none r2 unrolled"
  run l8_dnb_r2_u 300 "${l8[@]}" --rows_per_gpu=2 --config.model.remat=dots_no_batch \
    --config.model.scan_unroll=32 --label="llama_8b dots_no_batch r2 unrolled"
  run l8_none_r2_u_lhs 300 env XLA_FLAGS="$lhs" "${l8[@]}" --rows_per_gpu=2 \
    --config.model.remat=none --config.model.scan_unroll=32 --label="llama_8b none r2 unrolled +LHS"
  run l8_none_r2_u_comb 300 env XLA_FLAGS="$combine" "${l8[@]}" --rows_per_gpu=2 \
    --config.model.remat=none --config.model.scan_unroll=32 --label="llama_8b none r2 unrolled +LHS+comb"
  run l8_full_r1 300 "${l8[@]}" --rows_per_gpu=1 --label="llama_8b full r1 scan (preset)"
}

table() {
  python3 - "$RES" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()] if __import__("os").path.exists(sys.argv[1]) else []
base = next((r["tokens_per_s"] for r in rows if r["gpus"] == 1 and "gpt_small" in r["config"]), None)
print(f"{'run':44s} {'mesh d/f/t':>10s} {'step ms':>8s} {'tokens/s':>10s} {'tok/s/GPU':>10s} "
      f"{'eff.':>6s} {'MFU':>6s} {'peak GiB':>8s} {'est GiB':>8s}")
for r in rows:
  m = r["mesh"]
  eff = (f"{r['tokens_per_s_per_gpu'] / base:6.0%}" if base and "gpt_small" in r["config"] and
         r["gpus"] > 1 else "")
  print(f"{r['label'][:44]:44s} {m['data']:>4d}/{m['fsdp']}/{m['tensor']:<3d} {r['step_ms']:8.1f} "
        f"{r['tokens_per_s']:10.0f} {r['tokens_per_s_per_gpu']:10.0f} {eff:>6s} "
        f"{100 * (r.get('mfu') or 0):5.1f}% "
        f"{r['peak_gib_per_device'] or 0:8.1f} {r['estimate_gib_per_device']:8.1f}")
PY
}

stages=("$@")
if [[ ${#stages[@]} -eq 0 ]]; then
  stages=(base dp fsdp tp)
  [[ $N -ge 4 ]] && stages+=(llama8b)
  stages+=(table)
fi
for stage in "${stages[@]}"; do
  case "$stage" in
    base) run base_1gpu 240 env CUDA_VISIBLE_DEVICES=0 python3 bench/gpu_multi.py "${GS[@]}" --mesh=dp \
            --label="gpt_small, 1 GPU" ;;
    dp|fsdp|tp) mesh_stage "$stage" ;;
    llama8b) run llama8b_fsdp 420 python3 bench/gpu_multi.py --config=configs/llama_8b.py --mesh=fsdp \
               --rows_per_gpu=1 --steps=3 --warmup=1 --json="$RES" \
               --label="llama_8b fsdp, 1 process x $N GPUs" ;;
    llama8b_sweep) llama8b_sweep ;;
    table) table | tee -a "$LOG" ;;
    *) echo "unknown stage $stage (base dp fsdp tp llama8b table)" >&2 ;;
  esac
done
