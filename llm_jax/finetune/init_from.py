"""Start a run from trained weights: `--config.init_from=WORKDIR_OR_PACKAGE`.

Only the parameters come from the source; the optimizer state, data stream, schedule and step counter
are fresh. The model settings that decide shapes must match the source's, and so must the tokenizer
(its sha256), unless `reuse_source_tokenizer` makes the run use the source's tokenizer (any tokenizer
llm_jax.data.hf_tokenizer loads; a source whose tokenizer is not llm_jax's own SentencePiece model is
always reused, see `llm_jax.finetune.extension.resolve_tokenizer`).
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
from llm_jax.artifacts import ArtifactError, open_model
from llm_jax.data import hf_tokenizer
from llm_jax.model import ModelConfig
from llm_jax.model.params import shape_differences
from llm_jax.train.run_dir import SHAPE_FIELDS

# Fields that do not change shapes but change what the weights compute.
BEHAVIOUR_FIELDS = (
  "rope_theta",
  "norm_eps",
  "rope_scaling",
  "rope_scaling_factor",
  "rope_low_freq_factor",
  "rope_high_freq_factor",
  "rope_original_max_len",
)


class InitFromError(config_lib.ConfigError):
  """The init_from source is missing, has no weights, or does not fit this run; names key and path."""


@dataclasses.dataclass
class Source:
  """Weights and what they need: the architecture and the tokenizer they were trained with."""

  path: str
  kind: str  # run | package | hf
  params: Any
  step: int | None
  model_config: ModelConfig
  tokenizer_path: str
  tokenizer_sha256: str
  own_tokenizer: bool = True  # llm_jax's SentencePiece model, which data preparation could also train
  tokenizer: Any = None  # the loaded tokenizer (llm_jax.data.hf_tokenizer.load_tokenizer's interface)
  stop_ids: tuple[int, ...] = ()  # end-of-text ids besides the tokenizer's EOS (OpenedModel.stop_ids)
  declared_context: int | None = None  # a RoPE source's longest context (what its export declares)


def _source(path: str, step: int | str | None, mesh, weights: bool) -> Source:
  if not path:
    raise InitFromError("init_from is empty")
  path = os.path.abspath(os.path.expanduser(path))
  if not os.path.exists(path):
    raise InitFromError(
      f"init_from={path!r} does not exist; give a training run directory or an exported package"
    )
  try:
    opened = open_model(path, step, mesh=mesh, weights=weights)
  except ArtifactError as e:
    at = f" (finetune.init_step={step})" if isinstance(step, int) else f" (@{step})" if step else ""
    raise InitFromError(f"init_from={path!r}{at}: {e}") from e
  params = opened.params
  if weights:
    if opened.meta.get("precision", {}).get("weights") == "int8":
      logging.warning("init_from=%s holds int8 weights; starting from their float32 dequantization", path)
    params = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), params)
    logging.info(
      "init_from %s %s (step %s, tokenizer %s)", opened.kind, path, opened.step, opened.tokenizer.sha256[:12]
    )
  return Source(
    path=path,
    kind=opened.kind,
    params=params,
    step=opened.step,
    model_config=opened.model_config,
    tokenizer_path=opened.tokenizer_path,
    tokenizer_sha256=opened.tokenizer.sha256,
    own_tokenizer=hf_tokenizer.is_own(opened.tokenizer),
    tokenizer=opened.tokenizer,
    stop_ids=tuple(opened.stop_ids),
    declared_context=(
      int(opened.provenance.get("max_position_embeddings") or opened.model_config.max_seq_len)
      if opened.model_config.positions == "rope"
      else None
    ),
  )


def parse_source(spec: str) -> tuple[str, int | str | None]:
  """'RUN' -> (RUN, None); 'RUN@best' or 'RUN@300' -> (RUN, 'best' / 300)."""
  path, sep, at = str(spec).rpartition("@")
  if not sep or not at or os.path.exists(spec):
    return spec, None
  if at == "best":
    return path, "best"
  try:
    return path, int(at)
  except ValueError:
    return spec, None


def tokenizer_of(path: str) -> tuple[str, str]:
  """(tokenizer file path, sha256) of a source, without reading its weights."""
  source = describe(path)
  return source.tokenizer_path, source.tokenizer_sha256


def describe(path: str, step: int | str | None = None) -> Source:
  """The source without its weights (params=None): kind, step, architecture, tokenizer.

  Cheap: reads config.json / model.json and the checkpoint listing, so a run can check its shapes
  and tokenizer before it writes anything. A source without weights raises naming the path.
  """
  path, at = parse_source(path)
  return _source(path, step if step is not None else at, None, weights=False)


def load_source(path: str, step: int | str | None = None, mesh=None) -> Source:
  """Reads a source's float32 parameters (sharded by its own rules when a mesh is given)."""
  path, at = parse_source(path)
  return _source(path, step if step is not None else at, mesh, weights=True)


def check_tokenizer(config, source: Source, run_tokenizer_sha256: str) -> None:
  """The run's tokenizer must be the source's; a different hash raises naming both."""
  if run_tokenizer_sha256 == source.tokenizer_sha256:
    return
  hint = (
    "the run was meant to use the source's tokenizer.model; prepare the data with it"
    if config.get("reuse_source_tokenizer")
    else "set --config.reuse_source_tokenizer=True to train on the source's tokenizer instead"
  )
  raise InitFromError(
    f"tokenizer mismatch: init_from={source.path!r} was trained with tokenizer sha256 "
    f"{source.tokenizer_sha256}, but this run's tokenizer has sha256 {run_tokenizer_sha256}; {hint}"
  )


def check_model(config, source: Source, tokenizer_size: int | None = None) -> None:
  """The configured architecture must have the source's shapes; differences raise naming the keys."""
  mine = ModelConfig.from_config(config, tokenizer_size=tokenizer_size or source.model_config.vocab_size)
  theirs = source.model_config
  rope = theirs.positions == mine.positions == "rope"  # max_seq_len sizes no weight: any context
  diffs = [
    f"model.{f}: source {getattr(theirs, f)!r}, this run {getattr(mine, f)!r}"
    for f in SHAPE_FIELDS
    if getattr(theirs, f) != getattr(mine, f) and not (rope and f == "max_seq_len")
  ]
  if diffs:
    raise InitFromError(
      f"init_from={source.path!r}: the configured model does not have the source's "
      "shapes:\n  " + "\n  ".join(diffs) + "\nset these model.* keys to the source's values"
    )
  for f in BEHAVIOUR_FIELDS:
    if getattr(theirs, f) != getattr(mine, f):
      logging.warning(
        "init_from: model.%s is %r in the source and %r here", f, getattr(theirs, f), getattr(mine, f)
      )


def fit(params, target, source_path: str):
  """`params` checked leaf by leaf against `target` (arrays or ShapeDtypeStructs); raises naming keys."""
  have = jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), jnp.float32), params)
  want = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, jnp.float32), target)
  diffs = shape_differences(have, want)
  if diffs:
    raise InitFromError(
      f"init_from={source_path!r}: the source's weights do not fit the model "
      f"({len(diffs)} differing keys):\n  " + "\n  ".join(diffs[:20])
    )
  return params


def place(params, shardings):
  """Source parameters as float32 arrays in the given shardings (a pytree of Shardings)."""
  return jax.tree.map(lambda x, s: jax.device_put(jnp.asarray(x, jnp.float32), s), params, shardings)


def into_state(state, shardings, source: Source):
  """`state` with its parameters replaced by the source's (optimizer state, step untouched)."""
  fit(source.params, state.params, source.path)
  return state.replace(params=place(source.params, shardings.params))
