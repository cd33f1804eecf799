# Sourced by bench/gpu_*.sh from the repository root. Functions:
#   python_env         makes llm_jax and its dependencies importable: nothing to do after
#                      `pip install -e .`; on an offline machine, wheels in .whl/ (pip download them
#                      elsewhere: ../shared/gpu/fetch_wheels.sh phonenumberslite python-stdnum tokenizers
#                      tqdm, its default list lacks these four) are installed into /tmp/site; otherwise,
#                      or when an import still fails, it stops naming what is missing
#   shakespeare_data   sets SHK_TRAIN / SHK_VAL: tiny Shakespeare in $SHAKESPEARE_DIR (default
#                      runs/data/tinyshakespeare), written by bench/shakespeare_data.py when missing
#   stage NAME TIMEOUT_S [ENV=VAL ...] -- COMMAND...   runs one step, logs to $OUT/all.log, keeps going;
#                      a bench JSON at /tmp/bench/NAME.json is appended to $OUT/results.jsonl
#   table              the short table of every bench row so far
export PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=1
PY=${PY:-python3}
OUT=${OUT:-runs/bench/device}
mkdir -p "$OUT" /tmp/bench
T0=$(date +%s)

python_env() {
  export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
  # what the bench and training commands import (a missing wheel fails here, not mid-stage)
  local check='import llm_jax.bench, llm_jax.train.loop, ml_collections, grain, orbax.checkpoint'
  if $PY -c "$check" 2>/dev/null; then
    return 0
  fi
  if ls .whl/*.whl >/dev/null 2>&1; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
      .whl/*.whl && export PYTHONPATH=/tmp/site:$PYTHONPATH
    local missing
    if missing=$($PY -c "$check" 2>&1); then
      return 0
    fi
    echo "llm_jax's dependencies are still missing after installing .whl/: $(echo "$missing" | tail -1)" >&2
    echo "fetch that package's wheel too: ../shared/gpu/fetch_wheels.sh NAME (pyproject.toml lists them)" >&2
    exit 1
  fi
  echo "llm_jax's dependencies are missing: run 'pip install -e .' (or put wheels in .whl/)" >&2
  exit 1
}

shakespeare_data() {
  local dir=${SHAKESPEARE_DIR:-runs/data/tinyshakespeare}
  if [ ! -f "$dir/tinyshakespeare_train.txt" ] || [ ! -f "$dir/tinyshakespeare_val.txt" ]; then
    $PY bench/shakespeare_data.py --out "$dir" || exit 1
  fi
  SHK_TRAIN=$dir/tinyshakespeare_train.txt SHK_VAL=$dir/tinyshakespeare_val.txt
}

stage() {
  local name=$1 limit=$2; shift 2
  local envs=()
  while [ "$1" != "--" ]; do envs+=("$1"); shift; done; shift
  echo "=== [$(( $(date +%s) - T0 ))s] $name (limit ${limit}s) ${envs[*]}" | tee -a "$OUT/all.log"
  env "${envs[@]}" timeout "$limit" "$@" >"/tmp/bench/$name.log" 2>&1
  local rc=$?
  grep -v -E '^[IW][0-9]{4} |^\s*$' "/tmp/bench/$name.log" | tail -40 >> "$OUT/all.log"
  echo "--- $name rc=$rc" >> "$OUT/all.log"
  if [ -f "/tmp/bench/$name.json" ]; then
    $PY -c "import json,sys; d=json.load(open(sys.argv[1])); d['stage']=sys.argv[2]; print(json.dumps(d))" \
      "/tmp/bench/$name.json" "$name" >> "$OUT/results.jsonl"
  fi
  [ $rc -eq 0 ] || tail -25 "/tmp/bench/$name.log" >> "$OUT/all.log"
}

table() {
  [ -f "$OUT/results.jsonl" ] || { echo "no bench rows in $OUT/results.jsonl"; return; }
  $PY - "$OUT/results.jsonl" <<'PY'
import json, sys
rows = []
for line in open(sys.argv[1]):
  d = json.loads(line)
  for r in d["rows"]:
    rows.append((d["stage"], r))
print(f"{'stage':14s} {'variant':52s} {'b/pass':>7s} {'cmp_s':>6s} {'step_ms':>8s} {'tok/s':>9s} {'MFU':>6s} {'peakGiB':>7s} {'loss':>7s}")
for stage, r in rows:
  if r.get("status") != "ok":
    print(f"{stage:14s} {r['label'][:52]:52s} {r.get('status','?')[:60]}"); continue
  print(f"{stage:14s} {r['label'][:52]:52s} {r['batch_per_pass']:>4d}x{r['microbatches']:<2d} {r['compile_s']:6.1f} "
        f"{r['step_ms_median']:8.1f} {r['tokens_per_s']:9.0f} {100*(r['mfu'] or 0):5.1f}% "
        f"{r['peak_memory_gib'] or 0:7.1f} {r['losses'][-1]:7.4f}")
PY
}
