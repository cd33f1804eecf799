"""LoRA: low-rank adapters on attention and MLP projections, without changing the model.

The adapters are their own pytree, mirroring the parameter names of the kernels they adapt:
`adapters["blocks"]["attn"]["query"]["kernel"] = {"a": A, "b": B}`. A kernel is viewed as a matrix
[in, out] (its leading input axes flattened: one for every kernel except attn/out, which contracts
heads and head_dim), A is [in, r] (normal, std 1/sqrt(in)) and B is [r, out] (zeros), with a leading
layer axis when the blocks are scanned. Inside the loss the effective weights are

    W_eff = W + (alpha / r) * A @ B

merged into the (stop-gradient) base parameters before `model.apply`, so only A and B get gradients,
the train state holds only the adapters and their optimizer moments, and checkpoints are adapters-only.
Dropout (finetune.lora.dropout) drops input features of the adapter path, one mask per step and layer
(x * m @ A == x @ (diag(m) A)): the merged form cannot drop per token.
"""
from __future__ import annotations

import dataclasses
import logging
import re

import jax
import jax.numpy as jnp
import numpy as np

from llm_jax import config as config_lib
from llm_jax import sharding as sharding_lib
from llm_jax.finetune.freeze import path_name
from llm_jax.train import step as step_lib
from llm_jax.train.state import TrainState

DEFAULT_TARGETS = r"attn/(query|key|value|out)/kernel,mlp/(gate|up|down)/kernel"
_TWO_INPUT_AXES = ("attn/out/kernel",)  # [heads, head_dim, d_model]: two contracted input axes


@dataclasses.dataclass(frozen=True)
class LoraSpec:
  """Rank, alpha, dropout and the regular expressions selecting kernels to adapt."""
  rank: int
  alpha: float = 16.0
  dropout: float = 0.0
  targets: tuple[str, ...] = tuple(DEFAULT_TARGETS.split(","))

  @property
  def scale(self) -> float:
    return float(self.alpha) / float(self.rank)


def spec_from_config(config) -> LoraSpec | None:
  """LoraSpec from config.finetune.lora, or None when LoRA is off (rank 0 or no section)."""
  f = config.get("finetune") if hasattr(config, "get") else None
  lo = f.get("lora") if f is not None else None
  if lo is None or int(lo.get("rank", 0)) == 0:
    return None
  rank = int(lo.rank)
  if rank < 0:
    raise config_lib.ConfigError(f"finetune.lora.rank={rank} must be >= 0 (0 disables LoRA)")
  if not 0.0 <= float(lo.dropout) < 1.0:
    raise config_lib.ConfigError(f"finetune.lora.dropout={lo.dropout} must be in [0, 1)")
  targets = tuple(t.strip() for t in str(lo.targets).split(",") if t.strip())
  if not targets:
    raise config_lib.ConfigError("finetune.lora.targets is empty; e.g. " + DEFAULT_TARGETS)
  for t in targets:
    try:
      re.compile(t)
    except re.error as e:
      raise config_lib.ConfigError(f"finetune.lora.targets: {t!r} is not a regular expression: {e}")
  return LoraSpec(rank=rank, alpha=float(lo.alpha), dropout=float(lo.dropout), targets=targets)


@dataclasses.dataclass(frozen=True)
class _Target:
  lead: tuple[int, ...]  # layer axis (scanned blocks) or ()
  in_shape: tuple[int, ...]
  out_shape: tuple[int, ...]

  @property
  def dims(self) -> tuple[int, int]:
    return int(np.prod(self.in_shape)), int(np.prod(self.out_shape))


def _target(name: str, shape: tuple[int, ...]) -> _Target:
  lead = shape[:1] if name.startswith("blocks/") else ()
  rest = shape[len(lead):]
  k = 2 if any(name.endswith(t) for t in _TWO_INPUT_AXES) else 1
  return _Target(lead=tuple(lead), in_shape=tuple(rest[:k]), out_shape=tuple(rest[k:]))


