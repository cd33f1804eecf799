"""Encoders through `python -m llm_jax.train`: a masked-LM run whose loss falls, then classification
from it (init_from) with accuracy, macro-F1 and a confusion matrix in the eval report."""

import json
import os
import random

import pytest

# imported here, so the absl flags of its libraries (grain) outlive each command
from llm_jax.train import loop
from tests.run_cmd import run_command

WORDS = "alpha beta gamma delta value total count index item name data result list text line".split()


def write_corpus(root: str, n_docs: int = 50) -> None:
  rng = random.Random(0)
  os.makedirs(os.path.join(root, "code"), exist_ok=True)
  os.makedirs(os.path.join(root, "prose"), exist_ok=True)
  for i in range(n_docs):
    with open(os.path.join(root, "code", f"f{i}.txt"), "w") as f:
      f.write(
        "\n".join(
          f"def {rng.choice(WORDS)}_{j}(x, n={j}):\n    return x + {rng.randint(0, 9)} * n\n"
          for j in range(rng.randint(4, 8))
        )
      )
    with open(os.path.join(root, "prose", f"p{i}.txt"), "w") as f:
      f.write("The " + " ".join(rng.choice(WORDS) for _ in range(rng.randint(40, 70))) + ".\n")


def write_labelled(path: str, n: int, seed: int) -> None:
  rng = random.Random(seed)
  with open(path, "w") as f:
    for _ in range(n):
      if rng.random() < 0.5:
        text, label = f"def {rng.choice(WORDS)}(x):\n    return x + {rng.randint(0, 9)}\n", "code"
      else:
        text, label = "The " + " ".join(rng.choice(WORDS) for _ in range(8)) + ".", "prose"
      f.write(json.dumps({"text": text, "label": label}) + "\n")


def flags(root, **over) -> list[str]:
  base = {
    "data.corpus": f"{root}/corpus/*/*.txt",
    "data.cache_dir": f"{root}/data_cache",
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
    "train.steps": 40,
    "train.warmup_steps": 2,
    "train.learning_rate": 3e-3,
    "train.eval_every": 20,
    "train.eval_batches": 2,
    "train.checkpoint_every": 40,
    "train.log_every": 10,
    "sharding.data": 8,
  }
  base.update(over)
  return ["--config=configs/bert_tiny.py"] + [f"--config.{k}={v}" for k, v in base.items()]


def rows(workdir: str) -> list[dict]:
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def mlm_run(tmp_path_factory, devices):
  root = tmp_path_factory.mktemp("encoder")
  write_corpus(str(root / "corpus"))
  workdir = str(root / "mlm")
  assert run_command("llm_jax.train", *flags(root), f"--workdir={workdir}") == 0
  assert loop.EXIT_INTERRUPTED != 0
  return root, workdir


def test_mlm_run_loss_falls_and_reports_accuracy(mlm_run):
  _, workdir = mlm_run
  got = rows(workdir)
  losses = [r["loss"] for r in got if "grad_norm" in r]
  assert losses[-1] < losses[0] - 0.5, losses
  evals = [r for r in got if "val_loss" in r]
  assert len(evals) == 2 and evals[-1]["val_loss"] < evals[0]["val_loss"]
  assert all(0.0 <= r["val_mlm_accuracy"] <= 1.0 for r in evals)
  with open(os.path.join(workdir, "config.json")) as f:
    config = json.load(f)
  assert config["model"]["causal"] is False and config["data"]["tokenizer"]["encoder_pieces"] is True


def test_classify_from_the_mlm_run(mlm_run):
  root, source = mlm_run
  write_labelled(str(root / "train.jsonl"), 96, 0)
  write_labelled(str(root / "val.jsonl"), 40, 1)
  workdir = str(root / "cls")
  code = run_command(
    "llm_jax.train",
    *flags(
      root,
      **{
        "encoder.task": "classify",
        "encoder.train_file": root / "train.jsonl",
        "encoder.val_file": root / "val.jsonl",
        "init_from": source,
        "reuse_source_tokenizer": True,
        "train.steps": 30,
        "train.eval_every": 30,
        "train.checkpoint_every": 30,
      },
    ),
    f"--workdir={workdir}",
  )
  assert code == 0
  with open(os.path.join(workdir, "eval", "classify-30", "results.json")) as f:
    res = json.load(f)
  assert res["labels"] == ["code", "prose"] and res["examples"] == 40
  assert res["accuracy"] > res["majority_baseline"] + 0.2, res
  assert "Confusion matrix" in open(os.path.join(workdir, "eval", "classify-30", "report.md")).read()
  assert rows(workdir)[-1]["val_accuracy"] == res["accuracy"]
  assert run_command("llm_jax.evaluate", f"--workdir={workdir}") == 1  # refused: its report is above


def test_evaluate_an_encoder_run(mlm_run, tmp_path):
  """evaluate scores an encoder by its masked-LM (the same masks as the loop's evaluation, so the same
  figures) and by pseudo-perplexity over a capped number of windows; no next-token table, no suite."""
  _, workdir = mlm_run
  out = tmp_path / "eval"
  assert (
    run_command(
      "llm_jax.evaluate",
      f"--workdir={workdir}",
      "--batch_size=8",
      "--max_windows=16",
      "--pll_windows=2",
      f"--out={out}",
    )
    == 0
  )
  with open(out / "results.json") as f:
    res = json.load(f)
  last = [r for r in rows(workdir) if "val_loss" in r][-1]
  masked = res["masked_lm"]["overall"]
  assert masked["tokens"] > 0 and res["masked_lm"]["windows"] == 16
  assert abs(masked["accuracy"] - last["val_mlm_accuracy"]) < 1e-6, (masked, last)
  assert abs(masked["loss"] - last["val_loss"]) < 1e-3, (masked, last)
  pll = res["heldout"]["overall"]
  assert res["meta"]["windows"] == 2 and 0 < pll["tokens"] <= 2 * 32
  assert 1.0 < pll["perplexity"] < 384 and 0.0 <= pll["accuracy"] <= 1.0
  assert "suite" not in res and "generations" not in res
  assert "pseudo-log-likelihood" in (out / "report.md").read_text()
