"""A bounded load test against a local server (loopback addresses only).

    python -m llm_jax.serve.loadtest --url=http://127.0.0.1:8000 --concurrency=32 --requests=500

Every request streams with usage, so time to first token and time per output token are measured per
request; prints throughput, p50/p90/p99 of latency, TTFT and TPOT, and errors by status. Exit 0 when
every request succeeded, 1 when any failed, 2 for a refused (non-loopback) target or a bad flag.
"""

from __future__ import annotations

import asyncio
import json

from absl import flags

from llm_jax import cli
from llm_jax.serve import loadtest

_URL = flags.DEFINE_string("url", None, "http://127.0.0.1:PORT (loopback only).", required=True)
_CONCURRENCY = flags.DEFINE_integer("concurrency", 32, "Requests in flight.")
_REQUESTS = flags.DEFINE_integer("requests", 500, "Requests in all.")
_MAX_TOKENS = flags.DEFINE_integer("max_tokens", 64, "max_tokens of each request.")
_PROMPT = flags.DEFINE_string("prompt", "def ", "The prompt of every request.")
_TEMPERATURE = flags.DEFINE_float("temperature", 0.8, "Sampling temperature.")
_API_KEY_FILE = flags.DEFINE_string("api_key_file", "", "File holding the server's API key.")
_TIMEOUT = flags.DEFINE_float("timeout", 120.0, "Seconds per request.")
_PROCESSES = flags.DEFINE_integer(
  "processes",
  0,
  "Client processes sharing the load (0: one per 8 clients, at most half the cores), so that the "
  "client's own parsing does not limit the figures.",
  lower_bound=0,
)
_JSON = flags.DEFINE_bool("json", False, "Print the summary as JSON.")


def main(argv: list[str]) -> int:
  """Runs the load test and prints the summary; 1 when any request failed."""
  del argv
  key = ""
  if _API_KEY_FILE.value:
    try:
      with open(_API_KEY_FILE.value, encoding="utf-8") as f:
        key = f.read().strip()
    except OSError as e:
      raise cli.UsageError(f"cannot read --api_key_file {_API_KEY_FILE.value!r}: {e}") from e
  try:
    summary = asyncio.run(
      loadtest.run_load(
        _URL.value,
        concurrency=_CONCURRENCY.value,
        requests=_REQUESTS.value,
        max_tokens=_MAX_TOKENS.value,
        prompt=_PROMPT.value,
        temperature=_TEMPERATURE.value,
        api_key=key,
        timeout_s=_TIMEOUT.value,
        processes=_PROCESSES.value,
      )
    )
  except loadtest.LoadTestError as e:
    raise cli.UsageError(str(e)) from e
  print(json.dumps(summary, indent=2) if _JSON.value else loadtest.format_summary(summary))
  return 0 if not summary["errors"] else 1


if __name__ == "__main__":
  cli.run(main)
