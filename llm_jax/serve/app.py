"""The server app: the state the routes share, `create_app`, and a thread to serve it.

`create_app` puts the gate (`serve.gate`) in front of the routes (`serve.routes`) and loads the model
in a background thread at start-up (`/health` answers 503 until it is compiled). No route reads
files or runs code named by a request.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import socket
import threading
import time

import uvicorn
from fastapi import FastAPI

from llm_jax.artifacts import open_model
from llm_jax.serve import audit as audit_lib
from llm_jax.serve import loading
from llm_jax.serve.chat import templates_of
from llm_jax.serve.engine import Engine
from llm_jax.serve.gate import Gate, add_error_handlers
from llm_jax.serve.metrics import Metrics
from llm_jax.serve.routes import add_routes
from llm_jax.serve.settings import ServerSettings
from llm_jax.serve.worker import EngineProcess

log = logging.getLogger(__name__)


class ServerState:
  """What the routes share: settings, metrics, auditor, and the engine once it is ready."""

  def __init__(self, settings: ServerSettings, on_failure=None, remote: EngineProcess | None = None):
    self.settings = settings
    self.on_failure = on_failure
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
    self.engine: Engine | EngineProcess | None = None
    self.error: str | None = None
    self.scoring = 0  # requests scoring prompts (echo): admitted with the engine's (routes._admit)
    self.started = time.monotonic()
    self.name = settings.model_name
    # the engine's own process starts at once (forked before the server's threads, where it can be),
    # unless the caller started it already
    self.remote = remote
    if remote is not None:
      remote.metrics, remote.on_exit = self.metrics, self._engine_exited
    elif settings.engine_process:
      self.remote = EngineProcess(settings, self.metrics, on_exit=self._engine_exited)

  def _engine_exited(self, error: str) -> None:
    self.error = error
    if self.on_failure is not None:
      self.on_failure()

  def load(self) -> None:
    """Opens the model and starts its engine (here, or in its own process: serve.worker); the routes
    serve once it is ready."""
    s = self.settings
    try:
      if self.remote is not None:  # the engine's process loads the weights; here only the description
        self._describe(open_model(s.package, s.step, weights=False))
        self.remote.wait_ready()  # what needs only the description is done meanwhile
        engine = self.remote
      else:
        engine, loaded = loading.start_engine(s, self.metrics)
        self._describe(loaded)
      log.info("ready: %s; start-up %.1fs", self.name, time.monotonic() - self.started)
      # published last: /health says 200 (and routes serve) only once the ready line is written
      self.engine = engine
    except Exception as e:  # reported by /health and the log
      self.error = f"{type(e).__name__}: {e}"
      log.error("could not load %s: %s", s.package, self.error)
      raise

  def _describe(self, loaded) -> None:
    """What the routes read of the served model besides its engine (its description suffices), then
    this process's collector pass: with the engine in its own process, both happen while it loads."""
    self.loaded = loaded
    self.token_bytes = loaded.tokenizer.token_bytes()
    self.templates = templates_of(loaded)
    self.name = self.settings.model_name or loaded.name
    self.auditor.identity = {
      "build_id": loaded.build_id,
      "tokenizer_sha256": loaded.tokenizer_sha256,
      "manifest_sha256": loaded.manifest_sha256,
    }
    gc.collect()
    gc.freeze()  # what start-up made stays alive: no full collector passes over it while serving

  def limits(self) -> tuple[int, int]:
    """(largest prompt, largest prompt + max_tokens) in tokens."""
    s, cfg = self.settings, self.loaded.model_config
    max_prompt = min(s.max_prompt_tokens or cfg.max_seq_len - 1, cfg.max_seq_len - 1)
    max_total = min(s.max_total_tokens or cfg.max_seq_len, cfg.max_seq_len)
    return max_prompt, max_total

  def close(self) -> None:
    """Stops the engine (its process too) and closes the audit log."""
    engine = self.remote or self.engine
    if engine is not None:
      engine.stop()
    self.auditor.close()


def create_app(
  settings: ServerSettings, *, load: bool = True, on_failure=None, engine_process: EngineProcess | None = None
) -> FastAPI:
  """The app; with `load`, a background thread loads and compiles the model at start-up.
  `on_failure` runs when the model could not be loaded or the engine's process died.
  `engine_process`: the engine's process, already started (the command line starts it before it
  imports this module); else the app starts one when settings.engine_process asks for it."""
  st = ServerState(settings, on_failure=on_failure, remote=engine_process)

  def lifespan_load():
    try:
      st.load()
    except Exception:  # st.error and the log say why
      if on_failure is not None:
        on_failure()

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
