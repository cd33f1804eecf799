"""The precision report: size, perplexity and decode speed of float32, bfloat16 and int8 weights.

    python -m llm_jax.quantize --package=PKG --text=held_out.txt [--batch=1,8,32]

The quantization itself (QTensor, quantize_params, dequantize) lives in llm_jax/model/quantize.py.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from llm_jax.model.quantize import dequantize, nbytes, quantize_params

# ------------------------------------------------------------------ the report (size, perplexity, speed)


def perplexity(params, cfg, token_windows, batch_size: int = 8) -> float:
  """exp(mean next-token loss) over [N, L+1] windows (float or QTensor params)."""
  from llm_jax.model import Decoder
  model = Decoder(cfg)

  @jax.jit
  def nll_sum(p, w_BT):
    p = dequantize(p, jnp.dtype(cfg.dtype))
    logits = model.apply({"params": p}, w_BT[:, :-1]).astype(jnp.float32)
    logp = jax.nn.log_softmax(logits, axis=-1)
    return -jnp.take_along_axis(logp, w_BT[:, 1:, None], axis=-1).sum()

  total, count = 0.0, 0
  for i in range(0, len(token_windows), batch_size):
    w = np.asarray(token_windows[i:i + batch_size], np.int32)
    total += float(nll_sum(params, w))
    count += w.shape[0] * (w.shape[1] - 1)
  return float(np.exp(total / max(count, 1)))


def windows(ids, length: int, max_windows: int) -> np.ndarray:
  """Non-overlapping windows of length+1 tokens (targets are the inputs shifted by one)."""
  n = min(max_windows, (len(ids) - 1) // length)
  if n < 1:
    raise ValueError(f"the text has {len(ids)} tokens; need at least {length + 1} for one window")
  return np.stack([np.asarray(ids[i * length:i * length + length + 1]) for i in range(n)])


def decode_speed(params, cfg, batch: int, new_tokens: int, repeats: int = 3) -> float:
  """Generated tokens per second of greedy decoding at a batch size (compile excluded)."""
  import time
  from llm_jax import generate as G
  from llm_jax.model import unstack_layers
  new_tokens = min(new_tokens, cfg.max_seq_len - 8)
  params, cfg = unstack_layers(params, cfg)  # as the server and the generate CLI decode
  prompts = [[1, 5 + i % 50, 6, 7, 8, 9, 10, 11] for i in range(batch)]
  b = G.make_batch(prompts, [G.SamplingParams(max_new_tokens=new_tokens)] * batch, cfg)
  state = b.start(params, cfg)
  run = lambda: jax.block_until_ready(G.decode_loop(params, state, cfg=cfg, max_steps=b.max_steps,
                                                    eos_id=-1, greedy=b.greedy, span=b.span))
  run()
  best = float("inf")
  for _ in range(repeats):
    t0 = time.perf_counter()
    run()
    best = min(best, time.perf_counter() - t0)
  return batch * new_tokens / best


def variants(loaded) -> dict[str, tuple[Any, Any, int]]:
  """(params, ModelConfig, stored bytes) for float32, bfloat16 and int8 (dequantized at load, or
  kept int8 in device memory and dequantized inside each step)."""
  import dataclasses
  cfg = loaded.model_config
  f32 = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), loaded.params)
  q = jax.tree.map(jnp.asarray, quantize_params(jax.device_get(f32)))
  b16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), f32)
  c32, c16 = dataclasses.replace(cfg, dtype="float32"), dataclasses.replace(cfg, dtype="bfloat16")
  return {
      "float32": (f32, c32, nbytes(f32)),
      "bfloat16": (b16, c16, nbytes(b16)),
      f"int8, dequantized at load ({cfg.dtype})": (dequantize(q, jnp.dtype(cfg.dtype)), cfg, nbytes(q)),
      f"int8 in memory ({cfg.dtype} compute)": (q, cfg, nbytes(q)),
  }


def report(package_path: str, text: str, *, batches=(1, 8), new_tokens: int = 64,
           max_windows: int = 64, compute_dtype: str | None = None) -> list[dict]:
  """Size, perplexity (and change vs float32) and decode tokens/s of each precision."""
  from llm_jax import package as package_lib
  loaded = package_lib.load_package(package_path, compute_dtype=compute_dtype)
  if loaded.meta.get("precision", {}).get("weights") == "int8":
    raise ValueError(f"{package_path} is already int8; compare from a float package")
  ids = loaded.tokenizer.encode(text)
  wins = windows(ids, loaded.model_config.max_seq_len, max_windows)
  rows = []
  from llm_jax.model import unstack_layers
  for name, (params, cfg, stored) in variants(loaded).items():
    params, cfg = unstack_layers(params, cfg)  # once per precision, not in every decode_speed call
    row = {"variant": name, "stored_bytes": stored, "memory_bytes": nbytes(params),
           "perplexity": perplexity(params, cfg, wins)}
    for b in batches:
      row[f"tokens_per_s_batch{b}"] = decode_speed(params, cfg, b, new_tokens)
    rows.append(row)
  base = rows[0]["perplexity"]
  for r in rows:
    r["perplexity_change_pct"] = 100.0 * (r["perplexity"] / base - 1.0)
  return rows


def format_report(rows: list[dict]) -> str:
  keys = [k for k in rows[0] if k.startswith("tokens_per_s")]
  head = ["variant", "stored MB", "in memory MB", "perplexity", "change %"] + [k.replace("tokens_per_s_", "tok/s ")
                                                                for k in keys]
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for r in rows:
    cells = [r["variant"], f"{r['stored_bytes'] / 1e6:.2f}", f"{r['memory_bytes'] / 1e6:.2f}",
             f"{r['perplexity']:.3f}",
             f"{r['perplexity_change_pct']:+.2f}"] + [f"{r[k]:.0f}" for k in keys]
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines)


def main(argv=None) -> int:
  """CLI: print the precision comparison table of a float package on a held-out text file."""
  import argparse
  import json
  ap = argparse.ArgumentParser(prog="python -m llm_jax.quantize", description=__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--package", required=True, help="a float32 or bfloat16 package")
  ap.add_argument("--text", required=True, help="held-out text file for perplexity")
  ap.add_argument("--batch", default="1,8", help="comma-separated decode batch sizes")
  ap.add_argument("--new_tokens", "--new-tokens", type=int, default=64)
  ap.add_argument("--max_windows", "--max-windows", type=int, default=64,
                  help="perplexity windows of max_seq_len tokens")
  ap.add_argument("--dtype", default=None, help="compute dtype of the int8 variants")
  ap.add_argument("--json", action="store_true")
  args = ap.parse_args(argv)
  with open(args.text, encoding="utf-8") as f:
    text = f.read()
  rows = report(args.package, text, batches=tuple(int(b) for b in args.batch.split(",")),
                new_tokens=args.new_tokens, max_windows=args.max_windows, compute_dtype=args.dtype)
  print(json.dumps(rows, indent=2) if args.json else format_report(rows))
  print(f"[{jax.devices()[0].device_kind}]")
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
