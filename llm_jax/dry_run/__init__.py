"""`--dry_run`: the mesh, the per-device batch and a per-device memory estimate, before anything compiles.

    python -m llm_jax.train --config=configs/llama_8b.py --workdir=runs/x --dry_run
    python -m llm_jax.dry_run --config=configs/llama_8b.py --devices=4 --device_memory_gib=141 --platform=gpu

(the second plans hardware that is not here; llm_jax/dry_run/__main__.py is that command)

Parameters, gradients and optimizer state are counted exactly from the model's abstract shapes and the
configured logical->mesh rules (shards rounded up, as GSPMD pads them). Activations are an estimate of
what the backward pass keeps per layer under `model.remat`, plus one layer's working set and the output
head; XLA's workspace and allocator fragmentation come on top, so keep some headroom.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from llm_jax import config as config_lib
from llm_jax import sharding as sharding_lib
from llm_jax.model import Decoder, ModelConfig
from llm_jax.train import metrics as metrics_lib
from llm_jax.train import optimizer as optimizer_lib

GIB = 1024**3


@dataclasses.dataclass(frozen=True)
class Estimate:
  """Everything the dry run prints; byte figures are per device."""

  num_devices: int
  mesh: dict[str, int]
  global_batch: int
  seq_len: int
  microbatches: int
  rows_per_device: int  # rows of one microbatch pass on one device
  param_count: int
  param_bytes: int
  grad_bytes: int
  optimizer_bytes: int
  activation_bytes: int
  device_memory_bytes: int | None
  compute_dtype: str

  @property
  def total_bytes(self) -> int:
    return self.param_bytes + self.grad_bytes + self.optimizer_bytes + self.activation_bytes

  @property
  def fits(self) -> bool | None:
    if not self.device_memory_bytes:
      return None
    return self.total_bytes <= self.device_memory_bytes


def tokenizer_size(config) -> int:
  """The vocabulary the model will get: model.vocab_size, else data.tokenizer.vocab_size padded."""
  if config.model.vocab_size:
    return int(config.model.vocab_size)
  return config_lib.padded_vocab(config.data.tokenizer.vocab_size, config.model.vocab_multiple)


def _abstract_boxed_state(model: Decoder, optimizer, seq_len: int = 8):
  """Abstract (params, opt_state) with their logical-partitioning boxes; allocates nothing."""

  def init(rng):
    params = model.init(rng, jnp.zeros((1, seq_len), jnp.int32))["params"]
    return params, optimizer.init(params)

  return jax.eval_shape(init, jax.random.key(0))


def _shard_bytes(abstract_boxed, mesh: dict[str, int], config) -> int:
  """Bytes one device holds of a boxed abstract tree, under the config's logical->mesh rules."""
  specs = nn.logical_to_mesh(nn.get_partition_spec(abstract_boxed), sharding_lib.rules(config))
  leaves = jax.tree.leaves(nn.unbox(abstract_boxed))
  spec_leaves = jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
  if len(leaves) != len(spec_leaves):  # pragma: no cover - flax keeps these trees aligned
    raise RuntimeError(f"{len(leaves)} arrays but {len(spec_leaves)} partition specs")
  total = 0
  for leaf, spec in zip(leaves, spec_leaves, strict=True):
    dims = list(leaf.shape)
    for i, entry in enumerate(spec):
      if entry is None:
        continue
      axes = entry if isinstance(entry, tuple) else (entry,)
      dims[i] = math.ceil(dims[i] / math.prod(mesh[a] for a in axes))
    total += int(np.prod(dims, dtype=np.int64)) * leaf.dtype.itemsize
  return total


def activation_bytes(mc: ModelConfig, rows: int, seq_len: int, tensor: int) -> int:
  """Estimated bytes the forward pass keeps for the backward pass on one device, for `rows` rows."""
  s = jnp.dtype(mc.dtype).itemsize
  logit_s = jnp.dtype(mc.logits_dtype).itemsize
  t = max(1, tensor)
  e = rows * seq_len  # tokens on this device
  d, n, k, h, f, v = mc.d_model, mc.num_heads, mc.num_kv_heads, mc.head_dim, mc.mlp_dim, mc.vocab_size
  norm = e * d * (4 + s)  # float32 input and the compute-dtype output
  qkv = e * (n + 2 * k) * h // t * s
  attn_out = e * n * h // t * s
  if mc.attention == "cudnn":  # flash attention keeps only the softmax statistics
    scores = rows * n * seq_len * 4 // t
  else:  # XLA materializes scores and float32 probabilities
    scores = rows * n * seq_len * seq_len // t * (s + 4)
  mlp_mats = 2 if mc.activation == "swiglu" else 1  # matmul outputs before the down projection
  mlp = e * f // t * s * (2 * mlp_mats)  # those outputs and their activations
  residual = e * d * s
  layer = 2 * norm + qkv + scores + attn_out + mlp + 3 * residual
  if mc.remat == "none":
    kept = layer
  elif mc.remat == "full":
    kept = residual
  else:  # dots: matmul outputs; dots_no_batch: without the attention einsums (batch dims)
    dots = qkv + 2 * residual + e * f // t * s * mlp_mats + residual
    if mc.remat == "dots":
      dots += rows * n * seq_len * seq_len // t * s + attn_out
    kept = dots
  working = 0 if mc.remat == "none" else layer  # one layer recomputed at a time
  head = e * d * (4 + s) + e * v // t * (2 * logit_s + 4)  # final norm, logits, their gradient, probs
  return int(mc.num_layers * kept + working + head + e * d * s)


