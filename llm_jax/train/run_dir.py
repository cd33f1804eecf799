"""The run directory describes itself: config.json, the tokenizer, manifest.json and run.json.

WORKDIR/
  config.json      the resolved config (model.vocab_size filled in from the tokenizer)
  tokenizer.model  copy of the tokenizer the data was encoded with: llm_jax's SentencePiece model, or a
                   source model's Hugging Face files (tokenizer.json or tokenizer.model, with
                   tokenizer_config.json) when a fine-tune reuses them
  manifest.json    copy of the prepared data's manifest
  run.json         git commit, package versions, command line, seeds, devices, tag/note, hashes;
                   one entry in "sessions" per start (fresh or resumed)
  checkpoints/     Orbax (llm_jax.train.checkpoint)
  tb/              TensorBoard events; metrics.jsonl one JSON object per logged step
"""

from __future__ import annotations

import datetime
import importlib.metadata
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
from typing import Any

import jax

from llm_jax import config as config_lib
from llm_jax.data.prepare import not_a_run
from llm_jax.model import ModelConfig

log = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
RUN_FILE = "run.json"
TOKENIZER_FILE = "tokenizer.model"
TOKENIZER_JSON = "tokenizer.json"  # a Hugging Face tokenizer (read first when present)
MANIFEST_FILE = "manifest.json"

# ModelConfig fields that decide parameter shapes: a resumed run must keep them.
SHAPE_FIELDS = (
  "vocab_size",
  "num_layers",
  "d_model",
  "num_heads",
  "num_kv_heads",
  "head_dim",
  "mlp_dim",
  "max_seq_len",
  "positions",
  "norm",
  "activation",
  "tie_embeddings",
  "use_bias",
  "scan_layers",
  "param_dtype",
)
_PACKAGES = (
  "jax",
  "jaxlib",
  "flax",
  "optax",
  "orbax-checkpoint",
  "grain",
  "sentencepiece",
  "numpy",
  "ml_collections",
  "tensorboardX",
  "llm-jax",
)


class RunDirError(RuntimeError):
  """The workdir cannot hold this run (another model, other data); the message lists the keys."""


def _write_json(path: str, obj: Any) -> None:
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(obj, f, indent=2, sort_keys=True, default=str)
  os.replace(tmp, path)


def _read_json(path: str) -> dict:
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, json.JSONDecodeError) as e:
    raise RunDirError(f"cannot read {path}: {e}") from e


def _copy(src: str, dst: str) -> None:
  tmp = dst + ".tmp"
  shutil.copyfile(src, tmp)
  os.replace(tmp, dst)


def saved_config(workdir: str):
  """The config.json of an existing run, or None for a fresh workdir."""
  path = os.path.join(workdir, CONFIG_FILE)
  if not os.path.exists(path):
    return None
  try:
    return config_lib.from_json(path)
  except (OSError, ValueError, TypeError, AttributeError) as e:
    raise RunDirError(
      f"cannot read {path} ({type(e).__name__}: {e}): the run's resolved config; restore it, or use a "
      "new --workdir"
    ) from e


def shape_differences(saved_model_cfg, model_cfg) -> list[str]:
  """'model.d_model: run has 64, config asks 128' for each shape-deciding field that differs."""
  out = []
  for f in SHAPE_FIELDS:
    a, b = getattr(saved_model_cfg, f), getattr(model_cfg, f)
    if a != b:
      out.append(f"model.{f}: the run has {a!r}, the config asks {b!r}")
  return out


def _flat(d: dict, prefix: str = "") -> dict[str, Any]:
  out = {}
  for k, v in d.items():
    key = f"{prefix}{k}"
    if isinstance(v, dict):
      out.update(_flat(v, key + "."))
    else:
      out[key] = v
  return out


def changed_keys(saved, config) -> list[str]:
  """Dotted keys whose values differ between a saved and a new config (for the resume log line)."""
  a, b = _flat(config_lib.to_dict(saved)), _flat(config_lib.to_dict(config))
  return sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))


def changed_sources(old: dict, new: dict, limit: int = 5) -> str:
  """'input files changed: a.txt (content), b.txt (added)' between two data manifests, or ''."""
  before = {s["path"]: s.get("sha256") for s in old.get("sources", []) if "path" in s}
  after = {s["path"]: s.get("sha256") for s in new.get("sources", []) if "path" in s}
  diffs = [f"{p} (content)" for p in sorted(before.keys() & after.keys()) if before[p] != after[p]]
  diffs += [f"{p} (added)" for p in sorted(after.keys() - before.keys())]
  diffs += [f"{p} (gone)" for p in sorted(before.keys() - after.keys())]
  if not diffs:
    return ""
  more = f" and {len(diffs) - limit} more" if len(diffs) > limit else ""
  return f"input files changed since the run started: {', '.join(diffs[:limit])}{more}"


