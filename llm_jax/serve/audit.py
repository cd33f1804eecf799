"""The audit trail: one JSON line per request (ids, times, token counts, status, model provenance).

Prompt and completion text appear only when the server runs with --log-prompts.
"""
from __future__ import annotations

import datetime
import json
import logging
import sys

LOGGER_NAME = "llm_jax.serve.audit"


def make_logger(path: str = "") -> logging.Logger:
  """A logger writing bare JSON lines to `path` (appending) or to stderr."""
  logger = logging.getLogger(LOGGER_NAME + (f".{abs(hash(path))}" if path else ""))
  logger.setLevel(logging.INFO)
  logger.propagate = False
  if not logger.handlers:
    handler = logging.FileHandler(path, encoding="utf-8") if path else logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger.addHandler(handler)
  return logger


def iso(t: float) -> str:
  return datetime.datetime.fromtimestamp(t, datetime.timezone.utc).isoformat(timespec="milliseconds")


class Auditor:
  """Writes the audit line of each request, adding the package's identity."""

  def __init__(self, logger: logging.Logger, log_prompts: bool = False):
    self.logger = logger
    self.log_prompts = log_prompts
    self.identity: dict = {"build_id": "", "tokenizer_sha256": "", "manifest_sha256": ""}

  def write(self, record: dict) -> None:
    if not self.log_prompts:
      record = {k: v for k, v in record.items() if k not in ("prompt", "completion")}
    self.logger.info(json.dumps({**record, **self.identity}, sort_keys=True, default=str))
