"""Start a run from trained weights: `--config.init_from=WORKDIR_OR_PACKAGE`.

Only the parameters come from the source; the optimizer state, data stream, schedule and step counter
are fresh. The model settings that decide shapes must match the source's, and so must the tokenizer
(its sha256), unless `reuse_source_tokenizer` makes the run use the source's tokenizer.model.
"""
from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from llm_jax import config as config_lib
from llm_jax.model import ModelConfig

TOKENIZER_FILE = "tokenizer.model"
# ModelConfig fields that decide parameter shapes (the same list the run directory checks on resume).
SHAPE_FIELDS = ("vocab_size", "num_layers", "d_model", "num_heads", "num_kv_heads", "head_dim",
                "mlp_dim", "max_seq_len", "positions", "norm", "activation", "tie_embeddings",
                "use_bias", "scan_layers", "param_dtype")
# Fields that do not change shapes but change what the weights compute.
BEHAVIOUR_FIELDS = ("rope_theta", "norm_eps")


class InitFromError(config_lib.ConfigError):
  """The init_from source is missing, has no weights, or does not fit this run; names key and path."""


@dataclasses.dataclass
class Source:
  """Weights and what they need: the architecture and the tokenizer they were trained with."""
  path: str
  kind: str  # workdir | package
  params: Any
  step: int | None
  model_config: ModelConfig
  tokenizer_path: str
  tokenizer_sha256: str


def source_kind(path: str) -> str:
  """'workdir' (config.json + checkpoints/) or 'package' (model.json); anything else raises."""
  if not path:
    raise InitFromError("init_from is empty")
  if not os.path.exists(path):
    raise InitFromError(f"init_from={path!r} does not exist; give a training run directory or an "
                        "exported package")
  if os.path.exists(os.path.join(path, "model.json")):
    return "package"
  if os.path.exists(os.path.join(path, "config.json")) or os.path.isdir(os.path.join(path, "checkpoints")):
    return "workdir"
  raise InitFromError(f"init_from={path!r} is neither a training run directory (config.json, "
                      "checkpoints/) nor an exported package (model.json)")


def tokenizer_of(path: str) -> tuple[str, str]:
  """(tokenizer.model path, sha256) of a source, without reading its weights."""
  source_kind(path)
  tok = os.path.join(path, TOKENIZER_FILE)
  if not os.path.exists(tok):
    raise InitFromError(f"init_from={path!r} has no {TOKENIZER_FILE}")
  from llm_jax.data.tokenizer import Tokenizer  # noqa: PLC0415
  return tok, Tokenizer.load(tok).sha256


def describe(path: str, step: int | None = None) -> Source:
  """The source without its weights (params=None): kind, step, architecture, tokenizer.

  Cheap: reads config.json / model.json and the checkpoint listing, so a run can check its shapes
  and tokenizer before it writes anything. A source without weights raises naming the path.
  """
  path = os.path.abspath(os.path.expanduser(path))
  kind = source_kind(path)
  tok_path, tok_sha = tokenizer_of(path)
  if kind == "package":
    from llm_jax import package as package_lib  # noqa: PLC0415
    try:
      meta = package_lib.read_model_json(path)
      cfg = package_lib.model_config_from(meta["architecture"], os.path.join(path, "model.json"))
    except package_lib.PackageError as e:
      raise InitFromError(f"init_from={path!r}: {e}") from e
    if not os.path.exists(os.path.join(path, package_lib.WEIGHTS)):
      raise InitFromError(f"init_from={path!r} has no weights: {package_lib.WEIGHTS} is missing")
    step = meta.get("provenance", {}).get("training_step")
  else:
    from llm_jax.train import checkpoint  # noqa: PLC0415
    try:
      config = checkpoint.load_config(path)
      ckpts = checkpoint.Checkpoints(path, read_only=True)
      steps = ckpts.steps()
      ckpts.manager.close()
    except checkpoint.CheckpointError as e:
      raise InitFromError(f"init_from={path!r} has no usable weights: {e}") from e
    if not steps:
      raise InitFromError(f"init_from={path!r} has no usable weights: no complete checkpoint in "
                          f"{checkpoint.checkpoint_dir(path)}")
    if step is not None and step not in steps:
      raise InitFromError(f"finetune.init_step={step}: {path!r} has checkpoints at steps {steps}")
    step = steps[-1] if step is None else step
    from llm_jax.data.tokenizer import Tokenizer  # noqa: PLC0415
    cfg = ModelConfig.from_config(config, tokenizer_size=Tokenizer.load(tok_path).vocab_size)
  return Source(path=path, kind=kind, params=None, step=step, model_config=cfg,
                tokenizer_path=tok_path, tokenizer_sha256=tok_sha)


