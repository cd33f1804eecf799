"""Fine-tuning through the training loop: init_from, freezing, LoRA, tokenizer reuse, SFT files."""

import json
import os
import random

import jax
import numpy as np
import pytest

from llm_jax import config as config_lib
from llm_jax.artifacts import open_model
from llm_jax.artifacts.export import export
from llm_jax.finetune import extension as finetune
from llm_jax.finetune import init_from
from llm_jax.model.params import flatten
from llm_jax.train import checkpoint, loop, preflight

WORDS = "alpha beta gamma delta value total count index item name data result list text line".split()


def write_corpus(root: str, n_docs: int = 60) -> None:
  """Two domains under root/code and root/prose."""
  rng = random.Random(0)
  for dom in ("code", "prose"):
    os.makedirs(os.path.join(root, dom), exist_ok=True)
  for i in range(n_docs):
    lines = [
      f"def {rng.choice(WORDS)}_{i}_{j}(x, n={j}):\n    return x + {rng.randint(0, 99)} * n\n"
      for j in range(rng.randint(4, 8))
    ]
    with open(os.path.join(root, "code", f"f{i}.txt"), "w") as f:
      f.write("\n".join(lines))
    with open(os.path.join(root, "prose", f"p{i}.txt"), "w") as f:
      f.write("The " + " ".join(rng.choice(WORDS) for _ in range(rng.randint(40, 70))) + ".\n")


@pytest.fixture(scope="module")
def env(tmp_path_factory, devices):
  root = tmp_path_factory.mktemp("ftloop")
  write_corpus(str(root / "corpus"))
  old = jax.config.jax_compilation_cache_dir
  jax.config.update("jax_compilation_cache_dir", str(root / "xla_cache"))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
  over = {
    "data.corpus": f"{root}/corpus/*/*.txt",
    "data.cache_dir": str(root / "data_cache"),
    "data.tokenizer.vocab_size": 384,
    "data.val_fraction": 0.15,
    "data.near_dup_threshold": 0.0,
    "model.d_model": 32,
    "model.num_heads": 2,
    "model.num_layers": 2,
    "model.max_seq_len": 32,
    "model.vocab_multiple": 64,
    "train.seq_len": 32,
    "train.global_batch_size": 8,
    "train.steps": 6,
    "train.warmup_steps": 1,
    "train.learning_rate": 3e-3,
    "train.eval_every": 6,
    "train.eval_batches": 2,
    "train.checkpoint_every": 6,
    "train.sample_every": 0,
    "train.log_every": 1,
    "train.preflight": False,
    "sharding.data": 8,
  }
  source = str(root / "source")
  out = loop.train(config_lib.load("configs/base.py", {**over, "data.mixture": "prose=1"}), source)
  assert out["status"] == "complete"
  yield {"root": root, "over": over, "source": source}
  jax.config.update("jax_compilation_cache_dir", old)


def cfg(env, **extra):
  over = {**env["over"], "init_from": env["source"], "data.mixture": "code=1"}
  over.update({k.replace("__", "."): v for k, v in extra.items()})
  return config_lib.load("configs/base.py", over)


