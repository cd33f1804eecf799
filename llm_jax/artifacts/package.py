"""Model packages: a self-contained directory a server or a script loads with nothing else.

    PKG/model.json           format_version, architecture (ModelConfig fields not at their
                             defaults), tensors (shape, dtype), parameter count, precision,
                             provenance (step, git commit, tokenizer and data-manifest sha256), build
                             id, weights sha256, prompt_prefix, the tokenizer's special_ids, and
                             chat_template (the SFT templates) when the run was fine-tuned on SFT data
    PKG/weights.safetensors  parameters under flattened names ("blocks/attn/query/kernel"); an int8
                             tensor NAME comes with its float32 scales NAME.scale
    PKG/tokenizer.model      llm_jax's SentencePiece model (format 1), or, for other tokenizers
                             (format 2), the Hugging Face files: tokenizer.json or tokenizer.model,
                             with tokenizer_config.json
    PKG/README.md            model card

Architecture fields still at their ModelConfig defaults are left out of model.json, so a package of a
model that needs no newer field reads in older releases; a ModelConfig default therefore never changes
meaning. The table of format versions and the llm_jax versions that read them is in docs/serving.md.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import logging
import os
import shutil
import tempfile
import typing
from importlib import metadata

import jax
import jax.numpy as jnp
import numpy as np
import tomllib
from safetensors.numpy import save_file

from llm_jax.artifacts import outdir, weights_file
from llm_jax.artifacts.errors import PackageError
from llm_jax.data import hf_tokenizer
from llm_jax.data.shards import file_sha256
from llm_jax.data.tokenizer import Tokenizer
from llm_jax.model import ModelConfig
from llm_jax.model import quantize as quantize_lib
from llm_jax.model.params import abstract_params, cast_params, flatten, unflatten

FORMAT_VERSION = 1  # written when the tokenizer is llm_jax's own SentencePiece model
HF_TOKENIZER_FORMAT_VERSION = 2  # written for any other tokenizer (tokenizer.json, foreign special ids)
READS_FORMAT_VERSIONS = (1, 2)
MODEL_JSON, WEIGHTS, TOKENIZER, README = ("model.json", "weights.safetensors", "tokenizer.model", "README.md")


def project_version() -> str:
  """The llm_jax version (installed metadata, else the checkout's pyproject.toml)."""
  try:
    return metadata.version("llm-jax")
  except metadata.PackageNotFoundError:  # a source checkout: read pyproject.toml
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "pyproject.toml")
    try:
      with open(path, "rb") as f:
        return str(tomllib.load(f)["project"]["version"])
    except (OSError, KeyError, ValueError):
      return "source"


def _np(x) -> np.ndarray:
  return np.asarray(jax.device_get(x))


