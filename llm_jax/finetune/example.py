"""Worked example: pretrain `tiny` on the stdlib 'docs' domain, fine-tune on 'code' three ways, and
print the loss on both domains before and after, so adaptation and forgetting are visible.

    python -m llm_jax.finetune.example --workdir=/tmp/ft

Runs (each a normal training run directory under --workdir):
  pretrain   configs/tiny.py on data.mixture=docs=1
  full       init_from=pretrain, data.mixture=code=1, every weight trains
  frozen     the same with the embeddings and the bottom half of the blocks frozen
  lora       the same with rank-8 LoRA adapters on attention and MLP kernels (base frozen)
All runs share one prepared corpus (the whole stdlib: both domains, one tokenizer), so every fine-tune
reuses the pretraining tokenizer. Losses are over the complete validation split of each domain.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import time

import jax
import numpy as np
from absl import flags

from llm_jax import cli
from llm_jax import config as config_lib
from llm_jax.artifacts import open_model
from llm_jax.data import loader as loader_lib
from llm_jax.data import prepare as prepare_lib
from llm_jax.finetune import extension as finetune
from llm_jax.finetune import freeze
from llm_jax.model import Decoder, ModelConfig
from llm_jax.train import checkpoint
from llm_jax.train import step as step_lib

_WORKDIR = flags.DEFINE_string("workdir", None, "where the four run directories go")
_PRETRAIN = flags.DEFINE_integer("pretrain_steps", 200, "pretraining steps on docs")
_FINETUNE = flags.DEFINE_integer("finetune_steps", 100, "steps of each fine-tune on code")
_CONFIG = flags.DEFINE_string("config", "configs/tiny.py", "the preset to pretrain")
_OVERRIDES = flags.DEFINE_multi_string("override", [], "extra key=value config overrides for every run")

COMMON = {
  "data.stdlib_max_bytes": 3_000_000,  # a few MB of stdlib code keeps preparation under a minute
  "data.val_fraction": 0.05,
  "train.sample_every": 0,
  "train.eval_every": 0,  # the table below evaluates every domain in full instead
  "train.log_every": 25,
  "train.preflight": False,
}
RUNS = {  # name -> overrides on top of COMMON and init_from=pretrain
  "full": {"train.learning_rate": 1e-3},
  "frozen": {
    "train.learning_rate": 1e-3,
    "finetune.freeze_embeddings": True,
    "finetune.freeze_blocks": -2,
  },  # -2: half of model.num_layers, resolved below
  "lora": {
    "train.learning_rate": 5e-3,
    "finetune.lora.rank": 8,
    "finetune.lora.alpha": 16.0,
    "train.weight_decay": 0.0,
  },
}


def _config(overrides: dict):
  over = dict(COMMON)
  over.update(overrides)
  config = config_lib.load(_CONFIG.value, list(_OVERRIDES.value))
  for k, v in over.items():
    config_lib.set_key(config, k, v)
  return config


def _train(name: str, overrides: dict, root: str) -> str:
  workdir = os.path.join(root, name)
  t0 = time.time()
  out = finetune.train(_config(overrides), workdir)
  print(
    f"  {name}: {out['status']} at step {out['step']}, train loss {out['loss']:.3f} "
    f"({time.time() - t0:.0f}s)",
    flush=True,
  )
  return workdir


def _params(workdir: str):
  opened = open_model(workdir)  # a LoRA run's adapters come back merged into its base
  return opened.params, opened.config


def domain_losses(workdir: str, prepared) -> dict[str, float]:
  """Mean validation loss per domain over the whole val split (adapters merged for LoRA runs)."""
  params, config = _params(workdir)
  model = Decoder(ModelConfig.from_config(config))
  domains = prepared.domains
  fn = jax.jit(functools.partial(step_lib.eval_step, model=model, num_domains=len(domains)))
  nll, tok = np.zeros(len(domains)), np.zeros(len(domains))
  for batch in loader_lib.eval_batches(
    prepared.dir, "val", config.train.seq_len, config.train.global_batch_size
  ):
    out = jax.device_get(fn(params, batch))
    nll += out["domain_nll_sum"]
    tok += out["domain_tokens"]
  return {d: float(nll[i] / max(tok[i], 1)) for i, d in enumerate(domains)}


def _run_stats(workdir: str) -> dict:
  """Trainable parameters, saved train-state bytes (params + optimizer moments) and s/step."""
  ckpts = checkpoint.Checkpoints(workdir, read_only=True)
  meta = ckpts.saved_shapes(ckpts.latest_step())
  leaves = [m for m in _leaves(meta) if hasattr(m, "shape")]
  state_bytes = sum(int(np.prod(m.shape)) * np.dtype(m.dtype).itemsize for m in leaves)
  params = sum(int(np.prod(m.shape)) for m in _leaves(meta["params"]) if hasattr(m, "shape"))
  ckpts.close()
  opened = open_model(workdir)
  config = opened.config
  if not config.get("init_from") or config.finetune.lora.rank > 0:
    trainable = params  # everything trains, or the state holds only the adapters
  else:
    trainable = freeze.summary(opened.params, config)["trainable"]
  times = []
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    for line in f:
      row = json.loads(line)
      if "step_time_s" in row:
        times.append(row["step_time_s"])
  return {
    "trainable": trainable,
    "state_mb": state_bytes / 1e6,
    "step_s": float(np.median(times)) if times else float("nan"),
  }


def _leaves(tree):
  return jax.tree.leaves(tree, is_leaf=lambda x: hasattr(x, "shape") and hasattr(x, "dtype"))


def table(results: dict, domains: list[str]) -> str:
  """The before/after table as Markdown."""
  base = results["pretrain"]["loss"]
  head = (
    "| run | trainable params | train state MB | s/step | "
    + " | ".join(f"{d} loss (change)" for d in domains)
    + " |"
  )
  lines = [head, "|" + " --- |" * (4 + len(domains))]
  for name, r in results.items():
    cells = []
    for d in domains:
      delta = r["loss"][d] - base[d]
      cells.append(f"{r['loss'][d]:.3f}" + ("" if name == "pretrain" else f" ({delta:+.3f})"))
    lines.append(
      f"| {name} | {r['trainable']:,} | {r['state_mb']:.1f} | {r['step_s']:.3f} | " + " | ".join(cells) + " |"
    )
  return "\n".join(lines)


def main(argv) -> int:
  """Pretrains, fine-tunes three ways, evaluates every run on both domains, prints the table."""
  del argv
  logging.getLogger("absl").setLevel(logging.ERROR)  # Orbax's notes on read-only checkpoint reads
  root = os.path.abspath(_WORKDIR.value)
  os.makedirs(root, exist_ok=True)
  print("preparing the stdlib corpus (docs + code) ...", flush=True)
  prepared = prepare_lib.prepare(_config({}))
  print(f"  {prepared.dir}: domains {prepared.domains}", flush=True)
  print(f"pretraining on docs for {_PRETRAIN.value} steps ...", flush=True)
  pre = _train(
    "pretrain",
    {"data.mixture": "docs=1", "train.steps": _PRETRAIN.value, "train.checkpoint_every": _PRETRAIN.value},
    root,
  )
  layers = _config({}).model.num_layers
  print(f"fine-tuning on code for {_FINETUNE.value} steps: full, frozen, LoRA ...", flush=True)
  workdirs = {"pretrain": pre}
  for name, over in RUNS.items():
    over = dict(over)
    if over.get("finetune.freeze_blocks") == -2:
      over["finetune.freeze_blocks"] = max(1, layers // 2)
    over.update(
      {
        "init_from": pre,
        "data.mixture": "code=1",
        "train.steps": _FINETUNE.value,
        "train.warmup_steps": min(20, _FINETUNE.value // 5),
        "train.checkpoint_every": _FINETUNE.value,
      }
    )
    workdirs[name] = _train(name, over, root)
  print("evaluating every run on the full validation split of each domain ...", flush=True)
  results = {}
  for name, workdir in workdirs.items():
    results[name] = {"loss": domain_losses(workdir, prepared), **_run_stats(workdir)}
  text = table(results, prepared.domains)
  with open(os.path.join(root, "results.json.tmp"), "w") as f:
    json.dump(results, f, indent=2)
  os.replace(os.path.join(root, "results.json.tmp"), os.path.join(root, "results.json"))
  print()
  print(text)
  print(f"\n(results.json in {root})")
  return 0


flags.mark_flags_as_required(["workdir"])

if __name__ == "__main__":
  cli.run(main)
