"""Opening the served model and starting its engine: the warm start, in whichever process runs the
engine (the server's own, or serve.worker's).

The programs need only the weights' shapes: they are built from the shapes the package describes
while the weights load and are laid out on another thread (start-up is about the longer of the two,
not their sum, though the Python parts of each wait for the other's interpreter lock). Should the
loaded weights not have those shapes, the engine is built again from them (correct, only slower).
"""

from __future__ import annotations

import concurrent.futures
import logging
import time

import jax

from llm_jax.artifacts import inference_config, open_model
from llm_jax.model import default_levers, unstack_layers
from llm_jax.model.params import abstract_params, cast_params
from llm_jax.serve.engine import Engine
from llm_jax.serve.settings import ServerSettings

log = logging.getLogger("llm_jax.serve.app")


def load_and_lay_out(settings: ServerSettings):
  """(the served model with its weights laid out for the engine, seconds loading, seconds laying out)."""
  t0 = time.monotonic()
  loaded = open_model(
    settings.package, settings.step, dtype=settings.compute_dtype or "auto", keep_int8=settings.int8_in_memory
  )
  jax.block_until_ready(loaded.params)
  t1 = time.monotonic()
  # one buffer per layer, laid out for the decode levers: one program (replaces the stacked copy
  # rather than doubling it)
  levers = default_levers(loaded.params)
  loaded.params, loaded.model_config = unstack_layers(loaded.params, loaded.model_config, levers=levers)
  jax.block_until_ready(loaded.params)
  return loaded, t1 - t0, time.monotonic() - t1


def served_shapes(settings: ServerSettings):
  """(abstract parameters, ModelConfig, tokenizer) of the served model as `load_and_lay_out` will lay
  it out, from its description alone (no weights read), or None where the weights alone say (int8
  kept in memory). `Engine.attach` checks the loaded weights against them."""
  if settings.int8_in_memory:
    return None
  desc = open_model(settings.package, settings.step, weights=False)
  cfg = inference_config(desc.model_config, settings.compute_dtype or "auto")
  # the trained config's shapes, as the weights' reader checks them (abstract_params: one trace for both)
  abstract = jax.eval_shape(lambda: cast_params(abstract_params(desc.model_config)[0], cfg.dtype))
  params, cfg = unstack_layers(abstract, cfg, levers=default_levers(abstract))  # layers and levers at once
  return params, cfg, desc.tokenizer


def make_engine(settings: ServerSettings, params, cfg, tokenizer, metrics=None) -> Engine:
  s = settings
  return Engine(
    params,
    cfg,
    tokenizer,
    slots=s.slots,
    max_concurrent=s.max_concurrent,
    chunk=s.decode_chunk,
    prefill_tokens=s.prefill_tokens,
    hold_chars=s.filters.hold_chars if s.filters.output else 0,
    output_check=s.filters.check_output if s.filters.output else None,
    metrics=metrics,
    export_dir=s.export_dir,
    serve_while_building=s.build_in_background,
  )


def start_engine(settings: ServerSettings, metrics=None):
  """(the engine, started, and the opened model whose weights are the engine's): loads the weights
  while the programs build, then starts the decode thread and logs the ready line."""
  s = settings
  t0 = time.monotonic()
  with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="llm-weights") as pool:
    # the weights' file is read and hashed (no device needed) while served_shapes starts the device's
    # client (jax.default_backend(): ~0.6 s of an H200 host's warm start, docs/serving.md)
    weights = pool.submit(load_and_lay_out, s)
    shapes = served_shapes(s)
    if shapes is not None:
      engine = make_engine(s, *shapes, metrics=metrics)
      t_compile = engine.warmup()
    loaded, t_load, t_layout = weights.result()
  if shapes is not None:
    try:
      engine.attach(loaded.params, loaded.model_config)
    except ValueError as e:
      log.warning("%s: building the engine from the loaded weights", e)
      engine.stop()  # its background builds, if any
      shapes = None
  if shapes is None:
    engine = make_engine(s, loaded.params, loaded.model_config, loaded.tokenizer, metrics=metrics)
    t_compile = engine.warmup()
  # one copy of the weights: the engine's (laid out for its decode levers) serves everything
  loaded.params, loaded.model_config = engine.params, engine.cfg
  engine.start()
  log.info(
    "engine ready: %s; loaded in %.1fs and laid out in %.1fs while %s in %.1fs (empty state %.1fs; %d "
    "of %d programs%s; slowest %s; %d read from %s); load and build %.1fs",
    loaded.describe(),
    t_load,
    t_layout,
    "the programs were built" if shapes is not None else "then built the programs",
    t_compile,
    engine.warmup_s.get("state", 0.0),
    len(engine.programs.compiled),
    engine.programs_built()[1],
    " (the covering ones quick), every program building tuned in the background"
    if engine.serve_while_building
    else "",
    engine.programs.slowest(),
    engine.programs.loaded,
    s.export_dir or "nowhere: traced",
    time.monotonic() - t0,
  )
  return engine, loaded
