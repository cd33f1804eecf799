"""A labelled set the project makes offline: which standard-library package a docstring comes from.

    docs = stdlib_docstrings(("asyncio", "email", "logging", "xml"), per_label=200)
    write_split(docs, "data/docstrings", val_fraction=0.2)   # train.jsonl, val.jsonl

Docstrings of the functions, methods and classes (and modules) of each package's .py files, cleaned by
inspect.cleandoc, at least `min_chars` long; a text found under two packages is dropped, a repeated one
kept once. Each label keeps at most `per_label` texts (a seeded sample), so the classes are balanced and
the majority-class baseline is 1 / number of labels. `python -m llm_jax.encoder.make_example` writes them.
"""

from __future__ import annotations

import ast
import inspect
import json
import logging
import os
import random
import sysconfig

from llm_jax.data.errors import DataError

log = logging.getLogger(__name__)
PACKAGES = ("asyncio", "email", "logging", "xml")
_DEFS = (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Module)


def _package_files(root: str, package: str) -> list[str]:
  """The package's .py files (a module `package.py` alone counts too), in sorted order."""
  path = os.path.join(root, package)
  if os.path.isfile(path + ".py"):
    return [path + ".py"]
  if not os.path.isdir(path):
    raise DataError(f"no standard-library package {package!r} under {root}")
  out = []
  for d, dirs, files in os.walk(path):
    dirs[:] = sorted(x for x in dirs if x not in ("test", "tests", "__pycache__"))
    out += [os.path.join(d, f) for f in sorted(files) if f.endswith(".py")]
  return out


def docstrings_of(path: str, min_chars: int) -> list[str]:
  """The cleaned docstrings of a file's module, classes and functions, in source order."""
  try:
    with open(path, encoding="utf-8") as f:
      tree = ast.parse(f.read(), filename=path)
  except (SyntaxError, UnicodeDecodeError, ValueError):
    log.info("skipping %s: not parseable as UTF-8 Python", path)
    return []
  out = []
  for node in ast.walk(tree):
    if isinstance(node, _DEFS):
      doc = ast.get_docstring(node, clean=False)
      text = inspect.cleandoc(doc).strip() if doc else ""
      if len(text) >= min_chars:
        out.append(text)
  return out


def stdlib_docstrings(
  packages=PACKAGES, per_label: int = 200, min_chars: int = 40, seed: int = 0, root: str = ""
) -> list[tuple[str, str]]:
  """(docstring, package) pairs: at most per_label per package, texts unique to one package, shuffled."""
  if len(set(packages)) < 2:
    raise DataError(f"packages={list(packages)!r}: a classification set needs at least 2 distinct packages")
  root = root or sysconfig.get_paths()["stdlib"]
  found: dict[str, set] = {}
  for package in packages:
    for path in _package_files(root, package):
      for text in docstrings_of(path, min_chars):
        found.setdefault(text, set()).add(package)
  by_label = {p: sorted(t for t, owners in found.items() if owners == {p}) for p in packages}
  rng = random.Random(seed)
  out = []
  for package, texts in by_label.items():
    if not texts:
      raise DataError(f"package {package!r} has no docstrings of {min_chars}+ characters under {root}")
    rng.shuffle(texts)
    out += [(t, package) for t in texts[:per_label]]
    log.info("%s: %d docstrings, kept %d", package, len(texts), min(len(texts), per_label))
  rng.shuffle(out)
  return out


def split(pairs: list[tuple[str, str]], val_fraction: float) -> tuple[list, list]:
  """(train, val): the same fraction of every label held out (at least one per label)."""
  if not 0.0 < val_fraction < 1.0:
    raise DataError(f"val_fraction={val_fraction!r} must be in (0, 1)")
  train, val = [], []
  for label in sorted({lab for _, lab in pairs}):
    rows = [p for p in pairs if p[1] == label]
    n_val = max(1, round(len(rows) * val_fraction))
    if n_val >= len(rows):
      raise DataError(f"label {label!r} has {len(rows)} texts: too few to hold out {val_fraction:.0%}")
    val += rows[:n_val]
    train += rows[n_val:]
  rng = random.Random(len(pairs))
  rng.shuffle(train)
  rng.shuffle(val)
  return train, val


def write_jsonl(pairs: list[tuple[str, str]], path: str) -> None:
  """One `{"text": ..., "label": ...}` object per line."""
  with open(path, "w", encoding="utf-8") as f:
    for text, label in pairs:
      f.write(json.dumps({"text": text, "label": label}, ensure_ascii=False) + "\n")


def write_split(pairs: list[tuple[str, str]], out_dir: str, val_fraction: float = 0.2) -> dict:
  """Writes OUT_DIR/train.jsonl and val.jsonl; returns their paths and per-label counts."""
  train, val = split(pairs, val_fraction)
  os.makedirs(out_dir, exist_ok=True)
  paths = {"train": os.path.join(out_dir, "train.jsonl"), "val": os.path.join(out_dir, "val.jsonl")}
  write_jsonl(train, paths["train"])
  write_jsonl(val, paths["val"])
  counts = {
    name: {lab: sum(1 for _, x in rows if x == lab) for lab in sorted({x for _, x in rows})}
    for name, rows in (("train", train), ("val", val))
  }
  return {"paths": paths, "counts": counts}
