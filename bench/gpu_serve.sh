#!/usr/bin/env bash
# Serving benchmark on one GPU (docs/serving.md, "GPU benchmarks"): a random-weights package of
# configs/gpt_small.py's shapes (vocab 50304 rows, a small tokenizer trained here on the repo's own
# text), in-process decode tokens/s at several batch sizes (bf16, int8 dequantized at load, int8 in
# memory), then the HTTP server under the load test at concurrency 1 and 32 (started with an empty
# compilation cache: the cold start-up), a second start of the server on that cache (the warm
# start-up), and the engine's host time per chunk (bench/serve_host.py); a table last.
#
#   bash bench/gpu_serve.sh          # repository root; results under $OUT (default runs/bench/device)
#
# CPU smoke test of the same logic (a tiny config, fewer tokens):
#   PY=.venv/bin/python CONFIG=configs/tiny.py VOCAB=0 BATCHES=1,4 NEW_TOKENS=32 \
#     MAX_TOKENS=16 REQ1=4 REQ32=64 OUT=/tmp/gs_out bash bench/gpu_serve.sh
set -u
source bench/gpu_common.sh
python_env
CONFIG=${CONFIG:-configs/gpt_small.py}
VOCAB=${VOCAB:-50304}          # model embedding rows (GPT-2's 50257 padded); 0: the tokenizer's size
TOK_VOCAB=${TOK_VOCAB:-2000}   # the tokenizer's pieces (random weights: only the shapes matter)
BATCHES=${BATCHES:-1,8,32}
NEW_TOKENS=${NEW_TOKENS:-256}
MAX_TOKENS=${MAX_TOKENS:-128}  # per load-test request
REQ1=${REQ1:-16}               # requests at concurrency 1
REQ32=${REQ32:-500}            # requests at concurrency 32
PORT=${PORT:-8765}
SERVE_ARGS=${SERVE_ARGS:-}     # more server flags, e.g. "--decode_chunk 8" (one word each)
PYSPY=${PYSPY:-}               # a py-spy binary: record who holds the GIL during the 32-client test
WARM_ENVS=${WARM_ENVS:-}       # more warm starts, one per word, each under its own environment
                               # setting(s), e.g. "XLA_PYTHON_CLIENT_PREALLOCATE=false" (commas: several)
MORE_LOADS=${MORE_LOADS:-}     # more servers under the same load tests, one per word: its extra flags and
                               # VAR=VALUE environment settings (commas: several; "-": none), e.g.
                               # "--decode_chunk=8 - --decode_chunk=8" (settings that change the compiled
                               # programs, e.g. XLA_FLAGS, start cold: the cache is keyed by them)
