"""Times the output head + cross-entropy forward and backward at gpt_small's per-pass shapes: XLA's loss
(llm_jax.train.loss, what the model uses by default) against the fused Pallas kernel
(llm_jax.train.xent_kernel) for several block sizes and warp counts, and the head's three matmuls alone,
so each row minus that one is the loss's own cost (docs/performance.md, "A fused cross-entropy kernel").
One JSON line per row, a table last.

    python bench/xent_probe.py                                  # 64 x 1024 tokens, V=50304, D=768, bf16
    python bench/xent_probe.py --tokens=256 --vocab=300 --dim=32 --reps=2 --configs=128x4   # CPU smoke

--configs: BLOCKxWARPS, comma-separated (xent_kernel.nll_lse_grad's block and num_warps).
"""

from __future__ import annotations

import argparse
import json

import jax
import jax.numpy as jnp
from kernel_probe import median_ms, probe_row  # bench/ is on sys.path when this script runs

from llm_jax.train import xent_kernel
from llm_jax.train.loss import weighted_sums


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--tokens", type=int, default=64 * 1024)
  ap.add_argument("--vocab", type=int, default=50304)
  ap.add_argument("--dim", type=int, default=768)
  ap.add_argument("--reps", type=int, default=20)
  ap.add_argument("--configs", default="2048x4,1024x4,4096x4,4096x8,2048x8,1024x2,8192x8")
  args = ap.parse_args()
  k = jax.random.split(jax.random.key(0), 4)
  h = jax.random.normal(k[0], (args.tokens, args.dim), jnp.bfloat16)
  w = (jax.random.normal(k[1], (args.dim, args.vocab), jnp.float32) * 0.05).astype(jnp.bfloat16)
  t = jax.random.randint(k[2], (args.tokens,), 0, args.vocab)
  wt = jnp.ones((args.tokens,), jnp.float32)

  def head(h, w):
    return jnp.einsum("nd,dv->nv", h, w, preferred_element_type=jnp.bfloat16)

  @jax.jit
  def matmuls_only(h, w, t, wt):
    logits = head(h, w)
    return logits @ w.T, h.T @ logits

  @jax.jit
  def xla(h, w, t, wt):
    def total(h, w):
      nll, z, _ = weighted_sums(head(h, w)[None], t[None], wt[None], 1e-4)
      return nll + z

    return jax.value_and_grad(total, argnums=(0, 1))(h, w)

  def fused(block, warps):
    @jax.jit
    def run(h, w, t, wt):
      nll, lse, d = xent_kernel.nll_lse_grad(head(h, w), t, wt, z_loss=1e-4, block=block, num_warps=warps)
      total = jnp.sum(wt * (nll + 1e-4 * lse * lse))
      return total, (d @ w.T, h.T @ d)

    return run

  rows = []
  ref_total, (ref_dh, ref_dw) = xla(h, w, t, wt)
  for name, fn in [("head matmuls only", matmuls_only), ("xla loss (default)", xla)]:
    ms = median_ms(fn, (h, w, t, wt), args.reps)
    rows.append({"row": name, "ms": round(ms, 3)})
    print(json.dumps(rows[-1]), flush=True)
  for cfg in args.configs.split(","):
    block, warps = (int(x) for x in cfg.split("x"))

    def measure(block=block, warps=warps):
      fn = fused(block, warps)
      total, (dh, dw) = fn(h, w, t, wt)
      err = {
        "total_rel": float(abs(total - ref_total) / abs(ref_total)),
        "dh_max_abs": float(jnp.max(jnp.abs(dh.astype(jnp.float32) - ref_dh.astype(jnp.float32)))),
        "dh_ref_max": float(jnp.max(jnp.abs(ref_dh.astype(jnp.float32)))),
      }
      return {"ms": round(median_ms(fn, (h, w, t, wt), args.reps), 3), **err}

    rows.append(probe_row(f"pallas block={block} warps={warps}", measure))
  base = rows[0]["ms"]
  print(f"\n{jax.devices()[0].device_kind}, {args.tokens} x {args.vocab}, D={args.dim}")
  print("| row | ms | loss alone (ms) |")
  print("| --- | --- | --- |")
  for r in rows:
    if "ms" in r:
      print(f"| {r['row']} | {r['ms']:.3f} | {r['ms'] - base:.3f} |")
    else:
      print(f"| {r['row']} | error | |")


if __name__ == "__main__":
  main()
