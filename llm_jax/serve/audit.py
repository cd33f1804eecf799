"""The audit trail: one JSON line per request (ids, times, token counts, status, model provenance).

Prompt and completion text appear only when the server runs with --log_prompts. The file is created
readable by its owner only (0600; an existing file is tightened) and rotated by size: at
`max_bytes` it becomes FILE.1 (FILE.1 becomes FILE.2, ...; `backups` old files are kept).
Without a path the lines go to stderr.
"""

from __future__ import annotations

import datetime
import json
import logging
import logging.handlers
import os
import sys

LOGGER_NAME = "llm_jax.serve.audit"
DEFAULT_MAX_BYTES = 100 << 20
DEFAULT_BACKUPS = 5


class PrivateRotatingFileHandler(logging.handlers.RotatingFileHandler):
  """A RotatingFileHandler whose file (at start and after every rollover) is mode 0600."""

  def _open(self):
    fd = os.open(self.baseFilename, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
      os.fchmod(fd, 0o600)
      return os.fdopen(fd, "a", encoding=self.encoding, errors=self.errors)
    except BaseException:
      os.close(fd)
      raise


def iso(t: float) -> str:
  """A UNIX time as ISO 8601 UTC with milliseconds."""
  return datetime.datetime.fromtimestamp(t, datetime.timezone.utc).isoformat(timespec="milliseconds")


class Auditor:
  """Writes the audit line of each request, adding the package's identity."""

  def __init__(
    self,
    path: str = "",
    *,
    max_bytes: int = DEFAULT_MAX_BYTES,
    backups: int = DEFAULT_BACKUPS,
    log_prompts: bool = False,
  ):
    if max_bytes < 0 or backups < 0 or (max_bytes and not backups):
      raise ValueError(
        f"audit log rotation: max_bytes={max_bytes} and backups={backups}; "
        "rotating needs max_bytes > 0 and backups >= 1 (max_bytes 0: never rotate)"
      )
    # A logger of its own (not in logging's registry): each app has its own file and settings.
    self.logger = logging.Logger(LOGGER_NAME, logging.INFO)
    self.handler = (
      PrivateRotatingFileHandler(path, maxBytes=max_bytes, backupCount=backups, encoding="utf-8")
      if path
      else logging.StreamHandler(sys.stderr)
    )
    self.handler.setFormatter(logging.Formatter("%(message)s"))
    self.logger.addHandler(self.handler)
    self.log_prompts = log_prompts
    self.identity: dict = {"build_id": "", "tokenizer_sha256": "", "manifest_sha256": ""}

  def write(self, record: dict) -> None:
    """One JSON line (ASCII: any text from a request is escaped)."""
    if not self.log_prompts:
      record = {k: v for k, v in record.items() if k not in ("prompt", "completion")}
    self.logger.info(json.dumps({**record, **self.identity}, sort_keys=True, default=str))

  def close(self) -> None:
    """Closes the file (a StreamHandler leaves stderr open)."""
    self.logger.removeHandler(self.handler)
    self.handler.close()
