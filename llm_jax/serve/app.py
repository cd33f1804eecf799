"""The server app: settings, the state the routes share, `create_app`, and a thread to serve it.

`create_app` puts the gate (`serve.gate`) in front of the routes (`serve.routes`) and loads the model
in a background thread at start-up (`/health` answers 503 until it is compiled). No route reads
files or runs code named by a request.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import gc
import logging
import socket
import threading
import time

import jax
import uvicorn
from fastapi import FastAPI

from llm_jax.artifacts import OpenedModel, inference_config, open_model
from llm_jax.model import unstack_layers
from llm_jax.model.params import abstract_params, cast_params
from llm_jax.serve import audit as audit_lib
from llm_jax.serve.chat import templates_of
from llm_jax.serve.engine import Engine, default_levers
from llm_jax.serve.filters import Filters
from llm_jax.serve.gate import Gate, add_error_handlers
from llm_jax.serve.metrics import Metrics
from llm_jax.serve.routes import add_routes

log = logging.getLogger(__name__)


@dataclasses.dataclass
class ServerSettings:
  """Everything `python -m llm_jax.serve` takes (see its --help)."""

  package: str  # a package, a run directory (or anything llm_jax.artifacts.open_model opens)
  step: int | str | None = None  # a run's checkpoint: None latest, 'best', or a step number
  host: str = "127.0.0.1"
  port: int = 8000
  api_key: str | None = None
  filters: Filters = dataclasses.field(default_factory=Filters)
  log_prompts: bool = False
  audit_log: str = ""
  audit_max_bytes: int = audit_lib.DEFAULT_MAX_BYTES  # 0: never rotate
  audit_backups: int = audit_lib.DEFAULT_BACKUPS
  slots: int = 8
  max_concurrent: int = 32
  decode_chunk: int = 16
  max_prompt_tokens: int = 0  # 0: max_seq_len - 1
  max_total_tokens: int = 0  # prompt + new tokens; 0: max_seq_len
  max_body_bytes: int = 1 << 20
  request_timeout_s: float = 60.0
  max_n: int = 4
  max_prompts: int = 32  # prompts in one batched completion request
  compute_dtype: str | None = None
  int8_in_memory: bool = False
  model_name: str = ""
  export_dir: str | None = None  # exported (traced) programs kept across starts; None: trace each start
  build_in_background: bool = True  # ready once the covering programs are built; the rest follow


def open_served_model(settings: ServerSettings) -> OpenedModel:
  """The model the server answers with, its layers unstacked for decoding."""
  loaded = open_model(
    settings.package, settings.step, dtype=settings.compute_dtype or "auto", keep_int8=settings.int8_in_memory
  )
  # one buffer per layer for decoding (replaces the stacked copy rather than doubling it)
  loaded.params, loaded.model_config = unstack_layers(loaded.params, loaded.model_config)
  return loaded


def _load_and_lay_out(settings: ServerSettings):
  """(the served model with its weights laid out for the engine, seconds loading, seconds laying out)."""
  t0 = time.monotonic()
  loaded = open_served_model(settings)
  jax.block_until_ready(loaded.params)
  t1 = time.monotonic()
  levers = default_levers(loaded.params)
  loaded.params, loaded.model_config = unstack_layers(loaded.params, loaded.model_config, levers=levers)
  jax.block_until_ready(loaded.params)
  return loaded, t1 - t0, time.monotonic() - t1


def served_shapes(settings: ServerSettings):
  """(abstract parameters, ModelConfig, tokenizer) of the served model as `_load_and_lay_out` will lay
  it out, from its description alone (no weights read), or None where the weights alone say (int8
  kept in memory). `Engine.attach` checks the loaded weights against them."""
  if settings.int8_in_memory:
    return None
  desc = open_model(settings.package, settings.step, weights=False)
  cfg = inference_config(desc.model_config, settings.compute_dtype or "auto")
  abstract = jax.eval_shape(lambda: cast_params(abstract_params(cfg)[0], cfg.dtype))
  params, cfg = unstack_layers(abstract, cfg, levers=default_levers(abstract))  # layers and levers at once
  return params, cfg, desc.tokenizer


class ServerState:
  """What the routes share: settings, metrics, auditor, and the engine once it is ready."""

  def __init__(self, settings: ServerSettings):
    self.settings = settings
    self.metrics = Metrics(settings.slots)
    self.auditor = audit_lib.Auditor(
      settings.audit_log,
      max_bytes=settings.audit_max_bytes,
      backups=settings.audit_backups,
      log_prompts=settings.log_prompts,
    )
    self.loaded = None
    self.token_bytes = None  # UTF-8 bytes each token id adds to text (text offsets)
    self.templates = None  # the chat template (finetune.sft.Templates)
    self.engine: Engine | None = None
    self.error: str | None = None
    self.started = time.monotonic()
    self.name = settings.model_name

  def load(self) -> None:
    """Opens the model, compiles the decode functions, starts the engine (the warm start).

    The programs need only the weights' shapes: they are built from the shapes the package describes
    while the weights load and are laid out on another thread (start-up is the longer of the two,
    not their sum). Should the loaded weights not have those shapes, the engine is built again from
    them (correct, only slower)."""
    s = self.settings
    try:
      t0 = time.monotonic()
      shapes = served_shapes(s)
      with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="llm-weights") as pool:
        weights = pool.submit(_load_and_lay_out, s)
        if shapes is not None:
          engine = self._engine(*shapes)
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
        engine = self._engine(loaded.params, loaded.model_config, loaded.tokenizer)
        t_compile = engine.warmup()
      # one copy of the weights: the engine's (laid out for its decode levers) serves everything
      loaded.params, loaded.model_config = engine.params, engine.cfg
      self.loaded = loaded
      self.token_bytes = loaded.tokenizer.token_bytes()
      self.templates = templates_of(loaded)
      self.name = s.model_name or loaded.name
      self.auditor.identity = {
        "build_id": loaded.build_id,
        "tokenizer_sha256": loaded.tokenizer_sha256,
        "manifest_sha256": loaded.manifest_sha256,
      }
      engine.start()
      # what start-up made stays alive: keep it out of the cyclic collector, whose full passes over
      # it would pause the event loop and the engine thread while serving
      gc.collect()
      gc.freeze()
      log.info(
        "ready: %s; loaded in %.1fs and laid out in %.1fs while %s in %.1fs (empty state %.1fs; %d of %d "
        "programs%s; slowest %s; %d read from %s); load and build %.1fs, start-up %.1fs",
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
        time.monotonic() - self.started,
      )
      # published last: /health says 200 (and routes serve) only once the ready line is written
      self.engine = engine
    except Exception as e:  # reported by /health and the log
      self.error = f"{type(e).__name__}: {e}"
      log.error("could not load %s: %s", s.package, self.error)
      raise

  def _engine(self, params, cfg, tokenizer) -> Engine:
    s = self.settings
    return Engine(
      params,
      cfg,
      tokenizer,
      slots=s.slots,
      max_concurrent=s.max_concurrent,
      chunk=s.decode_chunk,
      hold_chars=s.filters.hold_chars if s.filters.output else 0,
      output_check=s.filters.check_output if s.filters.output else None,
      metrics=self.metrics,
      export_dir=s.export_dir,
      serve_while_building=s.build_in_background,
    )

  def limits(self) -> tuple[int, int]:
    """(largest prompt, largest prompt + max_tokens) in tokens."""
    s, cfg = self.settings, self.loaded.model_config
    max_prompt = min(s.max_prompt_tokens or cfg.max_seq_len - 1, cfg.max_seq_len - 1)
    max_total = min(s.max_total_tokens or cfg.max_seq_len, cfg.max_seq_len)
    return max_prompt, max_total

  def close(self) -> None:
    """Stops the engine and closes the audit log."""
    if self.engine is not None:
      self.engine.stop()
    self.auditor.close()


def create_app(settings: ServerSettings, *, load: bool = True, on_load_failure=None) -> FastAPI:
  """The app; with `load`, a background thread loads and compiles the model at start-up."""
  st = ServerState(settings)

  def lifespan_load():
    try:
      st.load()
    except Exception:  # st.error and the log say why
      if on_load_failure is not None:
        on_load_failure()

  @contextlib.asynccontextmanager
  async def lifespan(app):
    if load:
      threading.Thread(target=lifespan_load, name="llm-load", daemon=True).start()
    yield
    st.close()

  app = FastAPI(title="llm_jax", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
  app.state.llm = st
  app.add_middleware(Gate, st=st)
  add_error_handlers(app)
  add_routes(app, st)
  return app


def bind_socket(host: str, port: int) -> socket.socket:
  """A listening TCP socket (port 0: a free one, read back with getsockname)."""
  family = socket.AF_INET6 if ":" in host else socket.AF_INET
  sock = socket.socket(family, socket.SOCK_STREAM)
  sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
  sock.bind((host, port))
  sock.listen(128)
  sock.set_inheritable(True)
  return sock


class ServerThread:
  """uvicorn serving an app on a real socket from a background thread (embedding, tests)."""

  def __init__(self, app: FastAPI, host: str = "127.0.0.1", port: int = 0):
    self.app = app
    self.sock = bind_socket(host, port)
    self.port = self.sock.getsockname()[1]
    self.url = f"http://{host}:{self.port}"
    self.server = uvicorn.Server(
      uvicorn.Config(app, log_level="warning", access_log=False, timeout_graceful_shutdown=2)
    )
    self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

  def start(self, wait_ready_s: float = 120.0, wait_model: bool = True) -> ServerThread:
    """Starts serving and waits until /health would say 200 (model loaded and compiled)."""
    self.thread.start()
    st = self.app.state.llm
    if not wait_model:
      while not self.server.started:
        time.sleep(0.02)
      return self
    deadline = time.monotonic() + wait_ready_s
    while time.monotonic() < deadline:
      if st.error:
        raise RuntimeError(f"server failed to load: {st.error}")
      if st.engine is not None and st.engine.ready and self.server.started:
        return self
      time.sleep(0.05)
    raise TimeoutError(f"server not ready after {wait_ready_s}s")

  def stop(self) -> None:
    """Asks uvicorn to exit and waits for the thread."""
    self.server.should_exit = True
    self.thread.join(timeout=10)
