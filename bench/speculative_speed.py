"""Greedy decoding with and without a draft model (generate/speculative.py), one prompt at a time
(`--batch N`: N prompts a call, the speculative rounds running until every row is done): tokens/s
of each, the share of draft tokens accepted and the tokens per target call, for several draft
lengths, and how many prompts' tokens equal greedy decoding's: all of them in float32 (the script
exits 1 otherwise); in bfloat16 the target's check of a round (one pass over k + 1 positions)
rounds differently from its one-token steps and may break a near-tie the other way.

    python bench/speculative_speed.py --model RUN_OR_PKG --draft SMALL_RUN_OR_PKG [--ngram 3] \
        --text val.txt [--prompts 8] [--prompt_tokens 64] [--new_tokens 256] [--k 2,4,6]

`--ngram N` adds rows of prompt lookup (no draft model; `--draft` may then be left out); `--refill`
(with more prompts than `--batch`) adds rows of all prompts decoded `--batch` rows at a time, a row
whose prompt finished taking the next one (continuous batching, `speculative_generate(rows=...)`);
`--temperature T` times sampled decoding instead of greedy (no equality check then); `--trace DIR`
writes jax.profiler traces of one plain and one speculative call, with `--refill` also of one call
with rows refilled (bench/analyze_trace.py reads them).

`bash bench/gpu_speculative.sh` trains a pair on tiny Shakespeare and runs this on one GPU. Not a
test: figures go to docs/serving.md with the command and the run.
"""

from __future__ import annotations

import argparse
import functools
import glob
import itertools
import os
import shutil
import sys
import time

import jax
import jax.numpy as jnp

from llm_jax import generate as G
from llm_jax.artifacts import open_model
from llm_jax.model import default_levers, unstack_layers


def _timed(fn, repeats: int):
  """(result, best seconds) of fn() after one untimed call (the compile)."""
  result, best = fn(), float("inf")
  for _ in range(repeats):
    t0 = time.perf_counter()
    fn()
    best = min(best, time.perf_counter() - t0)
  return result, best


def _gap(params, cfg, prompt, want, got, at: int) -> str:
  """Where speculative decoding chose another token than greedy decoding: both tokens' logits by the
  target in one forward pass over the prompt and greedy's tokens before it (right-padded to prompt +
  all of greedy's tokens: one compiled program for every prompt of a length). A gap of the order of the
  compute dtype's rounding is a near-tie that either way of decoding may break either way."""
  if at >= min(len(want), len(got)):
    return " (one stopped earlier)"
  seen = prompt + want[:at]
  tokens_1L = jnp.asarray([seen + [0] * (len(prompt) + len(want) - len(seen))], jnp.int32)
  logits_V = G.prompt_logits(params, tokens_1L, cfg)[0, len(seen) - 1]
  a, b = float(logits_V[want[at]]), float(logits_V[got[at]])
  return f": the target's logits of greedy's token {a:.5f} and of this one {b:.5f} (gap {abs(a - b):.2g})"