def write_package(
  out: str,
  params,
  model_config: ModelConfig,
  tokenizer_path: str,
  *,
  step: int | None = None,
  git_commit: str = "",
  manifest_sha256: str = "",
  tokenizer_sha256: str = "",
  quantize: str = "none",
  weights_dtype: str = "float32",
  name: str = "",
  source: str = "",
  prompt_prefix=None,
  chat_template: dict | None = None,
  overwrite: bool = False,
  tokenizer=None,
  stop_ids=(),
  declared_context: int | None = None,
) -> dict:
  """Writes a package directory atomically (built next to `out`, then renamed); returns model.json.

  `tokenizer` (a loaded tokenizer, e.g. a Hugging Face one) takes the place of `tokenizer_path`'s;
  `prompt_prefix` defaults to the tokenizer's (EOS for llm_jax's own, BOS for most others);
  `chat_template` (the SFT templates) is recorded for /v1/chat/completions; `stop_ids` (end-of-text
  ids besides EOS, e.g. an imported LLaMA-3 instruct's <|eot_id|>) for every generation;
  `declared_context` (a RoPE checkpoint's max_position_embeddings beyond `model_config.max_seq_len`,
  which opening it capped) is kept in the provenance for an HF export to write back.
  """
  if quantize not in ("none", "int8"):
    raise PackageError(f"quantize={quantize!r} is not one of none, int8")
  if weights_dtype not in ("float32", "bfloat16"):
    raise PackageError(f"weights_dtype={weights_dtype!r} is not one of float32, bfloat16")
  outdir.check_out(out, overwrite=overwrite, markers=(MODEL_JSON,), what="package", error=PackageError)
  params = jax.tree.map(_np, params)
  if quantize == "int8":
    params = quantize_lib.quantize_params(params)
  wdt = np.dtype(jnp.bfloat16) if weights_dtype == "bfloat16" else np.dtype(np.float32)
  tensors, table = {}, {}
  for key, leaf in flatten(params).items():
    if quantize_lib.is_qtensor(leaf):
      tensors[key], tensors[key + quantize_lib.SCALE_SUFFIX] = leaf.q, leaf.scale
    else:
      tensors[key] = leaf.astype(wdt) if np.issubdtype(leaf.dtype, np.floating) else leaf
  for key, arr in tensors.items():
    table[key] = {"shape": list(arr.shape), "dtype": str(arr.dtype)}
  if tokenizer is None:
    tokenizer = hf_tokenizer.load_tokenizer(tokenizer_path)
  tok_path = tokenizer.path or tokenizer_path
  own = type(tokenizer) is Tokenizer  # llm_jax's SentencePiece model: the format-1 layout
  tok_sha = file_sha256(tok_path) if own else tokenizer.sha256
  if tokenizer_sha256 and tokenizer_sha256 != tok_sha:
    raise PackageError(
      f"tokenizer {tok_path} has sha256 {tok_sha}, but the run recorded "
      f"{tokenizer_sha256}; the workdir's tokenizer was replaced"
    )
  if prompt_prefix is None:
    prompt_prefix = hf_tokenizer.prompt_prefix(tokenizer)
  parent = os.path.dirname(os.path.abspath(out)) or "."
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=".pkg-", dir=parent)
  try:
    version = FORMAT_VERSION if own else HF_TOKENIZER_FORMAT_VERSION
    save_file(
      tensors, os.path.join(tmp, WEIGHTS), metadata={"format": "llm_jax", "format_version": str(version)}
    )
    hashes = weights_file.hashes(os.path.join(tmp, WEIGHTS))
    weights_sha = hashes["weights_sha256"]
    if own:
      shutil.copyfile(tok_path, os.path.join(tmp, TOKENIZER))
    else:
      hf_tokenizer.save_hf_tokenizer(tokenizer, tmp)
    now = datetime.datetime.now(datetime.timezone.utc)
    meta = {
      "format_version": version,
      "name": name or os.path.basename(os.path.normpath(out)),
      "build_id": f"{now:%Y%m%dT%H%M%SZ}-{weights_sha[:12]}",
      "created": now.isoformat(timespec="seconds"),
      "llm_jax_version": project_version(),
      "architecture": architecture_json(model_config),
      "parameter_count": int(
        sum(int(np.prod(_np_shape(x))) for x in jax.tree.leaves(params, is_leaf=quantize_lib.is_qtensor))
      ),
      "precision": {
        "weights": "int8" if quantize == "int8" else weights_dtype,
        "float_tensors": weights_dtype,
        "quantization": (
          {
            "method": "int8 weight-only, symmetric, per output channel",
            "scale_suffix": quantize_lib.SCALE_SUFFIX,
          }
          if quantize == "int8"
          else None
        ),
        "trained_compute_dtype": model_config.dtype,
      },
      "prompt_prefix": [int(i) for i in prompt_prefix],
      "special_ids": {name: int(getattr(tokenizer, f"{name}_id")) for name in ("pad", "bos", "eos", "unk")},
      "provenance": {
        "training_step": step,
        "git_commit": git_commit or "unknown",
        "tokenizer_sha256": tok_sha,
        "manifest_sha256": manifest_sha256 or "unknown",
        "source": source,
        **({"max_position_embeddings": int(declared_context)} if declared_context else {}),
      },
      **hashes,
      "weights_bytes": os.path.getsize(os.path.join(tmp, WEIGHTS)),
      "tensors": table,
    }
    if stop_ids:
      meta["stop_ids"] = [int(i) for i in stop_ids]
    if chat_template:  # the SFT templates the model was fine-tuned with: {"prompt": ..., "turn": ...}
      meta["chat_template"] = dict(chat_template)
    _write_text(os.path.join(tmp, MODEL_JSON), json.dumps(meta, indent=2, sort_keys=True) + "\n")
    _write_text(os.path.join(tmp, README), model_card(meta))
    outdir.move_into_place(tmp, out)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  logging.info("wrote package %s (%s, %d bytes of weights)", out, meta["build_id"], meta["weights_bytes"])
  return meta


def architecture_json(cfg: ModelConfig) -> dict:
  """model.json's architecture: the required ModelConfig fields and every field not at its default."""
  out = {}
  for f in dataclasses.fields(ModelConfig):
    value = getattr(cfg, f.name)
    if f.default is dataclasses.MISSING or value != f.default:
      out[f.name] = value
  return out


def _np_shape(x):
  return x.q.shape if quantize_lib.is_qtensor(x) else np.shape(x)


