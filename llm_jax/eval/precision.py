"""The precision report: size, perplexity and decode speed of float32, bfloat16 and int8 weights.

Run by `python -m llm_jax.quantize` (llm_jax/quantize.py); the quantization itself is
llm_jax/model/quantize.py.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from llm_jax import generate as G
from llm_jax.artifacts import open_model
from llm_jax.eval.decode_kernels import speed_batch
from llm_jax.model import Decoder, unstack_layers
from llm_jax.model.quantize import dequantize, nbytes, quantize_params


def perplexity(params, cfg, token_windows, batch_size: int = 8) -> float:
  """exp(mean next-token loss) over [N, L+1] windows (float or QTensor params)."""
  model = Decoder(cfg)

  @jax.jit
  def nll_sum(p, w_BT):
    p = dequantize(p, jnp.dtype(cfg.dtype))
    logits = model.apply({"params": p}, w_BT[:, :-1]).astype(jnp.float32)
    logp = jax.nn.log_softmax(logits, axis=-1)
    return -jnp.take_along_axis(logp, w_BT[:, 1:, None], axis=-1).sum()

  total, count = 0.0, 0
  for i in range(0, len(token_windows), batch_size):
    w = np.asarray(token_windows[i : i + batch_size], np.int32)
    total += float(nll_sum(params, w))
    count += w.shape[0] * (w.shape[1] - 1)
  return float(np.exp(total / max(count, 1)))


def windows(ids, length: int, max_windows: int) -> np.ndarray:
  """Non-overlapping windows of length+1 tokens (targets are the inputs shifted by one)."""
  n = min(max_windows, (len(ids) - 1) // length)
  if n < 1:
    raise ValueError(f"the text has {len(ids)} tokens; need at least {length + 1} for one window")
  return np.stack([np.asarray(ids[i * length : i * length + length + 1]) for i in range(n)])


def decode_speed(params, cfg, batch: int, new_tokens: int, repeats: int = 3, *, levers: str = "") -> float:
  """Generated tokens per second of greedy decoding at a batch size (compile excluded); `levers`:
  the decode levers to prepare the parameters for (ModelConfig.decode_levers)."""
  params, cfg = unstack_layers(params, cfg, levers=levers)  # as the server and the generate CLI decode
  b = speed_batch(cfg, batch, new_tokens)
  new_tokens = int(b.arrays["max_new_B"][0])
  state = b.start(params, cfg)
  run = lambda: jax.block_until_ready(G.decode_loop(params, state, cfg=cfg, eos_id=-1, **b.loop_args()))
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


def report(
  package_path: str,
  text: str,
  *,
  batches=(1, 8),
  new_tokens: int = 64,
  max_windows: int = 64,
  compute_dtype: str | None = None,
) -> list[dict]:
  """Size, perplexity (and change vs float32) and decode tokens/s of each precision."""
  loaded = open_model(package_path, dtype=compute_dtype or "auto")
  if loaded.meta.get("precision", {}).get("weights") == "int8":
    raise ValueError(f"{package_path} is already int8; compare from a float package")
  ids = loaded.tokenizer.encode(text)
  wins = windows(ids, loaded.model_config.max_seq_len, max_windows)
  rows = []
  for name, (params, cfg, stored) in variants(loaded).items():
    params, cfg = unstack_layers(params, cfg)  # once per precision, not in every decode_speed call
    row = {
      "variant": name,
      "stored_bytes": stored,
      "memory_bytes": nbytes(params),
      "perplexity": perplexity(params, cfg, wins),
    }
    for b in batches:
      row[f"tokens_per_s_batch{b}"] = decode_speed(params, cfg, b, new_tokens)
    rows.append(row)
  base = rows[0]["perplexity"]
  for r in rows:
    r["perplexity_change_pct"] = 100.0 * (r["perplexity"] / base - 1.0)
  return rows


def format_report(rows: list[dict]) -> str:
  """The report rows as a markdown table."""
  keys = [k for k in rows[0] if k.startswith("tokens_per_s")]
  head = ["variant", "stored MB", "in memory MB", "perplexity", "change %"]
  head += [k.replace("tokens_per_s_", "tok/s ") for k in keys]
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for r in rows:
    cells = [
      r["variant"],
      f"{r['stored_bytes'] / 1e6:.2f}",
      f"{r['memory_bytes'] / 1e6:.2f}",
      f"{r['perplexity']:.3f}",
      f"{r['perplexity_change_pct']:+.2f}",
    ] + [f"{r[k]:.0f}" for k in keys]
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines)
