"""Config loading, overrides, cross-field checks and the few derived values every module shares."""

from __future__ import annotations

import ast
import difflib
import importlib.util
import json
import math
import os
from collections.abc import Iterable, Mapping
from typing import Any

import jax
import ml_collections


class ConfigError(ValueError):
  """A config value is wrong; the message names the key and what to do."""


def load(path: str, overrides: Iterable[str] | Mapping[str, Any] = ()) -> ml_collections.ConfigDict:
  """Loads `get_config()` from a config file and applies `a.b=v` overrides; unknown keys fail."""
  if not os.path.exists(path):
    raise ConfigError(f"config file {path!r} does not exist")
  spec = importlib.util.spec_from_file_location(f"_llm_jax_config_{abs(hash(path))}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  items = overrides.items() if isinstance(overrides, Mapping) else (_split(o) for o in overrides)
  for key, value in items:
    set_key(config, key, value)
  return config


def _split(override: str) -> tuple[str, str]:
  override = override.removeprefix("--config.").removeprefix("config.")
  if "=" not in override:
    raise ConfigError(f"override {override!r} must look like key.sub=value")
  key, value = override.split("=", 1)
  return key, value


def set_key(config: ml_collections.ConfigDict, key: str, value: Any) -> None:
  """Sets a dotted key, parsing strings to the field's type; a missing key raises naming it."""
  *parents, leaf = key.split(".")
  node = config
  for i, part in enumerate(parents):
    if part not in node:
      raise ConfigError(f"unknown config key {'.'.join(parents[: i + 1])!r} (in override {key!r})")
    node = node[part]
  if leaf not in node:
    close = [k for k in node.keys() if k[:3] == leaf[:3]] or difflib.get_close_matches(
      leaf, list(node.keys())
    )
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    raise ConfigError(f"unknown config key {key!r}{hint}")
  old = node[leaf]
  if isinstance(value, str) and not isinstance(old, str):
    value = _parse(key, value, old)
  with node.unlocked() if hasattr(node, "unlocked") else _null():
    node[leaf] = value


class _null:
  def __enter__(self):
    return self

  def __exit__(self, *a):
    return False


def _parse(key: str, text: str, old: Any) -> Any:
  if isinstance(old, bool):
    if text.lower() in ("true", "1", "yes"):
      return True
    if text.lower() in ("false", "0", "no"):
      return False
    raise ConfigError(f"config key {key!r} wants true or false, got {text!r}")
  try:
    value = ast.literal_eval(text)
  except (ValueError, SyntaxError) as e:
    raise ConfigError(f"config key {key!r}: cannot parse {text!r} as {type(old).__name__}") from e
  if isinstance(old, float) and isinstance(value, int):
    value = float(value)
  if old is not None and not isinstance(value, type(old)):
    raise ConfigError(f"config key {key!r} wants {type(old).__name__}, got {text!r}")
  return value


def to_dict(config: ml_collections.ConfigDict) -> dict:
  """A JSON-ready plain dict of the config."""
  return json.loads(config.to_json_best_effort())


# Keys added to configs/base.py after run directories were already written, with the value that
# reproduces what older code did. from_json fills them into an older config.json: the one migration.
ADDED_KEYS = {
  "model.attention_dropout": 0.0,
  "model.scan_unroll": 1,
  "model.logits_dtype": "auto",
  "model.causal": True,
  "model.rope_scaling": "none",
  "model.rope_scaling_factor": 1.0,
  "model.rope_low_freq_factor": 1.0,
  "model.rope_high_freq_factor": 4.0,
  "model.rope_original_max_len": 8192,
  "model.fp8": False,
  "model.fp8_head": True,  # model.fp8 covered the head until model.fp8_head existed
  "train.keep_best": True,
  "train.early_stop_patience": 0,
  "train.loss_chunks": 0,
  "train.loss_kernel": "xla",  # what runs from before `auto` trained with
  "model.gelu_kernel": "xla",  # what runs from before `auto` (2026-12-04) trained with
}
# Keys taken out of configs/base.py that a config.json may still hold; none changed the model's
# parameters or its forward pass, so migrate drops them.
REMOVED_KEYS = ("model.norm_vjp",)  # a hand-written norm gradient: slower on the H200 (2026-12-04)


def _parent(raw: dict, dotted: str):
  *parents, leaf = dotted.split(".")
  node = raw
  for part in parents:
    node = node.get(part) if isinstance(node, dict) else None
  return node if isinstance(node, dict) else None, leaf


def migrate(raw: dict) -> dict:
  """An older config.json's dict with every key of ADDED_KEYS it lacks (sections it has only) and none of
  REMOVED_KEYS."""
  for dotted, value in ADDED_KEYS.items():
    node, leaf = _parent(raw, dotted)
    if node is not None and leaf not in node:
      node[leaf] = value
  for dotted in REMOVED_KEYS:
    node, leaf = _parent(raw, dotted)
    if node is not None:
      node.pop(leaf, None)
  return raw


def from_json(path: str) -> ml_collections.ConfigDict:
  """Reads a resolved config written by `save_json` (the run directory's config.json), migrated."""
  with open(path) as f:
    return ml_collections.ConfigDict(migrate(json.load(f)))


def save_json(config: ml_collections.ConfigDict, path: str) -> None:
  """Writes the resolved config atomically."""
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(to_dict(config), f, indent=2, sort_keys=True)
  os.replace(tmp, path)


# ------------------------------------------------------------------ derived values


def total_steps(config) -> int:
  """The training budget in optimizer steps (from train.tokens when set, else train.steps)."""
  tr = config.train
  if tr.tokens and tr.tokens > 0:
    return int(math.ceil(tr.tokens / (tr.global_batch_size * tr.seq_len)))
  return int(tr.steps)


def padded_vocab(tokenizer_size: int, multiple: int) -> int:
  """Rounds the tokenizer's size up to a multiple (embedding rows)."""
  multiple = max(1, int(multiple))
  return int(math.ceil(tokenizer_size / multiple) * multiple)


def compute_dtype(config, platform: str | None = None) -> str:
  """The model's compute dtype name: 'auto' is bfloat16 on GPU/TPU and float32 on CPU."""
  if config.model.dtype != "auto":
    return config.model.dtype
  if platform is None:
    platform = jax.default_backend()
  return "float32" if platform == "cpu" else "bfloat16"


def validate(config, num_devices: int | None = None) -> None:
  """Cross-field checks before anything compiles; each failure names the keys involved."""
  m, tr, s = config.model, config.train, config.sharding
  _choice("model.positions", m.positions, ("learned", "rope"))
  _choice("model.norm", m.norm, ("layernorm", "rmsnorm"))
  _choice("model.rope_scaling", m.get("rope_scaling", "none"), ("none", "linear", "llama3"))
  _choice("model.activation", m.activation, ("gelu", "swiglu"))
  _choice("model.dtype", m.dtype, ("auto", "bfloat16", "float32"))
  _choice("model.attention", m.attention, ("auto", "cudnn", "xla"))
  _choice("model.logits_dtype", m.get("logits_dtype", "auto"), ("auto", "float32"))
  _choice("model.remat", m.remat, ("none", "full", "dots", "dots_no_batch"))
  _choice("train.schedule", tr.schedule, ("cosine", "linear", "constant"))
  _choice("train.nan_policy", tr.nan_policy, ("abort", "skip"))
  _choice("train.loss_kernel", tr.get("loss_kernel", "xla"), ("auto", "xla", "pallas"))
  _choice("model.gelu_kernel", m.get("gelu_kernel", "xla"), ("auto", "xla", "mosaic"))
  _choice("data.tokenizer.type", config.data.tokenizer.type, ("bpe", "unigram", "char"))
  _choice("data.on_bad_record", config.data.on_bad_record, ("fail", "skip"))
  _check_model(m)
  if m.d_model % m.num_heads and not m.head_dim:
    raise ConfigError(
      f"model.d_model={m.d_model} is not divisible by model.num_heads={m.num_heads}; "
      "set model.head_dim or change one of them"
    )
  kv = m.num_kv_heads or m.num_heads
  if m.num_heads % kv:
    raise ConfigError(f"model.num_heads={m.num_heads} must be a multiple of model.num_kv_heads={kv}")
  if int(m.get("scan_unroll", 1)) < 1:
    raise ConfigError(f"model.scan_unroll={m.scan_unroll} must be >= 1 (num_layers unrolls fully)")
  if tr.seq_len > m.max_seq_len:
    raise ConfigError(f"train.seq_len={tr.seq_len} exceeds model.max_seq_len={m.max_seq_len}")
  if tr.global_batch_size % max(1, tr.microbatches):
    raise ConfigError(
      f"train.global_batch_size={tr.global_batch_size} is not divisible by "
      f"train.microbatches={tr.microbatches}"
    )
  if total_steps(config) <= 0:
    raise ConfigError("train.steps (or train.tokens) must be positive")
  _check_training(tr, total_steps(config))
  if num_devices is not None:
    data, fsdp, tensor = mesh_shape(config, num_devices)
    if tensor > 1:
      if m.num_heads % tensor or kv % tensor:
        raise ConfigError(
          f"model.num_heads={m.num_heads} and model.num_kv_heads={kv} must be "
          f"divisible by sharding.tensor={tensor}"
        )
    micro = tr.global_batch_size // max(1, tr.microbatches)
    if micro % (data * fsdp):
      raise ConfigError(
        f"train.global_batch_size={tr.global_batch_size} / train.microbatches={tr.microbatches} = "
        f"{micro} is not divisible by the batch-parallel size sharding.data*sharding.fsdp = "
        f"{data}*{fsdp} = {data * fsdp}"
      )
  del s


def _check_model(m) -> None:
  """Model shapes and settings that cannot build a model, each named by its key (before JAX sees them)."""
  _choice("model.param_dtype", m.param_dtype, ("float32", "bfloat16", "float16"))
  for key in ("num_layers", "d_model", "num_heads", "max_seq_len", "vocab_multiple", "norm_eps"):
    if not m[key] > 0:
      hint = " (1: no padding)" if key == "vocab_multiple" else ""
      raise ConfigError(f"model.{key}={m[key]!r} must be > 0{hint}")
  for key in ("num_kv_heads", "head_dim", "mlp_dim", "vocab_size"):
    if m[key] < 0:
      raise ConfigError(f"model.{key}={m[key]!r} must be >= 0 (0: derived from the other sizes)")
  for key in ("dropout", "attention_dropout"):
    if key in m and not 0.0 <= m[key] < 1.0:
      raise ConfigError(f"model.{key}={m[key]!r} must be in [0, 1)")
  head_dim = m.head_dim or m.d_model // m.num_heads
  if m.positions == "rope":
    if head_dim % 2:
      raise ConfigError(
        f"model.head_dim={head_dim} (model.d_model={m.d_model} / model.num_heads={m.num_heads} when "
        "model.head_dim=0) must be even with model.positions='rope' (rotary pairs)"
      )
    if not m.rope_theta > 0:
      raise ConfigError(f"model.rope_theta={m.rope_theta!r} must be > 0")
  if m.get("rope_scaling", "none") != "none" and not m.get("rope_scaling_factor", 1.0) > 0:
    raise ConfigError(f"model.rope_scaling_factor={m.rope_scaling_factor!r} must be > 0")


def _check_training(tr, total: int) -> None:
  """Optimizer, schedule and bookkeeping settings that cannot work, each named by its key."""
  positive = (
    "learning_rate",
    "global_batch_size",
    "seq_len",
    "microbatches",
    "eps",
    "max_consecutive_skips",
    "keep_checkpoints",
  )
  for key in positive:
    if not tr[key] > 0:
      raise ConfigError(f"train.{key}={tr[key]!r} must be > 0")
  non_negative = (
    "weight_decay",
    "warmup_steps",
    "decay_steps",
    "grad_clip",
    "z_loss",
    "eval_every",
    "eval_batches",
    "sample_every",
    "checkpoint_every",
    "keep_every",
    "log_every",
    "throughput_alert",
    "plateau_evals",
    "tokens",
    "early_stop_patience",
    "loss_chunks",
  )
  for key in non_negative:
    if key in tr and tr[key] < 0:
      raise ConfigError(f"train.{key}={tr[key]!r} must be >= 0")
  for key in ("b1", "b2"):
    if not 0.0 <= tr[key] < 1.0:
      raise ConfigError(f"train.{key}={tr[key]!r} must be in [0, 1)")
  if not 0.0 <= tr.min_lr_ratio <= 1.0:
    raise ConfigError(
      f"train.min_lr_ratio={tr.min_lr_ratio!r} must be in [0, 1] (the decay's floor as "
      "a fraction of the peak learning rate)"
    )
  if tr.warmup_steps > total:
    raise ConfigError(
      f"train.warmup_steps={tr.warmup_steps} is longer than the run ({total} steps): the "
      "learning rate would never reach its peak; lower train.warmup_steps"
    )
  if tr.decay_steps and tr.decay_steps <= tr.warmup_steps:
    raise ConfigError(
      f"train.decay_steps={tr.decay_steps} must exceed train.warmup_steps="
      f"{tr.warmup_steps} (or be 0: decay over the whole run)"
    )
  if tr.sample_every > 0 and not tr.sample_tokens > 0:
    raise ConfigError(
      f"train.sample_tokens={tr.sample_tokens!r} must be > 0 with train.sample_every={tr.sample_every} "
      "(0 turns samples off)"
    )
  if tr.throughput_alert >= 1.0:
    raise ConfigError(
      f"train.throughput_alert={tr.throughput_alert} must be < 1 (a share of the running median; 0 disables)"
    )


def mesh_shape(config, num_devices: int) -> tuple[int, int, int]:
  """(data, fsdp, tensor) sizes; one of them may be -1 and takes the remaining devices."""
  sizes = [int(config.sharding.data), int(config.sharding.fsdp), int(config.sharding.tensor)]
  names = ["sharding.data", "sharding.fsdp", "sharding.tensor"]
  if sizes.count(-1) > 1:
    raise ConfigError(f"only one of {', '.join(names)} may be -1, got {sizes}")
  known = math.prod(s for s in sizes if s != -1)
  if any(s == 0 or s < -1 for s in sizes):
    raise ConfigError(f"mesh sizes {dict(zip(names, sizes, strict=True))} must be positive or -1")
  if -1 in sizes:
    if num_devices % known:
      raise ConfigError(
        f"{num_devices} devices cannot be split by the fixed mesh sizes "
        f"{dict(zip(names, sizes, strict=True))}"
      )
    sizes[sizes.index(-1)] = num_devices // known
  if math.prod(sizes) != num_devices:
    raise ConfigError(
      f"mesh {dict(zip(names, sizes, strict=True))} needs {math.prod(sizes)} devices, "
      f"but {num_devices} are present"
    )
  return tuple(sizes)


def _choice(key: str, value: str, allowed: tuple[str, ...]) -> None:
  if value not in allowed:
    raise ConfigError(f"{key}={value!r} is not one of {', '.join(allowed)}")