def check_resume(
  workdir: str, config, model_cfg, tokenizer_sha256: str, manifest: dict | None = None
) -> None:
  """Raises RunDirError listing every differing key if this workdir's run cannot continue with `config`.

  `manifest` (the prepared data's) lets a tokenizer mismatch name the input files that changed."""
  held = not_a_run(workdir)
  if held:
    raise RunDirError(
      f"--workdir {workdir} is a {held}, not a run directory: training there would replace its "
      "tokenizer; give a new --workdir (--config.init_from starts from a package or checkpoint)"
    )
  saved = saved_config(workdir)
  if saved is None:
    return
  saved_model = ModelConfig.from_config(saved, platform="cpu")
  diffs = shape_differences(saved_model, model_cfg)
  if diffs:
    raise RunDirError(
      f"{workdir} holds a run of another model shape ({len(diffs)} differing keys):\n  "
      + "\n  ".join(diffs)
      + "\nResume with the original settings, or use a new --workdir."
    )
  run = os.path.join(workdir, RUN_FILE)
  if os.path.exists(run):
    old = _read_json(run).get("tokenizer_sha256")
    if old and old != tokenizer_sha256:
      files = ""
      saved_manifest = os.path.join(workdir, MANIFEST_FILE)
      if manifest is not None and os.path.exists(saved_manifest):
        try:
          files = changed_sources(_read_json(saved_manifest), manifest)
        except RunDirError as e:
          files = str(e)
      raise RunDirError(
        f"{workdir} was trained with tokenizer sha256 {old[:12]}..., but the data settings now give "
        f"{tokenizer_sha256[:12]}...; changed data.* keys: "
        f"{', '.join(k for k in changed_keys(saved, config) if k.startswith('data.')) or 'none'}"
        + (f"; {files}" if files else "")
        + ". Resume with the original data, or use a new --workdir."
      )
  changed = [k for k in changed_keys(saved, config) if k != "model.vocab_size"]
  if changed:
    log.info("resuming %s with changed config keys: %s", workdir, ", ".join(changed))


def git_commit() -> dict[str, Any]:
  """{'commit': sha or None, 'dirty': bool} of the checkout llm_jax runs from."""
  root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  try:
    sha = subprocess.run(
      ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10, check=True
    ).stdout.strip()
    dirty = (
      subprocess.run(
        ["git", "status", "--porcelain", "--untracked-files=no"],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=10,
      ).stdout.strip()
      != ""
    )
    return {"commit": sha, "dirty": dirty}
  except (OSError, subprocess.SubprocessError):
    return {"commit": None, "dirty": None}


def package_versions() -> dict[str, str | None]:
  out = {}
  for name in _PACKAGES:
    try:
      out[name] = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
      out[name] = None
  return out


def device_info() -> dict[str, Any]:
  devices = jax.devices()
  return {
    "platform": devices[0].platform,
    "kind": devices[0].device_kind,
    "count": len(devices),
    "local_count": jax.local_device_count(),
    "process_count": jax.process_count(),
  }


def _now() -> str:
  return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def write(
  workdir: str,
  config,
  prepared,
  *,
  start_step: int,
  argv: list[str] | None = None,
  extra: dict | None = None,
) -> dict:
  """Writes config.json, the tokenizer's files, manifest.json and run.json (call on process 0 only).

  `prepared` is the data pipeline's Prepared (tokenizer_path, manifest_path and their sha256; the
  tokenizer's files from `tokenizer_files()`). `extra`: fields the trainer's extension adds to run.json.
  Returns the run record. A resumed run keeps its first record and appends a session.
  """
  os.makedirs(workdir, exist_ok=True)
  config_lib.save_json(config, os.path.join(workdir, CONFIG_FILE))
  if hasattr(prepared, "tokenizer_files"):
    for src in prepared.tokenizer_files():
      _copy(src, os.path.join(workdir, os.path.basename(src)))
  else:
    _copy(prepared.tokenizer_path, os.path.join(workdir, TOKENIZER_FILE))
  if getattr(prepared, "manifest_path", None) and os.path.exists(prepared.manifest_path):
    _copy(prepared.manifest_path, os.path.join(workdir, MANIFEST_FILE))
  session = {
    "start_time": _now(),
    "start_step": int(start_step),
    "command": list(sys.argv if argv is None else argv),
    "git": git_commit(),
    "run_tag": config.run_tag,
    "run_note": config.run_note,
    "devices": device_info(),
    "host": socket.gethostname(),
  }
  path = os.path.join(workdir, RUN_FILE)
  record = _read_json(path) if os.path.exists(path) else None
  if record is None:
    record = {
      "start_time": session["start_time"],
      "command": session["command"],
      "git": session["git"],
      "packages": package_versions(),
      "python": sys.version.split()[0],
      "seeds": {"init": config.train.seed, "dropout": config.train.dropout_seed, "data": config.data.seed},
      "run_tag": config.run_tag,
      "run_note": config.run_note,
      "tokenizer_sha256": prepared.tokenizer_sha256,
      "manifest_sha256": getattr(prepared, "manifest_sha256", None),
      "data_dir": str(getattr(prepared, "dir", "")),
      "devices": session["devices"],
      "sessions": [],
    }
  record["sessions"].append(session)
  record.update(extra or {})
  if config.run_tag:
    record["run_tag"] = config.run_tag
  if config.run_note:
    record["run_note"] = config.run_note
  _write_json(path, record)
  return record


def update_record(workdir: str, **fields: Any) -> dict:
  """Sets top-level fields of run.json (e.g. best={'step', 'val_loss'}); call on process 0 only."""
  path = os.path.join(workdir, RUN_FILE)
  record = _read_json(path) if os.path.exists(path) else {}
  record.update(fields)
  _write_json(path, record)
  return record
