"""OpenAI-compatible completions over an llm_jax package.

    python -m llm_jax.serve --package=packages/tiny [--host=127.0.0.1] [--port=8000] [flags]

The port opens at once; /health answers 503 until the model is loaded and compiled, then 200.
Compiled programs are kept in JAX's persistent compilation cache (--compile_cache), so a second
start with the same model and flags loads them instead of compiling.
Exit 2 for a bad flag, an unreadable package, filter file or key file; 1 when the model fails to load
or the engine's process dies.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import logging
import os
import time

from absl import flags

from llm_jax import cli
from llm_jax.artifacts import ArtifactError, open_model
from llm_jax.serve import audit as audit_lib
from llm_jax.serve import worker
from llm_jax.serve.filters import FilterConfigError, Filters, load_filters
from llm_jax.serve.settings import ServerSettings

_PACKAGE = flags.DEFINE_string(
  "package",
  None,
  "Model package (python -m llm_jax.export), training run directory or Hugging Face checkpoint directory.",
  required=True,
)
flags.DEFINE_alias("workdir", "package")
_STEP = flags.DEFINE_string(
  "step", None, "With a run directory: checkpoint step or 'best' (default: the latest)."
)
_HOST = flags.DEFINE_string("host", "127.0.0.1", "Bind address (default: loopback only).")
_PORT = flags.DEFINE_integer("port", 8000, "TCP port.", lower_bound=0, upper_bound=65535)
_API_KEY_FILE = flags.DEFINE_string(
  "api_key_file",
  "",
  "File holding the API key (16+ characters); "
  "when given, every route but /health needs 'Authorization: "
  "Bearer <key>'.",
)
_FILTERS = flags.DEFINE_string("filters", "", "JSON file of input/output blocked patterns.")
_LOG_PROMPTS = flags.DEFINE_bool("log_prompts", False, "Put prompt and completion text in the audit log.")
_AUDIT_LOG = flags.DEFINE_string("audit_log", "", "Audit JSON lines go here (created 0600; default stderr).")
_AUDIT_MAX_BYTES = flags.DEFINE_integer(
  "audit_max_bytes",
  audit_lib.DEFAULT_MAX_BYTES,
  "Rotate the audit log at this size (0: never).",
  lower_bound=0,
)
_AUDIT_BACKUPS = flags.DEFINE_integer(
  "audit_backups", audit_lib.DEFAULT_BACKUPS, "Rotated audit files kept (FILE.1 ... FILE.N).", lower_bound=1
)
_SLOTS = flags.DEFINE_integer("slots", 8, "Batch slots decoded together.", lower_bound=1)
_MAX_CONCURRENT = flags.DEFINE_integer(
  "max_concurrent", 32, "Requests in flight (queued or decoding) before 429.", lower_bound=1
)
_DECODE_CHUNK = flags.DEFINE_integer(
  "decode_chunk",
  16,
  "Decode steps per engine iteration (docs/serving.md: 16 gave 1.7x the tokens/s of 4).",
  lower_bound=1,
)
_PREFILL_TOKENS = flags.DEFINE_integer(
  "prefill_tokens",
  1024,
  "Prompt tokens (padded) prefilled per engine iteration, beside the decode chunk; a longer prompt is "
  "prefilled in pieces (the largest power of two within this), one per iteration, each in the same "
  "device call as the iteration's decode chunk.",
  lower_bound=8,
)
_MAX_PROMPT_TOKENS = flags.DEFINE_integer("max_prompt_tokens", 0, "0: max_seq_len - 1.", lower_bound=0)
_MAX_TOTAL_TOKENS = flags.DEFINE_integer(
  "max_total_tokens", 0, "Prompt + max_tokens; 0: max_seq_len.", lower_bound=0
)
_MAX_BODY_BYTES = flags.DEFINE_integer(
  "max_body_bytes", 1 << 20, "Largest request body (413).", lower_bound=1
)
_REQUEST_TIMEOUT = flags.DEFINE_float(
  "request_timeout", 60.0, "Seconds per request (queue + decoding; 504).", lower_bound=1e-3
)
_MAX_N = flags.DEFINE_integer("max_n", 4, "Largest n (choices per request).", lower_bound=1)
_MAX_PROMPTS = flags.DEFINE_integer(
  "max_prompts", 32, "Most prompts in one batched completion request (lm-eval's batch_size).", lower_bound=1
)
_DTYPE = flags.DEFINE_enum(
  "dtype", None, ["float32", "bfloat16"], "Compute dtype (default float32 on CPU, bfloat16 on GPU/TPU)."
)
_INT8_IN_MEMORY = flags.DEFINE_bool(
  "int8_in_memory",
  False,
  "int8 packages: keep weights int8 on "
  "the device and dequantize inside each step (less memory, "
  "usually slower).",
)
_BUILD_IN_BACKGROUND = flags.DEFINE_bool(
  "build_in_background",
  True,
  "Answer once the few programs that cover every request are built, and build the rest (smaller row "
  "buckets, cache spans, prompt widths) in the background, each used once built; "
  "--nobuild_in_background: /health waits for all of them.",
)
_ENGINE_PROCESS = flags.DEFINE_bool(
  "engine_process",
  True,
  "Run the engine (decoding and each token's host work) in a process of its own, so that it never "
  "waits for the HTTP event loop's interpreter lock (docs/serving.md); --noengine_process: a thread "
  "of the server's process.",
)
_MODEL_NAME = flags.DEFINE_string("model_name", "", "Name in /v1/models (default: the package's).")
_COMPILE_CACHE = flags.DEFINE_string(
  "compile_cache",
  "",
  "Directory of JAX's persistent compilation cache (default: "
  "$JAX_COMPILATION_CACHE_DIR, else $LLM_JAX_CACHE/jax_compile, else ~/.cache/llm_jax/jax_compile; "
  "shared with training and safe to share between servers); 'off': compile every start.",
)
_LOG_LEVEL = flags.DEFINE_enum(
  "log_level", "info", ["debug", "info", "warning", "error"], "Level of the server's log."
)

log = logging.getLogger("llm_jax.serve")


def _loopback(host: str) -> bool:
  if host == "localhost":
    return True
  try:
    return ipaddress.ip_address(host).is_loopback
  except ValueError:
    return False


def _read_key(path: str) -> str:
  try:
    with open(path, encoding="utf-8") as f:
      key = f.read().strip()
  except OSError as e:
    raise cli.UsageError(f"cannot read --api_key_file {path!r}: {e}") from e
  if len(key) < 16:
    raise cli.UsageError(f"the key in --api_key_file {path} is shorter than 16 characters")
  return key


def settings_from_flags() -> ServerSettings:
  """ServerSettings from the flags; a usage error names the flag or file that is wrong."""
  try:
    open_model(_PACKAGE.value, cli.parse_step(_STEP.value), weights=False)  # fail fast: unreadable
    filters = load_filters(_FILTERS.value) if _FILTERS.value else Filters()
  except (ArtifactError, FilterConfigError) as e:
    raise cli.UsageError(str(e)) from e
  return ServerSettings(
    package=_PACKAGE.value,
    step=cli.parse_step(_STEP.value),
    host=_HOST.value,
    port=_PORT.value,
    api_key=_read_key(_API_KEY_FILE.value) if _API_KEY_FILE.value else None,
    filters=filters,
    log_prompts=_LOG_PROMPTS.value,
    audit_log=_AUDIT_LOG.value,
    audit_max_bytes=_AUDIT_MAX_BYTES.value,
    audit_backups=_AUDIT_BACKUPS.value,
    slots=_SLOTS.value,
    max_concurrent=_MAX_CONCURRENT.value,
    decode_chunk=_DECODE_CHUNK.value,
    prefill_tokens=_PREFILL_TOKENS.value,
    max_prompt_tokens=_MAX_PROMPT_TOKENS.value,
    max_total_tokens=_MAX_TOTAL_TOKENS.value,
    max_body_bytes=_MAX_BODY_BYTES.value,
    request_timeout_s=_REQUEST_TIMEOUT.value,
    max_n=_MAX_N.value,
    max_prompts=_MAX_PROMPTS.value,
    compute_dtype=_DTYPE.value,
    int8_in_memory=_INT8_IN_MEMORY.value,
    model_name=_MODEL_NAME.value,
    build_in_background=_BUILD_IN_BACKGROUND.value,
    engine_process=_ENGINE_PROCESS.value,
  )


def main(argv: list[str]) -> int:
  """Serves until interrupted; 1 when the model could not be loaded or the engine's process died."""
  del argv
  t0 = time.monotonic()
  # The engine allocates its batch state (the KV cache) once at start-up, so JAX's GPU allocator need
  # not reserve 75% of the device before anything runs: on an H200 that reservation was 2-3 s of a
  # warm start-up (docs/serving.md). Set before the device is first used; an explicit value wins.
  os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
  level = _LOG_LEVEL.value.upper()
  logging.getLogger().setLevel(level)
  for noisy in ("absl", "jax._src.xla_bridge"):
    logging.getLogger(noisy).setLevel(max(logging.WARNING, logging.getLevelName(level)))
  settings = settings_from_flags()
  cache = cli.compile_cache_dir(_COMPILE_CACHE.value)
  # traced programs (jax.export) next to the compiled ones: a warm start neither traces nor compiles
  export_dir = os.path.join(cache, "llm_jax_export") if cache else None
  settings = dataclasses.replace(settings, export_dir=export_dir)
  cli.use_compile_cache(cache, min_compile_secs=0)  # a server's quick programs are worth keeping too
  log.info("compilation cache: %s", cache or "off")
  if not _loopback(settings.host):
    log.warning(
      "binding %s: reachable from other machines%s",
      settings.host,
      "" if settings.api_key else " WITHOUT an API key (use --api_key_file)",
    )
  # The engine's process is forked before the web stack (fastapi, uvicorn, the routes) is imported: it
  # loads the model while this process imports them (on an H200 host ~0.45 s of a ~4.5 s warm
  # start; docs/serving.md, issue 19 round eleven). Hence the two imports below, not at the top.
  engine = worker.EngineProcess(settings) if settings.engine_process else None
  import uvicorn

  from llm_jax.serve import app as app_lib

  server: list[uvicorn.Server] = []

  def on_failure():
    log.error("exiting: %s", app.state.llm.error or "the model could not be loaded")
    if server:
      server[0].should_exit = True

  app = app_lib.create_app(settings, on_failure=on_failure, engine_process=engine)
  app.state.llm.started = t0
  config = uvicorn.Config(
    app,
    host=settings.host,
    port=settings.port,
    log_level=_LOG_LEVEL.value,
    access_log=False,
    timeout_graceful_shutdown=5,
  )
  server.append(uvicorn.Server(config))
  log.info(
    "listening on http://%s:%d (pid %d); /health turns 200 once the model is compiled",
    settings.host,
    settings.port,
    os.getpid(),
  )
  server[0].run()
  if app.state.llm.error:
    raise RuntimeError(f"serving --package {settings.package} failed: {app.state.llm.error}")
  return 0


if __name__ == "__main__":
  cli.run(main)
