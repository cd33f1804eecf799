"""python -m llm_jax.serve --package=PKG [--host 127.0.0.1] [--port 8000] [options]: see --help."""
from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import sys
import time


def _loopback(host: str) -> bool:
  if host == "localhost":
    return True
  try:
    return ipaddress.ip_address(host).is_loopback
  except ValueError:
    return False


def parse_args(argv=None) -> argparse.Namespace:
  ap = argparse.ArgumentParser(prog="python -m llm_jax.serve",
                               description="OpenAI-compatible completions over an llm_jax package.")
  ap.add_argument("--package", required=True, help="model package directory (llm_jax.export)")
  ap.add_argument("--host", default="127.0.0.1", help="bind address (default loopback only)")
  ap.add_argument("--port", type=int, default=8000)
  ap.add_argument("--api-key-file", default="", help="file holding the API key; when given, every "
                  "route but /health needs 'Authorization: Bearer <key>'")
  ap.add_argument("--filters", default="", help="JSON file of input/output blocked patterns")
  ap.add_argument("--log-prompts", action="store_true", help="put prompt and completion text in "
                  "the audit log (off by default)")
  ap.add_argument("--audit-log", default="", help="append audit JSON lines here (default stderr)")
  ap.add_argument("--slots", type=int, default=8, help="batch slots decoded together")
  ap.add_argument("--max-concurrent", type=int, default=32, help="requests in flight (queued or "
                  "decoding) before 429")
  ap.add_argument("--decode-chunk", type=int, default=4, help="decode steps per engine iteration")
  ap.add_argument("--max-prompt-tokens", type=int, default=0, help="0: max_seq_len - 1")
  ap.add_argument("--max-total-tokens", type=int, default=0, help="prompt + max_tokens; "
                  "0: max_seq_len")
  ap.add_argument("--max-body-bytes", type=int, default=1 << 20)
  ap.add_argument("--request-timeout", type=float, default=60.0, help="seconds per request")
  ap.add_argument("--max-n", type=int, default=4, help="largest n (choices per request)")
  ap.add_argument("--dtype", default=None, choices=("float32", "bfloat16"),
                  help="compute dtype (default float32 on CPU, bfloat16 on GPU/TPU)")
  ap.add_argument("--int8-in-memory", action="store_true", help="int8 packages: keep weights int8 "
                  "on the device and dequantize inside each step (less memory, usually slower)")
  ap.add_argument("--model-name", default="", help="name in /v1/models (default: package name)")
  ap.add_argument("--log-level", default="info")
  args = ap.parse_args(argv)
  for name in ("slots", "max_concurrent", "decode_chunk", "max_body_bytes", "max_n"):
    if getattr(args, name) < 1:
      ap.error(f"--{name.replace('_', '-')} must be >= 1")
  if args.request_timeout <= 0:
    ap.error("--request-timeout must be > 0")
  return args


def main(argv=None) -> int:
  t0 = time.monotonic()
  args = parse_args(argv)
  logging.basicConfig(level=args.log_level.upper(),
                      format="%(asctime)s %(levelname)s %(name)s: %(message)s")
  log = logging.getLogger("llm_jax.serve")
  from llm_jax import package as package_lib
  from llm_jax.serve import app as app_lib
  from llm_jax.serve.filters import FilterConfigError, Filters, load_filters

  try:
    package_lib.read_model_json(args.package)  # fail fast on a missing or unreadable package
    filters = load_filters(args.filters) if args.filters else Filters()
  except (package_lib.PackageError, FilterConfigError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  api_key = None
  if args.api_key_file:
    try:
      with open(args.api_key_file, encoding="utf-8") as f:
        api_key = f.read().strip()
    except OSError as e:
      print(f"error: cannot read --api-key-file {args.api_key_file!r}: {e}", file=sys.stderr)
      return 2
    if len(api_key) < 16:
      print(f"error: the key in {args.api_key_file} is shorter than 16 characters", file=sys.stderr)
      return 2
  if not _loopback(args.host):
    log.warning("binding %s: reachable from other machines%s", args.host,
                "" if api_key else " WITHOUT an API key (use --api-key-file)")
  settings = app_lib.ServerSettings(
      package=args.package, host=args.host, port=args.port, api_key=api_key, filters=filters,
      log_prompts=args.log_prompts, audit_log=args.audit_log, slots=args.slots,
      max_concurrent=args.max_concurrent, decode_chunk=args.decode_chunk,
      max_prompt_tokens=args.max_prompt_tokens, max_total_tokens=args.max_total_tokens,
      max_body_bytes=args.max_body_bytes, request_timeout_s=args.request_timeout,
      max_n=args.max_n, compute_dtype=args.dtype, int8_in_memory=args.int8_in_memory,
      model_name=args.model_name)

  import uvicorn
  server: list = []

  def on_failure():
    log.error("exiting: the model could not be loaded")
    if server:
      server[0].should_exit = True

  app = app_lib.create_app(settings, on_load_failure=on_failure)
  app.state.llm.started = t0
  config = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level.lower(),
                          access_log=False, timeout_graceful_shutdown=5)
  server.append(uvicorn.Server(config))
  log.info("listening on http://%s:%d (pid %d); /health turns 200 once the model is compiled",
           args.host, args.port, os.getpid())
  server[0].run()
  return 1 if app.state.llm.error else 0


if __name__ == "__main__":
  raise SystemExit(main())