def main() -> int:
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--model", required=True)
  ap.add_argument("--draft", help="a draft model (run or package); without it only --ngram rows")
  ap.add_argument("--ngram", type=int, default=0, help="also prompt lookup of up to N tokens (0: off)")
  ap.add_argument("--text", required=True, help="a text file the prompts are cut from")
  ap.add_argument("--prompts", type=int, default=8)
  ap.add_argument("--prompt_tokens", type=int, default=64)
  ap.add_argument("--new_tokens", type=int, default=256)
  ap.add_argument("--k", default="2,4,6")
  ap.add_argument("--repeats", type=int, default=3)
  ap.add_argument("--batch", type=int, default=1, help="prompts decoded together (rows of one call)")
  ap.add_argument(
    "--refill",
    action="store_true",
    help="with more prompts than --batch: also all prompts in one call, --batch rows at a time, a row"
    " whose prompt finished taking the next (continuous batching; the plain rows wait for a group's slowest)",
  )
  ap.add_argument("--temperature", type=float, default=0.0, help="> 0: sampled decoding (no equality check)")
  ap.add_argument(
    "--levers",
    default=None,
    help="both models' decode levers (default: model.default_levers(speculative=True))",
  )
  ap.add_argument(
    "--dtype", default="auto", help="compute dtype (auto: bfloat16 on GPUs; float32: full precision)"
  )
  ap.add_argument(
    "--trace",
    help="profiler traces of one plain and one speculative call (largest k) here; with --refill also"
    " one call of every prompt with rows refilled",
  )
  args = ap.parse_args()
  if not args.draft and not args.ngram:
    ap.error("give --draft, --ngram or both")
  if args.refill and args.prompts <= args.batch:
    ap.error(f"--refill needs more --prompts ({args.prompts}) than --batch rows ({args.batch})")
  if args.dtype == "float32":  # not TF32: the check against greedy decoding must be exact
    jax.config.update("jax_default_matmul_precision", "highest")
  target = open_model(args.model, dtype=args.dtype)
  if args.levers is None:
    args.levers = default_levers(target.params, speculative=True)
  params, cfg = unstack_layers(target.params, target.model_config, levers=args.levers)
  proposers, named = [], f"model {target.describe()}"  # (row name, draft params, draft cfg)
  if args.draft:
    small = open_model(args.draft, dtype=args.dtype)
    proposers.append(("draft", *unstack_layers(small.params, small.model_config, levers=args.levers)))
    named += f"; draft {small.describe()}"
  if args.ngram:
    proposers.append((f"lookup of {args.ngram}", None, None))
  tok, eos = target.tokenizer, -1  # no end of sequence: every prompt decodes new_tokens
  ids = tok.encode(open(args.text, encoding="utf-8").read())
  step = max(1, (len(ids) - args.prompt_tokens) // args.prompts)
  prompts = [ids[i * step : i * step + args.prompt_tokens] for i in range(args.prompts)]
  groups = [prompts[i : i + args.batch] for i in range(0, len(prompts), args.batch)]  # decoded together
  sp = G.SamplingParams(max_new_tokens=args.new_tokens, temperature=args.temperature)
  print(f"{jax.devices()[0].device_kind}: {named}", flush=True)
  print(f"decode levers {args.levers!r}", flush=True)

  def plain(params, cfg):  # (each prompt's tokens, seconds over all groups) without speculation
    def one(g):
      return G.generate(params, cfg, g, sp, eos_id=eos, vocab_limit=tok.vocab_size)

    runs = [_timed(lambda g=g: one(g), args.repeats) for g in groups]
    return [gen.tokens for gens, _ in runs for gen in gens], sum(s for _, s in runs)

  want, base_s = plain(params, cfg)
  total, differ = sum(map(len, want)), 0
  steps = total / len(prompts) * len(groups)  # decode steps of all groups
  mode = f"sampled at temperature {args.temperature}" if args.temperature else "greedy"
  one = "one prompt at a time" if args.batch == 1 else f"{args.batch} prompts at a time"
  head = f"decoding, {one} | tokens/s | proposals accepted | tokens per target call (all rows)"
  print(f"\n| {head} | ms per step or round | speed-up | prompts equal to greedy |")
  print("| --- | --- | --- | --- | --- | --- | --- |", flush=True)

  def row(name, tps, a, per, ms, up, *eq):  # printed as soon as measured: a timeout keeps the rows so far
    same = f"{eq[0]} of {len(prompts)}" if eq else ""
    print(f"| {name} | {tps:,.0f} | {a} | {per} | {ms:.3f} | {up:.2f}x | {same} |", flush=True)

  row(mode, total / base_s, "", "", 1000 * base_s / steps, 1.0)
  for name, draft, draft_cfg in proposers:
    if draft is not None:  # a draft step's time, for the round's parts
      _, s = plain(draft, draft_cfg)
      row(f"{name} alone, {mode}", total / s, "", "", 1000 * s / steps, base_s / s)

  def spec(g, k, draft, draft_cfg, rows=0):
    return G.speculative_generate(
      params,
      cfg,
      draft,
      draft_cfg,
      g,
      max_new_tokens=args.new_tokens,
      k=k,
      eos_id=eos,
      vocab_limit=tok.vocab_size,
      ngram=args.ngram or 3,
      temperature=args.temperature,
      rows=rows,
    )

  def compare(name, k, g, got, first: int) -> int:  # prompts equal to greedy; the others' gaps printed
    same = 0
    for p, w, t in zip(g, want[first:], got, strict=False):
      same += t == w
      if t != w and not args.temperature:
        at = next((j for j, (a, b) in enumerate(zip(t, w, strict=False)) if a != b), min(len(w), len(t)))
        gap = _gap(params, cfg, p, w, t, at)
        print(f"{name}, k={k}: tokens differ from greedy decoding from new token {at}{gap}", file=sys.stderr)
    return same

  for (name, draft, draft_cfg), k in itertools.product(proposers, [int(x) for x in args.k.split(",")]):
    spec_s, acc, prop, calls, same = 0.0, 0, 0, 0, 0
    for i, g in enumerate(groups):
      (got, stats), s = _timed(lambda g=g, k=k, d=draft, dc=draft_cfg: spec(g, k, d, dc), args.repeats)
      equal = compare(name, k, g, got, i * args.batch)
      same, differ = same + equal, differ + (0 if args.temperature else len(g) - equal)
      spec_s, acc, prop, calls = (
        spec_s + s,
        acc + stats["accepted"],
        prop + stats["proposed"],
        calls + stats["rounds"],
      )
    eq = () if args.temperature else (same,)
    per_call, ms = f"{total / calls:.2f}", 1000 * spec_s / calls
    row(f"{name}, k={k}", total / spec_s, f"{acc / prop:.0%}", per_call, ms, base_s / spec_s, *eq)
    if args.refill:  # all prompts in one call, a finished row taking the next prompt
      fn = functools.partial(spec, prompts, k, draft, draft_cfg, rows=args.batch)
      (got, stats), s = _timed(fn, args.repeats)
      equal = compare(f"{name} refilled", k, prompts, got, 0)
      differ += 0 if args.temperature else len(prompts) - equal
      eq = () if args.temperature else (equal,)
      calls, acc = stats["rounds"], f"{stats['accepted'] / stats['proposed']:.0%}"
      row(
        f"{name}, k={k}, rows refilled",
        total / s,
        acc,
        f"{total / calls:.2f}",
        1000 * s / calls,
        base_s / s,
        *eq,
      )
  if args.trace:  # one call of each under the profiler, already compiled: the first group
    k = max(int(x) for x in args.k.split(","))
    calls = {
      "plain": lambda: G.generate(params, cfg, groups[0], sp, eos_id=eos, vocab_limit=tok.vocab_size),
      f"speculative_k{k}": lambda: spec(groups[0], k, *proposers[0][1:]),
    }
    if args.refill:  # every prompt, --batch rows at a time: where a refill's time goes
      calls[f"refilled_k{k}"] = lambda: spec(prompts, k, *proposers[0][1:], rows=args.batch)
    for label, fn in calls.items():
      fn()
      with jax.profiler.trace(os.path.join(args.trace, label)):
        fn()
      for path in glob.glob(os.path.join(args.trace, label, "**", "*.trace.json.gz"), recursive=True):
        shutil.copy(path, os.path.join(args.trace, f"{label}.trace.json.gz"))  # a flat copy to fetch
      print(f"traced {label} ({proposers[0][0]} for speculative): {args.trace}/{label}.trace.json.gz")
  return 1 if differ and cfg.dtype == "float32" else 0


if __name__ == "__main__":
  sys.exit(main())
