"""Reading one JSON-object line of an evals/ file, with errors that name the file and line."""

from __future__ import annotations

import json


def read_object(line: str, where: str, error: type[Exception]) -> dict:
  """The JSON object on `line`; malformed JSON or another JSON value raises `error` naming `where`."""
  try:
    rec = json.loads(line)
  except json.JSONDecodeError as e:
    raise error(f"{where}: malformed JSON at column {e.colno} ({e.msg})") from e
  if not isinstance(rec, dict):
    raise error(f"{where}: each line must be a JSON object, got {type(rec).__name__}")
  return rec