def _write_text(path: str, text: str) -> None:
  with open(path + ".tmp", "w", encoding="utf-8") as f:
    f.write(text)
  os.replace(path + ".tmp", path)


def model_card(meta: dict) -> str:
  """README.md of a package: what the model is, its shapes and precision, where it came from."""
  a = dataclasses.asdict(model_config_from(meta["architecture"]))
  p, prov = meta["precision"], meta["provenance"]
  lines = [
    f"# {meta['name']}",
    "",
    f"A decoder-only language model exported by llm_jax {meta['llm_jax_version']} "
    f"(package format {meta['format_version']}, build `{meta['build_id']}`).",
    "",
    "## Architecture",
    "",
    "| field | value |",
    "| --- | --- |",
    *[f"| {k} | {v} |" for k, v in a.items()],
    f"| parameters | {meta['parameter_count']:,} |",
    "",
    "## Precision",
    "",
    f"- weights: {p['weights']}" + (f" ({p['quantization']['method']})" if p["quantization"] else ""),
    f"- other float tensors: {p['float_tensors']}",
    f"- compute dtype during training: {p['trained_compute_dtype']}; serving picks float32 on CPU "
    "and bfloat16 on accelerators unless told otherwise",
    "",
    "## Provenance",
    "",
    f"- training step: {prov['training_step']}",
    f"- git commit: {prov['git_commit']}",
    f"- tokenizer sha256: {prov['tokenizer_sha256']}",
    f"- data manifest sha256: {prov['manifest_sha256']}",
    f"- weights sha256: {meta['weights_sha256']}",
    "",
    "## Tensors",
    "",
    "| name | shape | dtype |",
    "| --- | --- | --- |",
    *[f"| {k} | {tuple(v['shape'])} | {v['dtype']} |" for k, v in sorted(meta["tensors"].items())],
    "",
    "## Use",
    "",
    "```",
    "python -m llm_jax.generate --package=. --prompt 'def '",
    "python -m llm_jax.serve --package=.   # then POST /v1/completions on 127.0.0.1:8000",
    "```",
    "",
    "## Limitations",
    "",
    "A small model trained from scratch: it continues text in the style of its training data and "
    "is not instruction-tuned, factual, or safe to show users without the server's filters and "
    "review.",
    "",
  ]
  return "\n".join(lines)


def read_model_json(path: str) -> dict:
  """model.json of a package, checked for a format version this llm_jax reads."""
  mj = os.path.join(path, MODEL_JSON)
  if not os.path.isdir(path):
    raise PackageError(f"package {path!r} is not a directory")
  try:
    with open(mj, encoding="utf-8") as f:
      meta = json.load(f)
  except FileNotFoundError as e:
    raise PackageError(
      f"{mj} is missing: {path!r} is not an llm_jax package (make one with python -m llm_jax.export)"
    ) from e
  except json.JSONDecodeError as e:
    raise PackageError(f"{mj} is not valid JSON (line {e.lineno}): {e.msg}") from e
  version = meta.get("format_version") if isinstance(meta, dict) else None
  if not isinstance(version, int) or isinstance(version, bool):
    raise PackageError(f"{mj}: format_version is missing or not an integer ({version!r})")
  if version not in READS_FORMAT_VERSIONS:
    newest = max(READS_FORMAT_VERSIONS)
    hint = (
      "it was written by a newer llm_jax; upgrade llm_jax (see the format table in docs/serving.md)"
      if version > newest
      else "this version is unknown"
    )
    raise PackageError(
      f"{mj}: package format_version {version} cannot be read by this llm_jax, "
      f"which reads versions {list(READS_FORMAT_VERSIONS)}; {hint}"
    )
  for key in ("architecture", "tensors", "provenance", "build_id"):
    if key not in meta:
      raise PackageError(f"{mj}: required key {key!r} is missing")
  return meta


def model_config_from(meta_arch: dict, where: str = MODEL_JSON) -> ModelConfig:
  """ModelConfig from model.json's architecture; unknown fields fail naming them."""
  known = {f.name for f in dataclasses.fields(ModelConfig)}
  unknown = sorted(set(meta_arch) - known)
  if unknown:
    raise PackageError(
      f"{where}: architecture fields {unknown} are unknown to this llm_jax; the package needs a newer version"
    )
  hints = typing.get_type_hints(ModelConfig)
  for name, value in meta_arch.items():
    want = hints[name]
    if not _json_is(value, want):
      raise PackageError(f"{where}: architecture.{name} is {value!r}; it must be a JSON {want.__name__}")
  try:
    return ModelConfig(**meta_arch)
  except TypeError as e:
    raise PackageError(f"{where}: architecture is incomplete: {e}") from e


