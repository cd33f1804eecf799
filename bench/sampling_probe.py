"""Times the draw of each row's next token (generate/draw.py, what every decode step does before the
model runs) by itself, at a server's shapes, against the argmax-only draw and against other ways to
draw (docs/serving.md, issue 19). One JSON line per variant and batch: microseconds per step.

    python bench/sampling_probe.py                         # B=2,32 V=50304, 256 steps, on the GPU
    python bench/sampling_probe.py --vocab=512 --steps=8   # CPU smoke test
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

from llm_jax.generate.draw import DecodeState, draw
from llm_jax.model import ModelConfig


def _state(b: int, v: int, temperature: float, impl: str, top_p: float = 1.0) -> DecodeState:
  logits = jax.random.normal(jax.random.key(0), (b, v), jnp.float32) * 3
  keys = jax.vmap(lambda s: jax.random.key(s, impl=impl))(jnp.arange(b, dtype=jnp.uint32))
  z = jnp.zeros((b,), jnp.int32)
  return DecodeState(
    cache=None,
    logits_BV=logits,
    positions_B=z,
    active_B=jnp.ones((b,), bool),
    remaining_B=z + 10**6,
    seen_BV=jnp.zeros((b, v), bool),
    keys_B=keys,
    temperature_B=jnp.full((b,), temperature, jnp.float32),
    top_k_B=z,
    top_p_B=jnp.full((b,), top_p, jnp.float32),
    penalty_B=jnp.ones((b,), jnp.float32),
    pending_B=jnp.zeros((b,), bool),
    next_B=z,
  )


def _loop(cfg, steps, top_n, greedy, filtered):
  @jax.jit
  def run(state, want_top):
    def body(i, carry):
      st, acc = carry
      st, tok_B, outs = draw(st, cfg, -1, top_n, cfg.vocab_size, want_top, greedy, filtered)
      # the next logits depend on this step's token (as the model's would): nothing is hoisted
      bump_BV = (jnp.arange(cfg.vocab_size)[None, :] == tok_B[:, None]) * 1e-3
      st = st.replace(logits_BV=st.logits_BV - bump_BV)
      return st, acc + outs["token"].sum() + outs["logprob"].sum().astype(jnp.int32)

    return jax.lax.fori_loop(0, steps, body, (state, jnp.int32(0)))

  return run


def _inverse_cdf(key, logits_V, axis=-1, shape=None):
  """One uniform per row: the token whose cumulative probability first passes it (two levels of 256)."""
  del axis, shape
  v = logits_V.shape[-1]
  block = 256
  pad = (-v) % block
  p_V = jax.nn.softmax(logits_V)
  p_NK = jnp.pad(p_V, (0, pad)).reshape(-1, block)
  u = jax.random.uniform(key) * p_NK.sum()
  csum_N = jnp.cumsum(p_NK.sum(-1))
  n = jnp.minimum(jnp.sum(csum_N < u), p_NK.shape[0] - 1)
  before = jnp.where(n > 0, csum_N[n - 1], 0.0)
  csum_K = jnp.cumsum(p_NK[n]) + before
  k = jnp.minimum(jnp.sum(csum_K < u), block - 1)
  return jnp.minimum(n * block + k, v - 1)


@contextlib.contextmanager
def _patched(obj, name, value):
  old = getattr(obj, name)
  setattr(obj, name, value)
  try:
    yield
  finally:
    setattr(obj, name, old)


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--batch", default="2,32")
  ap.add_argument("--vocab", type=int, default=50304)
  ap.add_argument("--steps", type=int, default=256)
  ap.add_argument("--reps", type=int, default=5)
  args = ap.parse_args()
  cfg = ModelConfig(
    vocab_size=args.vocab,
    num_layers=1,
    d_model=8,
    num_heads=1,
    num_kv_heads=1,
    head_dim=8,
    mlp_dim=8,
    max_seq_len=10**7,
  )
  variants = {
    # name: (temperature, top_n, greedy, filtered, key impl, patches[, top_p])
    "argmax-only step (greedy=True)": (0.0, 5, True, False, "threefry2x32", []),
    "engine, all rows greedy (filtered=False)": (0.0, 5, False, False, "threefry2x32", []),
    "engine, T=0.8 (filtered=False)": (0.8, 5, False, False, "threefry2x32", []),
    "T=0.8, top_n=0 (chosen log-prob only)": (0.8, 0, False, False, "threefry2x32", []),
    "T=0.8, chosen on the device (filtered=None: one lax.cond)": (0.8, 5, False, None, "threefry2x32", []),
    "T=0.8 top_p=0.9 (filtered=True: the sort)": (0.8, 5, False, True, "threefry2x32", [], 0.9),
    "T=0.8, rbg keys": (0.8, 5, False, False, "rbg", []),
    "T=0.8, unsafe_rbg keys": (0.8, 5, False, False, "unsafe_rbg", []),
    "T=0.8, inverse CDF (one uniform per row)": (
      0.8,
      5,
      False,
      False,
      "threefry2x32",
      [(jax.random, "categorical", _inverse_cdf)],
    ),
  }
  for b in [int(x) for x in args.batch.split(",")]:
    for name, (temp, top_n, greedy, filtered, impl, patches, *top_p) in variants.items():
      try:
        with contextlib.ExitStack() as stack:
          for obj, attr, value in patches:
            stack.enter_context(_patched(obj, attr, value))
          run = _loop(cfg, args.steps, top_n, greedy, filtered)
          state = _state(b, args.vocab, temp, impl, *top_p)
          jax.block_until_ready(run(state, np.bool_(False)))
          times = []
          for _ in range(args.reps):
            t0 = time.perf_counter()
            jax.block_until_ready(run(state, np.bool_(False)))
            times.append(time.perf_counter() - t0)
        us = 1e6 * sorted(times)[len(times) // 2] / args.steps
        print(json.dumps({"batch": b, "variant": name, "us_per_step": round(us, 2)}), flush=True)
      except Exception as e:  # noqa: BLE001 - report and go on
        print(json.dumps({"batch": b, "variant": name, "error": f"{type(e).__name__}: {e}"[:300]}))
  print(f"device: {jax.devices()[0].device_kind}, jax {jax.__version__}")


if __name__ == "__main__":
  main()