def find_targets(params, spec: LoraSpec) -> dict[str, _Target]:
  """{kernel name: its matrix view} for every kernel matched by spec.targets; none matched raises."""
  flat = jax.tree_util.tree_flatten_with_path(params)[0]
  kernels = {path_name(p): tuple(leaf.shape) for p, leaf in flat
             if path_name(p).endswith("kernel") and len(leaf.shape) >= 2}
  out, unmatched = {}, []
  for pattern in spec.targets:
    hits = [n for n in kernels if re.search(pattern, n)]
    if not hits:
      unmatched.append(pattern)
    for n in hits:
      out[n] = _target(n, kernels[n])
  if unmatched:
    raise config_lib.ConfigError(
        f"finetune.lora.targets {unmatched} match no kernel; the model's kernels are "
        f"{', '.join(sorted(kernels))}")
  return dict(sorted(out.items()))


def _set(tree: dict, name: str, value) -> None:
  *parents, last = name.split("/")
  for p in parents:
    tree = tree.setdefault(p, {})
  tree[last] = value


def _get(tree, name: str):
  for p in name.split("/"):
    tree = tree[p]
  return tree


def adapter_names(adapters) -> list[str]:
  """Names of the kernels an adapter tree adapts ('blocks/attn/query/kernel', ...)."""
  names = set()
  for path, _ in jax.tree_util.tree_flatten_with_path(adapters)[0]:
    name = path_name(path)
    names.add(name.rsplit("/", 1)[0])
  return sorted(names)


def init_adapters(params, spec: LoraSpec, seed: int = 0) -> dict:
  """A (normal, std 1/sqrt(in)) and B (zeros) for every target kernel, float32."""
  adapters: dict = {}
  key = jax.random.key(seed)
  for i, (name, t) in enumerate(find_targets(params, spec).items()):
    d_in, d_out = t.dims
    a = jax.random.normal(jax.random.fold_in(key, i), t.lead + (d_in, spec.rank), jnp.float32)
    _set(adapters, name, {"a": a / np.sqrt(d_in), "b": jnp.zeros(t.lead + (spec.rank, d_out), jnp.float32)})
  return adapters


def delta(name: str, kernel_shape, a, b, scale: float):
  """(alpha/r) * A @ B in the kernel's own shape."""
  d_BIO = jnp.einsum("...ir,...ro->...io", a, b) * scale
  return d_BIO.reshape(tuple(kernel_shape))


def merge(params, adapters, spec: LoraSpec, rng=None):
  """Base params with W + (alpha/r) A@B at every adapted kernel; `rng` enables adapter dropout."""
  out = jax.tree.map(lambda x: x, params)  # new containers, same leaves
  for i, name in enumerate(adapter_names(adapters)):
    ab = _get(adapters, name)
    w = _get(params, name)
    a = ab["a"]
    if rng is not None and spec.dropout > 0:
      keep = jax.random.bernoulli(jax.random.fold_in(rng, i), 1.0 - spec.dropout, a.shape[:-1] + (1,))
      a = jnp.where(keep, a / (1.0 - spec.dropout), 0.0)
    d = delta(name, w.shape, a, ab["b"], spec.scale)
    _set(out, name, w + d.astype(w.dtype))
  return out


def count(adapters) -> int:
  """Number of adapter parameters."""
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(adapters)))


# ------------------------------------------------------------------ training


def train_step(state: TrainState, batch, base_params, *, model, optimizer, config):
  """One update of the adapters in `state.params`; `base_params` (the frozen model) gets no gradient."""
  spec = spec_from_config(config)
  if spec is None:
    raise config_lib.ConfigError("lora.train_step needs finetune.lora.rank > 0")

  def params_fn(adapters, rng):
    base = jax.lax.stop_gradient(base_params)
    return merge(base, adapters, spec, rng if spec.dropout > 0 else None)

  return step_lib.train_step(state, batch, model=model, optimizer=optimizer, config=config,
                             params_fn=params_fn)