def _json_is(value, want: type) -> bool:
  """A JSON value is of a ModelConfig field's type (int, float, str, bool; an int is a float too)."""
  if isinstance(value, bool):
    return want is bool
  return isinstance(value, (int, float) if want is float else want)


def read_package(path: str, *, dtype: str = "float32", keep_int8: bool = False, verify: bool = True):
  """(params, ModelConfig as trained, Tokenizer, model.json) of a package; the one package reader.

  Float leaves come back in `dtype` on the default device; int8 leaves are dequantized to `dtype`
  unless `keep_int8` (QTensor leaves, dequantized inside each jitted step).
  """
  meta = read_model_json(path)
  cfg = model_config_from(meta["architecture"], os.path.join(path, MODEL_JSON))
  wpath = os.path.join(path, WEIGHTS)
  if not os.path.exists(wpath):
    raise PackageError(f"{wpath} is missing")
  flat = weights_file.read_checked(wpath, meta, verify)
  dt = jnp.dtype(dtype)
  leaves = {}
  for key, arr in flat.items():
    if key.endswith(quantize_lib.SCALE_SUFFIX):
      continue
    scale_key = key + quantize_lib.SCALE_SUFFIX
    if scale_key in flat:
      leaves[key] = quantize_lib.QTensor(q=jax.device_put(arr), scale=jax.device_put(flat[scale_key]))
    else:  # a transfer (jnp.asarray compiles a copy per shape); float leaves are cast below in one call
      leaves[key] = jax.device_put(arr)
  params = cast_params(unflatten(leaves), dt)
  if not keep_int8:
    params = quantize_lib.dequantize(params, dt)
  _check_shapes(params, cfg, path)
  tokenizer = read_tokenizer(path, meta)
  want_sha = meta["provenance"].get("tokenizer_sha256")
  if verify and want_sha and tokenizer.sha256 != want_sha:
    raise PackageError(f"{tokenizer.path} has sha256 {tokenizer.sha256}, model.json says {want_sha}")
  if tokenizer.vocab_size > cfg.vocab_size:
    raise PackageError(
      f"{tokenizer.path} has {tokenizer.vocab_size} pieces but the model only {cfg.vocab_size} embedding rows"
    )
  return params, cfg, tokenizer, meta


def tokenizer_file(path: str) -> str:
  """The package's tokenizer file: tokenizer.json when present, else tokenizer.model (must exist)."""
  for name in (hf_tokenizer.TOKENIZER_JSON, TOKENIZER):
    if os.path.exists(os.path.join(path, name)):
      return os.path.join(path, name)
  raise PackageError(f"{os.path.join(path, TOKENIZER)} is missing (and so is {hf_tokenizer.TOKENIZER_JSON})")


def read_tokenizer(path: str, meta: dict):
  """The package's tokenizer; model.json's special_ids fill in what tokenizer_config.json leaves out."""
  tokenizer_file(path)
  special = {k: int(v) for k, v in (meta.get("special_ids") or {}).items() if isinstance(v, int)}
  try:
    tokenizer = hf_tokenizer.load_tokenizer(path, special_ids=special)
  except hf_tokenizer.DataError as e:
    raise PackageError(f"{path}: {e}") from e
  for key in ("prompt_prefix", "stop_ids"):
    ids = meta.get(key, [])
    if not isinstance(ids, list) or not all(
      isinstance(i, int) and not isinstance(i, bool) and 0 <= i < tokenizer.vocab_size for i in ids
    ):
      raise PackageError(
        f"{os.path.join(path, MODEL_JSON)}: {key} is {ids!r}, not a list of token ids below "
        f"the tokenizer's {tokenizer.vocab_size}"
      )
  return tokenizer


def _check_shapes(params, cfg: ModelConfig, path: str) -> None:
  """The weights fit the architecture (same tree and shapes as Decoder.init would make)."""
  want = flatten(abstract_params(cfg)[0])
  have = {k: _np_shape(v) for k, v in flatten(params).items()}
  problems = [f"{k}: missing" for k in want if k not in have]
  problems += [f"{k}: unexpected" for k in have if k not in want]
  problems += [
    f"{k}: shape {tuple(have[k])} but the architecture needs {tuple(want[k].shape)}"
    for k in want
    if k in have and tuple(have[k]) != tuple(want[k].shape)
  ]
  if problems:
    raise PackageError(
      f"{os.path.join(path, WEIGHTS)} does not fit model.json's architecture: " + "; ".join(problems[:8])
    )
