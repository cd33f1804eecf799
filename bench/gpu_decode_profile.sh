#!/usr/bin/env bash
# Where a decode step's GPU time goes (issue 16): a random-weights package of configs/gpt_small.py's
# shapes (vocab 50,304), bf16, greedy, 256 new tokens after 64-token prompts cut from docs/, at
# batch 32 and batch 1: bench/speculative_speed.py times greedy and prompt-lookup (k = 2) decoding
# and traces one call of each; bench/analyze_trace.py summarises each trace (kernel time by
# category, top kernels). One GPU; ~100 s on an H200 with the start-up. Figures: docs/serving.md,
# "Batch 32 profiled".
#
#   bash bench/gpu_decode_profile.sh      # repository root; logs and traces under $OUT
set -u
export PY=${PY:-python3} OUT=${OUT:-runs/bench/device}
source bench/gpu_common.sh
python_env
W=/tmp/b32; mkdir -p $W $OUT
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
$PY -c "import jax; print('jax', jax.__version__, jax.devices())"
$PY - $W/tok.model <<'PY'
import glob, sys
from llm_jax.data.tokenizer import train_tokenizer
files = sorted(glob.glob("llm_jax/**/*.py", recursive=True) + glob.glob("docs/*.md"))
tok = train_tokenizer([open(f, encoding="utf-8", errors="replace").read() for f in files], sys.argv[1], vocab_size=2000, num_threads=4)
print(tok.vocab_size, "pieces")
PY
$PY -m llm_jax.export --random_init configs/gpt_small.py --tokenizer $W/tok.model \
  --config_override model.vocab_size=50304 --out $W/pkg --overwrite 2>&1 | tail -1
cat docs/*.md > $W/text.txt
for B in 32 1; do
  $PY bench/speculative_speed.py --model $W/pkg --ngram 3 --text $W/text.txt --prompts $B --batch $B \
    --prompt_tokens 64 --new_tokens 256 --k 2 --repeats 3 --trace $OUT/trace_b$B 2>&1 | grep -v -E '^[IW][0-9]{4} ' | tee $OUT/spec_b$B.log
  for label in plain speculative_k2; do
    echo "=== batch $B: $label"
    $PY bench/analyze_trace.py $OUT/trace_b$B/$label --top 25 --steps 256 2>&1 | tail -45
  done
done
rm -rf $OUT/trace_b*/plain $OUT/trace_b*/speculative_k2
