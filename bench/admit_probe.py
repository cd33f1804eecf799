"""Where a lone request's first token waits on the host (docs/serving.md, issue 19 round nine): the
engine's admission program for one 64-token prompt and then the 2-row decode chunk, called as the
engine calls them (serve.programs.Programs over random weights of configs/gpt_small.py's shapes in
the engine's layout, a 32-row state), with the admission's one packed array (prefill.pack_admission;
until round ten nine arrays) given as numpy (as the engine gives it) or already on the device.
Medians of 15 calls after 3, ms after the admission call: when it returned, when the chunk's
dispatch returned, when the admission and the chunk were done.

    python bench/admit_probe.py            # on the GPU
    python bench/admit_probe.py --small    # CPU smoke test (tiny shapes)
    XLA_FLAGS=--xla_gpu_enable_command_buffer= python bench/admit_probe.py   # command buffers off
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from llm_jax import config as config_lib
from llm_jax import generate as G
from llm_jax.artifacts import inference_config
from llm_jax.model import ModelConfig, unstack_layers
from llm_jax.model.params import init_params
from llm_jax.serve.engine import default_levers
from llm_jax.serve.prefill import pack_admission
from llm_jax.serve.programs import Programs

_SMALL = [
  "model.num_layers=2",
  "model.d_model=64",
  "model.num_heads=4",
  "model.vocab_size=512",
  "model.max_seq_len=256",
]


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--small", action="store_true", help="CPU smoke test: tiny shapes")
  args = p.parse_args()
  overrides = ["model.vocab_size=50304"] + (_SMALL if args.small else [])
  cfg = inference_config(
    ModelConfig.from_config(config_lib.load("configs/gpt_small.py", overrides)), "bfloat16"
  )
  params = jax.tree.map(lambda x: x.astype(jnp.bfloat16), init_params(cfg))
  params, cfg = unstack_layers(params, cfg, levers=default_levers(params))
  programs = Programs(params, cfg, rows=32, steps=16, top_n=5, vocab_limit=min(2000, cfg.vocab_size))
  state = programs.empty_state()
  chunk = ("decode", 2, 128, False, False)
  programs.build([("admit", 64, 1), chunk])
  print(f"{jax.devices()[0].device_kind}: programs built", flush=True)
  arrays = G.sampling_arrays([G.SamplingParams(temperature=0.8, max_new_tokens=128)])
  tokens = np.zeros((1, 64), np.int32)
  tokens[0, :5] = [1, 5, 6, 7, 8]
  host = pack_admission(np.zeros((1,), np.int32), tokens, np.full((1,), 5, np.int32), arrays)
  alive = np.array([True, False])

  def once(on_device: bool) -> list[float]:
    nonlocal state
    a = jax.block_until_ready(jax.device_put(host)) if on_device else host
    t0 = time.perf_counter()
    state, first = programs.run(("admit", 64, 1), state, a)
    t1 = time.perf_counter()
    state, out = programs.run(chunk, state, alive)
    t2 = time.perf_counter()
    jax.block_until_ready(first)
    t3 = time.perf_counter()
    jax.block_until_ready(out)
    t4 = time.perf_counter()
    return [1e3 * (t - t0) for t in (t1, t2, t3, t4)]

  for on_device in (False, True, False, True):
    for _ in range(3):
      once(on_device)
    runs = [once(on_device) for _ in range(15)]
    med = [statistics.median(r[i] for r in runs) for i in range(4)]
    print(
      f"packed array {'on the device' if on_device else 'as numpy'}: "
      f"admission call returned {med[0]:.2f} ms, "
      f"chunk dispatched {med[1]:.2f}, admission done {med[2]:.2f}, chunk done {med[3]:.2f}",
      flush=True,
    )


if __name__ == "__main__":
  main()