def load_source(path: str, step: int | None = None, mesh=None) -> Source:
  """Reads a source's float32 parameters (sharded by its own rules when a mesh is given)."""
  path = os.path.abspath(os.path.expanduser(path))
  kind = source_kind(path)
  tok_path, tok_sha = tokenizer_of(path)
  if kind == "package":
    from llm_jax import package as package_lib  # noqa: PLC0415
    try:
      loaded = package_lib.load_package(path, compute_dtype="float32")
    except package_lib.PackageError as e:
      raise InitFromError(f"init_from={path!r}: {e}") from e
    if loaded.meta.get("precision", {}).get("weights") == "int8":
      logging.warning("init_from=%s holds int8 weights; starting from their float32 dequantization",
                      path)
    params = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), loaded.params)
    cfg = loaded.model_config
    step = loaded.meta.get("provenance", {}).get("training_step")
  else:
    from llm_jax.train import checkpoint  # noqa: PLC0415
    try:
      config = checkpoint.load_config(path)
      if _is_lora(config):
        from llm_jax.finetune import lora  # noqa: PLC0415
        params, config, step = lora.merged_params(path, step, mesh=mesh)
      else:
        params, config, step = checkpoint.restore_params(path, step, mesh=mesh)
    except checkpoint.CheckpointError as e:
      raise InitFromError(f"init_from={path!r} has no usable weights: {e}") from e
    from llm_jax.data.tokenizer import Tokenizer  # noqa: PLC0415
    cfg = ModelConfig.from_config(config, tokenizer_size=Tokenizer.load(tok_path).vocab_size)
  logging.info("init_from %s %s (step %s, tokenizer %s)", kind, path, step, tok_sha[:12])
  return Source(path=path, kind=kind, params=params, step=step, model_config=cfg,
                tokenizer_path=tok_path, tokenizer_sha256=tok_sha)


def _is_lora(config) -> bool:
  f = config.get("finetune")
  return bool(f and f.get("lora") and int(f.lora.get("rank", 0)) > 0)


def check_tokenizer(config, source: Source, run_tokenizer_sha256: str) -> None:
  """The run's tokenizer must be the source's; a different hash raises naming both."""
  if run_tokenizer_sha256 == source.tokenizer_sha256:
    return
  hint = ("the run was meant to use the source's tokenizer.model; prepare the data with it"
          if config.get("reuse_source_tokenizer") else
          "set --config.reuse_source_tokenizer=True to train on the source's tokenizer instead")
  raise InitFromError(
      f"tokenizer mismatch: init_from={source.path!r} was trained with tokenizer sha256 "
      f"{source.tokenizer_sha256}, but this run's tokenizer has sha256 {run_tokenizer_sha256}; {hint}")


def check_model(config, source: Source, tokenizer_size: int | None = None) -> None:
  """The configured architecture must have the source's shapes; differences raise naming the keys."""
  mine = ModelConfig.from_config(config, tokenizer_size=tokenizer_size or source.model_config.vocab_size)
  theirs = source.model_config
  diffs = [f"model.{f}: source {getattr(theirs, f)!r}, this run {getattr(mine, f)!r}"
           for f in SHAPE_FIELDS if getattr(theirs, f) != getattr(mine, f)]
  if diffs:
    raise InitFromError(f"init_from={source.path!r}: the configured model does not have the source's "
                        "shapes:\n  " + "\n  ".join(diffs) +
                        "\nset these model.* keys to the source's values")
  for f in BEHAVIOUR_FIELDS:
    if getattr(theirs, f) != getattr(mine, f):
      logging.warning("init_from: model.%s is %r in the source and %r here", f, getattr(theirs, f),
                      getattr(mine, f))


def fit(params, target, source_path: str):
  """`params` checked leaf by leaf against `target` (arrays or ShapeDtypeStructs); raises naming keys."""
  from llm_jax.train.checkpoint import shape_differences  # noqa: PLC0415
  have = jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), jnp.float32), params)
  want = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, jnp.float32), target)
  diffs = shape_differences(have, want)
  if diffs:
    raise InitFromError(f"init_from={source_path!r}: the source's weights do not fit the model "
                        f"({len(diffs)} differing keys):\n  " + "\n  ".join(diffs[:20]))
  return params


def place(params, shardings):
  """Source parameters as float32 arrays in the given shardings (a pytree of Shardings)."""
  return jax.tree.map(lambda x, s: jax.device_put(jnp.asarray(x, jnp.float32), s), params, shardings)


def into_state(state, shardings, source: Source):
  """`state` with its parameters replaced by the source's (optimizer state, step untouched)."""
  fit(source.params, state.params, source.path)
  return state.replace(params=place(source.params, shardings.params))