def init_state(base_params, optimizer, config, seed: int | None = None) -> TrainState:
  """Fresh adapters and their optimizer state (pure: base_params may be abstract, only shapes are read)."""
  spec = spec_from_config(config)
  if spec is None:
    raise config_lib.ConfigError("LoRA needs finetune.lora.rank > 0")
  seed = int(config.train.seed if seed is None else seed)
  adapters = init_adapters(base_params, spec, seed)
  return TrainState(step=jnp.zeros((), jnp.int32), params=adapters, opt_state=optimizer.init(adapters),
                    skipped=jnp.zeros((), jnp.int32))


def state_shardings(base_params, optimizer, mesh, config):
  """(abstract adapter state, its shardings): replicated, adapters are small."""
  abstract = jax.eval_shape(lambda: init_state(_abstract(base_params), optimizer, config))
  return abstract, jax.tree.map(lambda _: sharding_lib.replicated(mesh), abstract)


def create_state(base_params, optimizer, mesh, config, seed: int | None = None):
  """A TrainState whose params are fresh adapters; returns (state, shardings)."""
  spec = spec_from_config(config)
  base = _abstract(base_params)
  find_targets(base, spec)  # fail early, naming the key
  _, shardings = state_shardings(base, optimizer, mesh, config)
  state = jax.jit(lambda: init_state(base, optimizer, config, seed), out_shardings=shardings)()
  logging.info("LoRA: %d adapter parameters on %d kernels (rank %d, alpha %g)", count(state.params),
               len(adapter_names(state.params)), spec.rank, spec.alpha)
  return state, shardings


def _abstract(tree):
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)


def merged_params(workdir: str, step: int | None = None, mesh=None):
  """(base + merged adapters, config, step) of a LoRA run directory (its config.init_from is the base)."""
  from llm_jax.finetune import init_from  # noqa: PLC0415 - init_from imports this module
  from llm_jax.train import checkpoint  # noqa: PLC0415
  adapters, config, step = checkpoint.restore_params(workdir, step, mesh=mesh, merge_lora=False)
  spec = spec_from_config(config)
  if spec is None:
    raise config_lib.ConfigError(f"{workdir}/config.json: finetune.lora.rank is 0; not a LoRA run")
  if not config.get("init_from"):
    raise config_lib.ConfigError(f"{workdir}/config.json: init_from is empty; a LoRA run needs its base")
  source = init_from.load_source(config.init_from, step=_source_step(config), mesh=mesh)
  params = merge(source.params, adapters, spec)
  return jax.tree.map(lambda x: x.astype(jnp.float32), params), config, step


def _source_step(config):
  s = int(config.finetune.get("init_step", -1)) if config.get("finetune") else -1
  return None if s < 0 else s


def export(workdir: str, out: str, *, step: int | None = None, quantize: str = "none",
           weights_dtype: str = "float32", overwrite: bool = False) -> dict:
  """Writes a model package of a LoRA run with the adapters merged into the base weights."""
  import os  # noqa: PLC0415
  from llm_jax import export as export_lib  # noqa: PLC0415
  from llm_jax import package as package_lib  # noqa: PLC0415
  from llm_jax.model import ModelConfig  # noqa: PLC0415
  params, config, step = merged_params(workdir, step)
  tok_path = os.path.join(workdir, "tokenizer.model")
  if not os.path.exists(tok_path):
    raise package_lib.PackageError(f"{tok_path} is missing; is {workdir!r} a training run directory?")
  tokenizer = package_lib.load_tokenizer(tok_path)
  cfg = ModelConfig.from_config(config, tokenizer_size=tokenizer.vocab_size)
  prov = export_lib.run_provenance(workdir)
  return package_lib.write_package(
      out, params, cfg, tok_path, step=step, git_commit=prov["git_commit"],
      manifest_sha256=prov["manifest_sha256"], quantize=quantize, weights_dtype=weights_dtype,
      source=os.path.abspath(workdir) + f" (LoRA merged into {config.init_from})", overwrite=overwrite)

