#!/usr/bin/env bash
# In-process decode tokens/s only (the decode stage of bench/gpu_serve.sh, bf16 only, no server):
# a random-weights package of configs/gpt_small.py's shapes (vocab 50304 rows), greedy decode of
# NEW_TOKENS tokens at each batch size, best of 3 after a compile run; a table last. With
# BEFORE=DIR (a checkout of another commit, e.g. `git worktree add /tmp/before HEAD~1`), the same
# measurement also runs on that code, in its own process, for a before/after table from one machine.
# VARIANTS (space-separated, default "none qkv kv qkv,norm qkv,norm,kv"): one row per set of decode
# levers (ModelConfig.decode_levers; "none" = today's path); each row also gives the operations
# (kernels) in one compiled decode step (llm_jax.eval.decode_kernels) at each batch size.
#
#   bash bench/gpu_decode.sh          # repository root; results under $OUT (default runs/bench/device)
#   VARIANTS="none qkv,norm,kv" BATCHES=1,32 bash bench/gpu_decode.sh
#   XLA_SETS="default;--xla_gpu_enable_dot_strength_reduction=false" VARIANTS=qkv,norm,kv bash bench/gpu_decode.sh
#
# XLA_SETS (";" between sets, "default" = no flags): one process per set of XLA flags, named xla0, xla1,
# ... in the table (the legend follows it). MIN_ROWS=N decodes a batch of fewer rows as N rows
# (generate.MIN_ROWS, 2 by default) in every process.
#
# CPU smoke test:
#   PY=.venv/bin/python CONFIG=configs/tiny.py VOCAB=0 BATCHES=1,4 NEW_TOKENS=32 \
#     OUT=/tmp/gd_out bash bench/gpu_decode.sh
set -u
source bench/gpu_common.sh
python_env
CONFIG=${CONFIG:-configs/gpt_small.py}
VOCAB=${VOCAB:-50304}
TOK_VOCAB=${TOK_VOCAB:-2000}
BATCHES=${BATCHES:-1,8,32}
NEW_TOKENS=${NEW_TOKENS:-256}
VARIANTS=${VARIANTS:-none qkv kv qkv,norm qkv,norm,kv}
W=${WORK:-/tmp/gpu_decode}
mkdir -p "$W" "$OUT"
rm -rf "$W/pkg" "$W"/*.json
el() { echo "[$(( $(date +%s) - T0 ))s]"; }

echo "=== $(el) device"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null
$PY -c "import jax, sys; print('python', sys.version.split()[0], 'jax', jax.__version__, jax.devices())"

echo "=== $(el) tokenizer + package (random init of $CONFIG, model.vocab_size=$VOCAB)"
timeout 120 $PY - "$W/tok.model" "$TOK_VOCAB" <<'PY' || exit 1
import glob, sys
from llm_jax.data.tokenizer import train_tokenizer
files = sorted(glob.glob("llm_jax/**/*.py", recursive=True) + glob.glob("docs/*.md"))
texts = [open(f, encoding="utf-8", errors="replace").read() for f in files]
tok = train_tokenizer(texts, sys.argv[1], vocab_size=int(sys.argv[2]), num_threads=4)
print(f"{len(files)} files -> {tok.vocab_size} pieces")
PY
OVR=()
[ "$VOCAB" != "0" ] && OVR=(--config_override "model.vocab_size=$VOCAB")
timeout 150 $PY -m llm_jax.export --random_init "$CONFIG" --tokenizer "$W/tok.model" "${OVR[@]}" \
  --out "$W/pkg" --overwrite 2>&1 | grep -v -E '^[IW][0-9]{4} ' | tail -2
[ -f "$W/pkg/model.json" ] || { echo "export failed"; exit 1; }

measure() {  # name, PYTHONPATH for llm_jax
  echo "=== $(el) decode tokens/s: $1 (batches $BATCHES, $NEW_TOKENS new tokens, best of 3)"
  # run from that code's directory: `python -` puts the working directory first on sys.path
  local nv; nv=$(wc -w <<< "$VARIANTS")
  (cd "$2" && XLA_FLAGS="${3:-}" PYTHONPATH="${PYTHONPATH//$PWD/$2}" timeout $(( ${STAGE_TIMEOUT:-90} * nv )) $PY - "$W/pkg" \
    "$BATCHES" "$NEW_TOKENS" "$W/decode_$1.json" "$1" "$VARIANTS") <<'PY' 2>&1 | grep -v -E '^[IW][0-9]{4} '
import dataclasses, json, os, sys, time
import jax, jax.numpy as jnp
import llm_jax
pkg, batches, new, out, name = sys.argv[1], [int(b) for b in sys.argv[2].split(",")], int(sys.argv[3]), sys.argv[4], sys.argv[5]
if os.environ.get("MIN_ROWS"):  # the rows a small batch decodes as (generate.MIN_ROWS)
  import llm_jax.generate.batching as GB
  GB.make_batch.__defaults__ = (int(os.environ["MIN_ROWS"]),)
variants = ["" if v == "none" else v for v in sys.argv[6].split()]
try:  # code with decode levers and the per-step operation count
  from llm_jax.eval import decode_kernels as K
  from llm_jax.model import unstack_layers
except ImportError:
  K, variants = None, [""]
try:  # code with the artifacts layer (one open_model; decode_speed in eval/precision.py)
  from llm_jax.artifacts import open_model
  from llm_jax.eval import precision as Q
  loaded = open_model(pkg, dtype="bfloat16")
except ImportError:  # older code: package.load_package, quantize.decode_speed
  from llm_jax import package as P, quantize as Q
  loaded = P.load_package(pkg, compute_dtype="bfloat16")
cfg = dataclasses.replace(loaded.model_config, dtype="bfloat16")
params = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32).astype(jnp.bfloat16), loaded.params)
print(f"{name}: llm_jax from {llm_jax.__file__}; {jax.devices()[0].device_kind}: "
      f"{cfg.param_count():,} parameters, vocab {cfg.vocab_size}, max_seq_len {cfg.max_seq_len}")
rows = []
for lev in variants:
  code = f"{name} {lev or 'none'}" if K is not None else name
  if lev:
    p, c = unstack_layers(params, cfg, levers=lev)
  else:
    p, c = params, cfg
  for b in batches:
    t0 = time.perf_counter()
    tps = Q.decode_speed(p, c, b, new)
    ops = K.step_ops(*unstack_layers(p, c), b, new) if K is not None else None
    rows.append({"code": code, "batch": b, "tokens_per_s": tps, "ms_per_step": 1000 * b / tps,
                 "ops_per_step": sum(ops.values()) if ops else None})
    print(f"{code:20s} batch {b:3d}: {tps:10.0f} tokens/s  {1000 * b / tps:7.3f} ms/step  "
          f"(call {time.perf_counter() - t0:.1f} s incl. compile)", flush=True)
    if ops:
      print(f"{'':20s} operations per step: {K.format_ops(ops)}", flush=True)
    with open(out, "w") as f:
      json.dump(rows, f)
PY
}
if [ -n "${XLA_SETS:-}" ]; then
  IFS=';' read -ra xla_sets <<< "$XLA_SETS"
  for i in "${!xla_sets[@]}"; do
    f=${xla_sets[$i]}; [ "$f" = default ] && f=""
    measure "xla$i" "$PWD" "$f"
  done
else
  measure after "$PWD"
fi
[ -n "${BEFORE:-}" ] && measure before "$BEFORE"
cp "$W"/decode_*.json "$OUT/" 2>/dev/null

echo "=== $(el) summary (bf16, greedy, tokens/s)"
$PY - "$W" <<'PY'
import glob, json, os, sys
rows = [r for p in sorted(glob.glob(os.path.join(sys.argv[1], "decode_*.json"))) for r in json.load(open(p))]
bs = sorted({r["batch"] for r in rows})
print("| code, decode levers | " + " | ".join(f"batch {b}: tok/s (ms/step, ops/step)" for b in bs) + " |")
print("| --- |" + " --- |" * len(bs))
def cell(r):
  ops = f", {r['ops_per_step']} ops" if r.get("ops_per_step") else ""
  return f"{r['tokens_per_s']:,.0f} ({r['ms_per_step']:.2f} ms{ops})"
for code in dict.fromkeys(r["code"] for r in rows):
  got = {r["batch"]: r for r in rows if r["code"] == code}
  print(f"| {code} | " + " | ".join(cell(got[b]) if b in got else "-" for b in bs) + " |")
PY
[ -n "${XLA_SETS:-}" ] && for i in "${!xla_sets[@]}"; do echo "xla$i: XLA_FLAGS=${xla_sets[$i]}"; done
echo "total $(( $(date +%s) - T0 )) s"