def metrics(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def test_frozen_fine_tune_on_the_source_tokenizer(env):
  """Freezing through the loop, with data prepared on the source's tokenizer (another vocab size)."""
  workdir = str(env["root"] / "frozen")
  other = dict(data__tokenizer__vocab_size=320)
  with pytest.raises(
    init_from.InitFromError,
    match=r"sha256 [0-9a-f]{64}.*sha256 [0-9a-f]{64}.*"
    r"reuse_source_tokenizer",
  ):
    finetune.train(cfg(env, **other), workdir)
  with pytest.raises(config_lib.ConfigError, match="init_from=.*fine-tuning extension"):
    loop.train(cfg(env), workdir)  # plain pretraining never ignores init_from silently
  out = finetune.train(
    cfg(
      env,
      finetune__freeze_blocks=1,
      finetune__freeze_embeddings=True,
      reuse_source_tokenizer=True,
      init_from=env["source"] + "@best",
      **other,
    ),
    workdir,
  )
  assert out["status"] == "complete" and out["step"] == 6
  _, want = init_from.tokenizer_of(env["source"])
  assert json.load(open(os.path.join(workdir, "manifest.json")))["tokenizer"]["sha256"] == want
  src = open_model(env["source"]).params
  opened = open_model(workdir)
  got, config = opened.params, opened.config
  assert config.init_from == os.path.abspath(env["source"])
  assert config.finetune.init_step == 6  # RUN@best: the source's best checkpoint, pinned
  np.testing.assert_array_equal(got["embedding"], src["embedding"])
  np.testing.assert_array_equal(
    got["blocks"]["mlp"]["up"]["kernel"][0], src["blocks"]["mlp"]["up"]["kernel"][0]
  )
  assert not np.array_equal(got["blocks"]["mlp"]["up"]["kernel"][1], src["blocks"]["mlp"]["up"]["kernel"][1])
  assert any("val_loss/code" in r for r in metrics(workdir))


def test_lora_sft_through_the_loop_checkpoints_adapters_and_exports(env, tmp_path):
  lines = [{"prompt": f"value {i}", "response": f"def f_{i}(x):\n    return x + {i}"} for i in range(20)]
  train = tmp_path / "train.jsonl"
  train.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
  val = tmp_path / "val.jsonl"
  val.write_text("\n".join(json.dumps(x) for x in lines[:4]) + "\n")
  sft = dict(
    finetune__sft__train_file=str(train),
    finetune__sft__val_file=str(val),
    finetune__sft__prompt_template="Q: {prompt}\nA: ",
  )
  workdir = str(env["root"] / "lora")
  out = finetune.train(
    cfg(env, finetune__lora__rank=2, finetune__lora__targets="attn/query,mlp/up", **sft), workdir
  )
  assert out["status"] == "complete" and np.isfinite(out["val_loss"])
  rows = [r for r in metrics(workdir) if "val_loss/sft" in r]
  assert rows and np.isfinite(rows[-1]["val_loss/sft"])
  saved = checkpoint.Checkpoints(workdir, read_only=True).saved_shapes(6)["params"]
  assert sorted(flatten(saved)) == [
    "blocks/attn/query/kernel/a",
    "blocks/attn/query/kernel/b",
    "blocks/mlp/up/kernel/a",
    "blocks/mlp/up/kernel/b",
  ]
  pkg = str(env["root"] / "lora_pkg")
  export(workdir, pkg)
  loaded = open_model(pkg, dtype="float32")
  merged = open_model(workdir).params  # a LoRA run opens merged into its base
  np.testing.assert_array_equal(
    np.asarray(loaded.params["blocks"]["mlp"]["up"]["kernel"]),
    np.asarray(merged["blocks"]["mlp"]["up"]["kernel"]),
  )
  bad = tmp_path / "bad.jsonl"
  bad.write_text('{"prompt": "x", "response": "y"}\n{"prompt": "no response"}\n')
  with pytest.raises(Exception, match=r"bad.jsonl:2: missing key 'response'"):
    finetune.train(cfg(env, finetune__sft__train_file=str(bad)), str(env["root"] / "sft_bad"))


def test_fine_tuning_a_trained_run_passes_preflight_whatever_the_learning_rate(env):
  """A full first Adam step at a large rate raises a trained model's loss; preflight checks the update's
  direction instead (gradients reach every parameter, a small enough step lowers the loss)."""
  out = finetune.train(
    cfg(
      env,
      train__preflight=True,
      train__learning_rate=1.0,
      train__steps=1,
      train__nan_policy="skip",
      train__eval_every=0,
    ),
    str(env["root"] / "preflight"),
  )
  assert out["status"] == "complete"
  first = metrics(str(env["root"] / "preflight"))[0]
  assert first["step"] == 0 and first["preflight_loss_after"] < first["preflight_loss_before"]
  assert 0 < first["preflight_step_fraction"] < 1  # the full step did not lower the loss; a smaller one did


def test_preflight_names_targets_that_are_not_the_inputs_shifted():
  tokens = np.arange(40, dtype=np.int32).reshape(2, 20)
  preflight.check_shifted({"inputs": tokens[:, :-1], "targets": tokens[:, 1:]})
  with pytest.raises(preflight.PreflightError, match="shifted by one: row 0, position 0"):
    preflight.check_shifted({"inputs": tokens[:, :-1], "targets": tokens[:, :-1]})
  seg = np.array([[1] * 10 + [2] * 9] * 2)  # packed examples: no shift across their boundary
  targets = tokens[:, 1:].copy()
  targets[:, 9] = 0
  preflight.check_shifted({"inputs": tokens[:, :-1], "targets": targets, "segment_ids": seg})
