"""How XLA runs the decode step's skinny matmuls: 12 layers of an MLP (768 -> 3072 -> 768, bf16)
for a few rows, with the weights stored [in, out] (as the model keeps them) or [out, in].

Prints microseconds per matmul and what XLA made of them (gemm fusions or multiply + reduce).

    python3 bench/gpu_matvec_probe.py        # on the device machine
"""
import re
import time

import jax
import jax.numpy as jnp

D, F, LAYERS, CALLS = 768, 3072, 12, 200


def make(layout):
  keys = jax.random.split(jax.random.key(0), 2 * LAYERS)
  shape_up, shape_down = ((D, F), (F, D)) if layout == "in_out" else ((F, D), (D, F))
  ups = [jax.random.normal(keys[i], shape_up, jnp.bfloat16) * 0.02 for i in range(LAYERS)]
  downs = [jax.random.normal(keys[LAYERS + i], shape_down, jnp.bfloat16) * 0.02 for i in range(LAYERS)]
  spec = "bd,df->bf" if layout == "in_out" else "bd,fd->bf"

  @jax.jit
  def mlp(x, ups, downs):
    for u, d in zip(ups, downs):
      h = jax.nn.gelu(jnp.einsum(spec, x, u, preferred_element_type=jnp.float32).astype(x.dtype))
      x = x + jnp.einsum(spec, h, d, preferred_element_type=jnp.float32).astype(x.dtype)
    return x
  return mlp, ups, downs


def main():
  print(jax.devices()[0].device_kind, jax.__version__)
  print("| weights | rows | us per matmul | kernels of the compiled step |")
  print("| --- | --- | --- | --- |")
  for layout in ("in_out", "out_in"):
    mlp, ups, downs = make(layout)
    for rows in (1, 2, 4, 8, 32):
      x = jax.random.normal(jax.random.key(rows), (rows, D), jnp.bfloat16)
      hlo = mlp.lower(x, ups, downs).compile().as_text()
      kinds = {k: len(re.findall(p, hlo)) for k, p in
               (("gemm", r"gemm_fusion|custom-call\(.*cublas|__cublas"), ("reduce", r"input_reduce_fusion[.\d]* = "),
                ("multiply", r"loop_multiply_fusion[.\d]* = "))}
      jax.block_until_ready(mlp(x, ups, downs))
      best = float("inf")
      for _ in range(3):
        t0 = time.perf_counter()
        y = x
        for _ in range(CALLS):
          y = mlp(y, ups, downs)
        jax.block_until_ready(y)
        best = min(best, time.perf_counter() - t0)
      print(f"| {layout} | {rows} | {1e6 * best / CALLS / (2 * LAYERS):.2f} | {kinds} |", flush=True)


if __name__ == "__main__":
  main()
