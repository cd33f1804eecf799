# Sourced by bench/gpu_*.sh on the device machine (repo root, $OUT set, wheels installed on PYTHONPATH).
# Each stage appends its log to $OUT/all.log and its bench JSON rows to $OUT/results.jsonl.
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.92}
export TF_CPP_MIN_LOG_LEVEL=1
mkdir -p "$OUT" /tmp/bench
T0=$(date +%s)

stage() {  # stage NAME TIMEOUT_S [ENV=VAL ...] -- COMMAND...: runs, logs, keeps going on failure
  local name=$1 limit=$2; shift 2
  local envs=()
  while [ "$1" != "--" ]; do envs+=("$1"); shift; done; shift
  echo "=== [$(( $(date +%s) - T0 ))s] $name (limit ${limit}s) ${envs[*]}" | tee -a "$OUT/all.log"
  env "${envs[@]}" timeout "$limit" "$@" >"/tmp/bench/$name.log" 2>&1
  local rc=$?
  grep -v -E '^[IW][0-9]{4} |^\s*$' "/tmp/bench/$name.log" | tail -40 >> "$OUT/all.log"
  echo "--- $name rc=$rc" >> "$OUT/all.log"
  if [ -f "/tmp/bench/$name.json" ]; then
    python3 -c "import json,sys; d=json.load(open(sys.argv[1])); d['stage']=sys.argv[2]; print(json.dumps(d))" \
      "/tmp/bench/$name.json" "$name" >> "$OUT/results.jsonl"
  fi
  [ $rc -eq 0 ] || tail -25 "/tmp/bench/$name.log" >> "$OUT/all.log"
}

table() {  # the short table of every row so far (last thing printed)
  python3 - "$OUT/results.jsonl" <<'PY'
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