HOST_TIME=${HOST_TIME:-1}      # 0: skip bench/serve_host.py
W=${WORK:-/tmp/gpu_serve}
mkdir -p "$W" "$OUT"
rm -rf "$W/pkg" "$W"/*.json "$W"/*.log "$W"/flags_*.txt "$W/xla"
el() { echo "[$(( $(date +%s) - T0 ))s]"; }

# start_server LOG [VAR=VALUE ...]: the server in the background (SPID), on the script's own
# compilation cache, under those environment settings; UP=1 and UP_S (seconds to /health 200, by the
# millisecond clock) once it is healthy
start_server() {
  local t0 i log=$1; shift
  t0=$(date +%s%N)
  env "$@" $PY -m llm_jax.serve --package="$W/pkg" --port "$PORT" --slots 32 --max_concurrent 64 \
    --compile_cache "$W/xla" --audit_log "$W/audit.jsonl" $SERVE_ARGS ${EXTRA:-} > "$log" 2>&1 &
  SPID=$!
  UP=0
  for i in $(seq 1 1800); do
    code=$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$PORT/health" 2>/dev/null)
    if [ "$code" = "200" ]; then UP=1; break; fi
    kill -0 $SPID 2>/dev/null || break
    sleep 0.1
  done
  local ms=$(( ($(date +%s%N) - t0) / 1000000 ))
  UP_S=$(printf '%d.%03d' $((ms / 1000)) $((ms % 1000)))
  # ALL_S: seconds until every program is built and has run once (the server answers from UP_S on
  # with the covering ones; the load tests start after ALL_S, so background compiles and first runs
  # do not share their GPU; code before /health's programs_warm: built only)
  ALL_S=$UP_S
  [ $UP = 1 ] || return
  for i in $(seq 1 3000); do
    curl -s "http://127.0.0.1:$PORT/health" 2>/dev/null | $PY -c \
      "import json,sys; d=json.load(sys.stdin); sys.exit(d.get('programs_warm', d.get('programs_built', 0)) < d.get('programs_total', 0))" \
      2>/dev/null && break
    kill -0 $SPID 2>/dev/null || break
    sleep 0.1
  done
  ms=$(( ($(date +%s%N) - t0) / 1000000 ))
  ALL_S=$(printf '%d.%03d' $((ms / 1000)) $((ms % 1000)))
}

# cpu_s PID...: CPU seconds (user + system, every thread) the processes used so far
cpu_s() {
  local p t=0
  for p in "$@"; do
    [ -r /proc/$p/stat ] && t=$(( t + $(awk '{print $14 + $15}' /proc/$p/stat) ))
  done
  awk -v t=$t -v hz=$(getconf CLK_TCK) 'BEGIN {printf "%.2f", t / hz}'
}

# load_tests TAG: the load tests at concurrency 1 and 32 against the running server (load$c$TAG.json)
load_tests() {
  local tag=$1 c n
  for c in 1 32; do
    n=$REQ1; [ $c = 32 ] && n=$REQ32
    echo "=== $(el) load test: concurrency $c, $n requests, max_tokens $MAX_TOKENS ${tag:+(server $tag)}"
    if [ -n "$PYSPY" ] && [ $c = 32 ] && [ -z "$tag" ]; then  # 8 s from 1 s in, while the load is steady
      (sleep 1; "$PYSPY" record -p $SPID --nonblocking --gil --threads -r 200 -d 8 --format raw -o "$W/pyspy_gil.txt" \
        > "$W/pyspy.log" 2>&1) &
      PSPID=$!
    fi
    local kids p0 k0
    kids=$(pgrep -P $SPID | tr '\n' ' ')
    p0=$(cpu_s $SPID) k0=$(cpu_s $kids)
    timeout 120 $PY -m llm_jax.serve.loadtest --url "http://127.0.0.1:$PORT" --concurrency $c \
      --requests $n --max_tokens "$MAX_TOKENS" --json > "$W/load$c$tag.json"
    echo "exit $?; CPU seconds during it: the HTTP process $(awk -v a=$p0 -v b=$(cpu_s $SPID) 'BEGIN {printf "%.2f", b - a}'), the engine process(es) $(awk -v a=$k0 -v b=$(cpu_s $kids) 'BEGIN {printf "%.2f", b - a}')"
    $PY -c "import json,sys; from llm_jax.serve.loadtest import format_summary as f; print(f(json.load(open(sys.argv[1]))))" "$W/load$c$tag.json"
  done
}

echo "=== $(el) device"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null
$PY -c "import jax, sys; print('python', sys.version.split()[0], 'jax', jax.__version__, jax.devices())"

echo "=== $(el) tokenizer ($TOK_VOCAB pieces, trained on the repo's .py/.md files)"
timeout 120 $PY - "$W/tok.model" "$TOK_VOCAB" <<'PY' || exit 1
import glob, sys
from llm_jax.data.tokenizer import train_tokenizer
files = sorted(glob.glob("**/*.py", recursive=True) + glob.glob("**/*.md", recursive=True))
texts = [open(f, encoding="utf-8", errors="replace").read() for f in files]
tok = train_tokenizer(texts, sys.argv[1], vocab_size=int(sys.argv[2]), num_threads=4)
print(f"{len(files)} files, {sum(map(len, texts)):,} chars -> {tok.vocab_size} pieces")
PY

echo "=== $(el) package (random init of $CONFIG, model.vocab_size=$VOCAB)"
OVR=()
[ "$VOCAB" != "0" ] && OVR=(--config_override "model.vocab_size=$VOCAB")
timeout 150 $PY -m llm_jax.export --random_init "$CONFIG" --tokenizer "$W/tok.model" "${OVR[@]}" \
  --out "$W/pkg" --overwrite 2>&1 | grep -v -E '^[IW][0-9]{4} ' | tail -3
[ -f "$W/pkg/model.json" ] || { echo "export failed"; exit 1; }

echo "=== $(el) decode tokens/s, in process (batches $BATCHES, $NEW_TOKENS new tokens, best of 3)"
timeout 170 $PY - "$W/pkg" "$BATCHES" "$NEW_TOKENS" "$W/decode.json" <<'PY' 2>&1 | grep -v -E '^[IW][0-9]{4} '
import json, sys, time
import jax
pkg, batches, new, out = sys.argv[1], [int(b) for b in sys.argv[2].split(",")], int(sys.argv[3]), sys.argv[4]
try:  # code with the artifacts layer (one open_model; decode_speed in eval/precision.py)
  from llm_jax.artifacts import open_model
  from llm_jax.eval import precision as Q
  loaded = open_model(pkg, dtype="bfloat16")
except ImportError:  # older code: package.load_package, quantize.decode_speed
  from llm_jax import package as P, quantize as Q
  loaded = P.load_package(pkg, compute_dtype="bfloat16")
cfg = loaded.model_config
print(f"{jax.devices()[0].device_kind}: {cfg.param_count():,} parameters, vocab {cfg.vocab_size}, "
      f"{cfg.num_layers} layers, d_model {cfg.d_model}, max_seq_len {cfg.max_seq_len}")
rows = []
for name, (params, vcfg, stored) in Q.variants(loaded).items():
  if name == "float32":
    continue
  for b in batches:
    t0 = time.perf_counter()
    try:
      tps = Q.decode_speed(params, vcfg, b, new)
    except Exception as e:  # noqa: BLE001 - report and go on with the next row
      print(f"{name} batch {b}: FAILED {type(e).__name__}: {str(e)[:300]}")
      continue
    rows.append({"variant": name, "batch": b, "tokens_per_s": tps,
                 "ms_per_step": 1000 * b / tps, "wall_s": time.perf_counter() - t0})
    print(f"{name:40s} batch {b:3d}: {tps:10.0f} tokens/s  {1000 * b / tps:7.3f} ms/step  "
          f"(call {rows[-1]['wall_s']:.1f} s incl. compile)", flush=True)
    with open(out, "w") as f:
      json.dump(rows, f)
PY

echo "=== $(el) server (slots 32, max-concurrent 64), empty compilation cache $W/xla"
start_server "$W/server.log"
grep -E "ready:|ERROR|Error|error" "$W/server.log" | grep -v -E '^[IW][0-9]{4} ' | head -5
if [ $UP = 1 ]; then
  echo "health 200 after $UP_S s (cold), every program built after $ALL_S s"
  echo "{\"cold_s\": $UP_S, \"cold_all_s\": $ALL_S}" > "$W/startup.json"
  load_tests ""
  if [ -n "$PYSPY" ]; then
    wait $PSPID; tail -2 "$W/pyspy.log"
    [ -f "$W/pyspy_gil.txt" ] && $PY bench/pyspy_summary.py "$W/pyspy_gil.txt" --rate 200 --seconds 8 --top 30
  fi
  curl -s "http://127.0.0.1:$PORT/metrics" | grep -E '^llm_(requests_total|sequences_finished_total|generated_tokens_total)' > "$W/metrics.txt"
  cat "$W/metrics.txt"
else
  echo "server not healthy (last lines of its log):"; tail -30 "$W/server.log"
fi
kill $SPID 2>/dev/null; wait $SPID 2>/dev/null

echo "=== $(el) server again, on the compilation cache the first start wrote (warm start-up)"
start_server "$W/server_warm.log"
grep -E "ready:" "$W/server_warm.log" | head -1
kill $SPID 2>/dev/null; wait $SPID 2>/dev/null
if [ $UP = 1 ] && [ -f "$W/startup.json" ]; then
  echo "health 200 after $UP_S s (warm), every program built after $ALL_S s"
  $PY -c "import json,sys; d=json.load(open(sys.argv[1])); d['warm_s']=float(sys.argv[2]); d['warm_all_s']=float(sys.argv[3]); json.dump(d, open(sys.argv[1],'w'))" "$W/startup.json" "$UP_S" "$ALL_S"
fi

for envs in $WARM_ENVS; do
  echo "=== $(el) warm start-up under ${envs//,/ }"
  start_server "$W/server_env.log" ${envs//,/ }
  grep -E "ready:" "$W/server_env.log" | head -1
  kill $SPID 2>/dev/null; wait $SPID 2>/dev/null
  echo "health 200 after $UP_S s (warm, ${envs//,/ }), every program built after $ALL_S s"
done

nth=0
for extra in $MORE_LOADS; do
  nth=$((nth + 1))
  [ "$extra" = "-" ] && extra=""
  flags=() envs=()
  for x in ${extra//,/ }; do
    case $x in --*) flags+=("$x") ;; *) envs+=("$x") ;; esac
  done
  echo "=== $(el) server $nth with '${extra//,/ }' under the same loads"
  EXTRA="${flags[*]}" start_server "$W/server_$nth.log" "${envs[@]}"
  echo "health 200 after $UP_S s, every program built after $ALL_S s"
  if [ $UP = 1 ]; then
    echo "${extra//,/ }" > "$W/flags_$nth.txt"
    load_tests "_$nth"
  else
    tail -20 "$W/server_$nth.log"
  fi
  kill $SPID 2>/dev/null; wait $SPID 2>/dev/null
done

[ "$HOST_TIME" = 1 ] && echo "=== $(el) engine host time per chunk (bench/serve_host.py, 32 slots, chunk 4)" && timeout 300 $PY bench/serve_host.py --slots 32 --chunk 4 --tokens "$MAX_TOKENS" --tokenizer "$W/tok.model" \
  --repeat 3 2>&1 | grep -v -E '^[IW][0-9]{4} '
cp "$W/server.log" "$W/server_warm.log" "$W"/*.json "$W"/pyspy_gil.txt "$OUT/" 2>/dev/null

echo "=== $(el) summary"
$PY - "$W" <<'PY'
import json, os, sys
w = sys.argv[1]
def load(name):
  p = os.path.join(w, name)
  return json.load(open(p)) if os.path.exists(p) else None
rows = load("decode.json") or []
bs = sorted({r["batch"] for r in rows})
print("| decode tokens/s (in process) | " + " | ".join(f"batch {b}" for b in bs) + " |")
for v in dict.fromkeys(r["variant"] for r in rows):
  got = {r["batch"]: r["tokens_per_s"] for r in rows if r["variant"] == v}
  print(f"| {v} | " + " | ".join(f"{got[b]:.0f}" if b in got else "-" for b in bs) + " |")
  if bs and bs[0] in got:
    print(f"|   scaling vs batch {bs[0]} | " + " | ".join(
        f"{got[b] / got[bs[0]]:.1f}x" if b in got else "-" for b in bs) + " |")
servers = [("", "")] + sorted(
  ((f"_{f[6:-4]}", open(os.path.join(w, f)).read().strip() or "-")
   for f in os.listdir(w) if f.startswith("flags_") and f.endswith(".txt")),
  key=lambda t: int(t[0][1:]))
for (tag, flags), c in ((s, c) for s in servers for c in (1, 32)):
  s = load(f"load{c}{tag}.json")
  name = f"server{tag} ({flags})" if tag else "server"
  if not s:
    print(f"{name} load test concurrency {c}: no result"); continue
  ms = lambda d: " / ".join("n/a" if v is None else f"{1000 * v:.1f}" for v in d.values())
  print(f"| {name}, concurrency {c}: {s['requests']} requests x {s['max_tokens']} tokens | "
        f"{s['output_tokens_per_s']:.0f} tok/s, {s['requests_per_s']:.1f} req/s, ok {s['ok']}, "
        f"errors {s['errors'] or 'none'}, TTFT p50/p90/p99 {ms(s['ttft_s'])} ms, "
        f"TPOT {ms(s['tpot_s'])} ms, latency {ms(s['latency_s'])} ms |")
up = load("startup.json") or {}
nan = float("nan")
print(f"| server start-up to /health 200 | cold {up.get('cold_s', nan):.1f} s, "
      f"warm (compilation cache) {up.get('warm_s', nan):.1f} s |")
print(f"| every program built (background) | cold {up.get('cold_all_s', nan):.1f} s, "
      f"warm {up.get('warm_all_s', nan):.1f} s |")
PY
echo "total $(( $(date +%s) - T0 )) s"