def estimate(
  config,
  num_devices: int,
  *,
  device_memory_bytes: int | None = None,
  platform: str | None = None,
  vocab_size: int | None = None,
) -> Estimate:
  """The dry run's figures for `num_devices` devices, computed from shapes alone (nothing compiles)."""
  config_lib.validate(config, num_devices)
  data, fsdp, tensor = config_lib.mesh_shape(config, num_devices)
  mesh = {"data": data, "fsdp": fsdp, "tensor": tensor}
  platform = platform or jax.default_backend()
  mc = ModelConfig.from_config(config, vocab_size or tokenizer_size(config), platform=platform)
  tr = config.train
  micro = max(1, int(tr.microbatches))
  rows = tr.global_batch_size // micro // (data * fsdp)
  shapes_only = Decoder(dataclasses.replace(mc, attention="xla"))  # traceable without cuDNN
  params, opt_state = _abstract_boxed_state(shapes_only, optimizer_lib.make_optimizer(config))
  param_bytes = _shard_bytes(params, mesh, config)
  # Gradients have the parameters' sharding; accumulation over microbatches keeps a second copy.
  grad_bytes = param_bytes * (2 if micro > 1 else 1)
  return Estimate(
    num_devices=num_devices,
    mesh=mesh,
    global_batch=int(tr.global_batch_size),
    seq_len=int(tr.seq_len),
    microbatches=micro,
    rows_per_device=int(rows),
    param_count=sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nn.unbox(params))),
    param_bytes=param_bytes,
    grad_bytes=grad_bytes,
    optimizer_bytes=_shard_bytes(opt_state, mesh, config),
    activation_bytes=activation_bytes(mc, rows, int(tr.seq_len), tensor),
    device_memory_bytes=device_memory_bytes,
    compute_dtype=mc.dtype,
  )


def _gib(n: int) -> str:
  return f"{n / GIB:9.2f} GiB"


def report(est: Estimate, config, *, device_name: str = "", num_processes: int = 1) -> str:
  """The dry run's text: mesh, batch, and the memory table against the device's memory."""
  m = est.mesh
  tokens = est.global_batch * est.seq_len
  lines = [
    f"dry run: {est.num_devices} x {device_name or 'device'} in {num_processes} process(es); "
    f"{est.param_count:,} parameters, compute {est.compute_dtype}",
    f"mesh: data={m['data']} fsdp={m['fsdp']} tensor={m['tensor']}",
    f"batch: global {est.global_batch} rows x {est.seq_len} tokens = {tokens:,} tokens/step; "
    f"{est.microbatches} microbatch(es) -> {est.rows_per_device} rows "
    f"({est.rows_per_device * est.seq_len:,} tokens) per device per pass",
    "memory per device:",
  ]
  rows = [
    ("parameters (float32)", est.param_bytes, ""),
    ("gradients" + (" + accumulator" if est.microbatches > 1 else ""), est.grad_bytes, ""),
    ("optimizer state", est.optimizer_bytes, ""),
    (f"activations (remat={config.model.remat})", est.activation_bytes, "  (estimate)"),
    ("total", est.total_bytes, ""),
  ]
  lines += [f"  {label:<34}{_gib(n)}{note}" for label, n, note in rows]
  if est.device_memory_bytes:
    share = est.total_bytes / est.device_memory_bytes
    verdict = "fits" if est.fits else "DOES NOT FIT: more devices, fsdp, remat or microbatches"
    lines.append(f"  {'device memory':<34}{_gib(est.device_memory_bytes)}  ({share:.0%} used: {verdict})")
  else:
    lines.append(f"  {'device memory':<34}unknown (this backend reports none)")
  lines.append("nothing was compiled; drop --dry_run to train")
  return "\n".join(lines)


def device_memory(device: Any) -> int | None:
  """The allocator's limit on one device in bytes, when the backend reports it (GPU, TPU)."""
  limit = metrics_lib.device_memory_stats(device).get("bytes_limit")
  return int(limit) if limit else None


def run(config) -> Estimate:
  """The dry run on the devices of this job: prints the report on process 0 and returns the figures."""
  devices = jax.devices()
  est = estimate(
    config,
    len(devices),
    device_memory_bytes=device_memory(jax.local_devices()[0]),
    platform=devices[0].platform,
  )
  if jax.process_index() == 0:
    print(
      report(est, config, device_name=devices[0].device_kind, num_processes=jax.process_count()), flush=True
    )
  return est
