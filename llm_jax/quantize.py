"""int8 weight-only quantization with per-output-channel scales, and the report comparing precisions.

Quantized: every dense kernel, the token embedding (one scale per row, which is also the output
channel of the tied head) and an untied head. Norms, biases and learned positions stay float.
A quantized leaf is a `QTensor(q int8, scale float32)`; `dequantize` turns a tree back into floats
(eagerly at load, or inside a jitted function so that weights stay int8 in device memory).

    python -m llm_jax.quantize --package=PKG --text=held_out.txt [--batch=1,8,32]
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

SCALE_SUFFIX = ".scale"


@struct.dataclass
class QTensor:
  """An int8 tensor and its float32 scale (keepdims shape, broadcast against q)."""
  q: Any
  scale: Any

  @property
  def shape(self):
    return self.q.shape


def is_qtensor(x) -> bool:
  return isinstance(x, QTensor)


def contracting_axes(name: str, ndim: int) -> tuple[int, ...] | None:
  """Axes a weight is summed over in its matmul (scales are per the other axes); None: not quantized."""
  parts = name.split("/")
  lead = 1 if parts[0] == "blocks" else 0  # scanned layers carry a leading layer axis
  if parts[-1] == "embedding" and ndim == 2:
    return (1,)  # [V, D]: one scale per vocab row (lookup row and tied-head output channel)
  if parts[-1] == "head" and ndim == 2:
    return (0,)  # [D, V]
  if parts[-1] != "kernel" or ndim - lead < 2:
    return None
  if len(parts) >= 2 and parts[-2] == "out":
    return (lead, lead + 1)  # attention output [N, H, D]
  return (lead,)  # [D_in, *out]


def quantize_array(w, axes: tuple[int, ...]) -> QTensor:
  """Symmetric int8: scale = max|w| over `axes` / 127, q = round(w / scale)."""
  w = np.asarray(w, dtype=np.float32)
  amax = np.max(np.abs(w), axis=axes, keepdims=True)
  scale = np.where(amax > 0, amax / 127.0, 1.0).astype(np.float32)
  q = np.clip(np.rint(w / scale), -127, 127).astype(np.int8)
  return QTensor(q=q, scale=scale)


def _name(path) -> str:
  return "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)


def quantize_params(params) -> Any:
  """Replaces every matmul weight in a parameter tree with a QTensor (numpy, on the host)."""
  def one(path, leaf):
    axes = contracting_axes(_name(path), np.ndim(leaf))
    return leaf if axes is None else quantize_array(leaf, axes)
  return jax.tree_util.tree_map_with_path(one, params)


def dequantize(params, dtype=jnp.float32) -> Any:
  """QTensor leaves -> float arrays of `dtype`; other leaves unchanged. Works eagerly and under jit."""
  def one(leaf):
    if is_qtensor(leaf):
      return (jnp.asarray(leaf.q).astype(jnp.float32) * jnp.asarray(leaf.scale)).astype(dtype)
    return leaf
  return jax.tree.map(one, params, is_leaf=is_qtensor)


def has_qtensors(params) -> bool:
  return any(is_qtensor(x) for x in jax.tree.leaves(params, is_leaf=is_qtensor))


def nbytes(params) -> int:
  """Bytes the weights take (int8 values plus their scales for quantized leaves)."""
  leaves = jax.tree.leaves(params)  # a QTensor flattens to q and scale
  return int(sum(np.asarray(x).nbytes if not hasattr(x, "nbytes") else x.nbytes for x in leaves))


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
  # `python -m` runs this file as __main__, a second copy of the module: run the package module's
  # main instead, so that its QTensor is the class the rest of llm_jax recognizes.
  from llm_jax import quantize as _module
  raise SystemExit(_module.main())
