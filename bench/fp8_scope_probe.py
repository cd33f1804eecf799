"""How far `model.fp8` moves the loss and gradients, with and without the head in FP8 (model.fp8_head),
at points of a real training run (docs/performance.md, "Which FP8 matmuls cost the loss").

A small character model trains on a text file with the switch off (AdamW, float32 compute); at the
given steps the same parameters and batch also go through the loss-and-gradient function of the FP8
settings, and each prints |loss - off's| and ||grad - off's|| / ||off's grad||. Float32 compute keeps
the comparison to FP8's own rounding. Runs on the CPU, where XLA keeps the FP8 rounding (upcast
inside the dot), in a few minutes:

    python bench/fp8_scope_probe.py --text=runs/data/tinyshakespeare/tinyshakespeare_train.txt
"""

from __future__ import annotations

import argparse
import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax

from llm_jax import config as config_lib
from llm_jax.model import Decoder, ModelConfig
from llm_jax.train import step as step_lib

SETTINGS = {"mlp": ["model.fp8=True"], "mlp+head": ["model.fp8=True", "model.fp8_head=True"]}


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--text", required=True, help="a text file; its bytes are the tokens (vocabulary 256)")
  p.add_argument("--at", default="0,50,200,400", help="steps at which the settings are compared")
  p.add_argument("--layers", type=int, default=4)
  p.add_argument("--d_model", type=int, default=128)
  p.add_argument("--seq", type=int, default=128)
  p.add_argument("--batch", type=int, default=16)
  p.add_argument("--lr", type=float, default=1e-3)
  a = p.parse_args()
  with open(a.text, "rb") as f:
    data = np.frombuffer(f.read(), np.uint8).astype(np.int32)
  base = [
    f"model.num_layers={a.layers}",
    f"model.d_model={a.d_model}",
    "model.num_heads=4",
    f"model.max_seq_len={a.seq}",
    f"train.seq_len={a.seq}",
    f"train.global_batch_size={a.batch}",
    "model.dtype=float32",
  ]

  def loss_and_grads(overrides):
    c = config_lib.load("configs/tiny.py", base + overrides)
    config_lib.validate(c, 1)
    model = Decoder(ModelConfig.from_config(c, tokenizer_size=256, platform="cpu"))
    return model, jax.jit(functools.partial(step_lib.loss_and_grads, model=model, config=c))

  model, off = loss_and_grads([])
  fp8 = {name: loss_and_grads(o)[1] for name, o in SETTINGS.items()}
  rng = np.random.default_rng(0)

  def batch():
    ix = rng.integers(0, len(data) - a.seq - 1, a.batch)
    t = np.stack([data[i : i + a.seq + 1] for i in ix])
    return {"inputs": t[:, :-1], "targets": t[:, 1:], "weights": np.ones((a.batch, a.seq), np.float32)}

  params = model.init(jax.random.key(0), jnp.asarray(batch()["inputs"]))["params"]
  opt = optax.adamw(a.lr)
  opt_state = opt.init(params)

  @jax.jit
  def update(params, opt_state, grads):
    updates, opt_state = opt.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  def flat(g):
    return np.concatenate([np.asarray(x, np.float32).ravel() for x in jax.tree.leaves(g)])

  at = {int(s) for s in a.at.split(",")}
  key = jax.random.key(2)
  for step in range(max(at) + 1):
    b = batch()
    loss, grads = off(params, b, key)
    if step in at:
      row = {"step": step, "loss": round(float(loss), 4)}
      g_off = flat(grads)
      for name, fn in fp8.items():
        l8, g8 = fn(params, b, key)
        row[f"{name} |dloss|"] = float(f"{abs(float(l8 - loss)):.2e}")
        row[f"{name} grad rel"] = round(float(np.linalg.norm(flat(g8) - g_off) / np.linalg.norm(g_off)), 4)
      print(json.dumps(row), flush=True)
    params, opt_state = update(params, opt_state, grads)


if __name__ == "__main__":
  main()
