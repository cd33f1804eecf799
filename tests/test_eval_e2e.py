"""End to end: a run directory as training writes it, then `python -m llm_jax.evaluate` (table,
results.json, report.md with PNGs), --compare, --corpus, and the bad-input messages.

The run directory is built with the training loop's own pieces (loop.build, run_dir.write, Checkpoints)
holding two randomly initialized checkpoints, so the test does not pay for compiling a train step."""

import json
import os

import jax
import pytest
from run_cmd import run_command


def _corpus(root):
  words = ["value", "return", "statement", "object", "function", "class", "loop", "module", "error"]
  for i in range(14):
    d = root / "docs"
    d.mkdir(parents=True, exist_ok=True)
    w = [words[(i * k + 3) % len(words)] for k in range(1, 7)]
    (d / f"doc{i}.txt").write_text(
      f"The {w[0]} {i} is used for the {w[1]} of a {w[2]}.\nA {w[3]} holds the {w[4]} and the {w[5]}.\n" * 3
    )
    c = root / "code"
    c.mkdir(parents=True, exist_ok=True)
    (c / f"mod{i}.txt").write_text(
      f"def {w[0]}_{i}(self, {w[1]}):\n    if {w[1]} is None:\n        return self.{w[2]}\n"
      f"    return {w[3]} + {i}\n" * 3
    )
  return str(root / "*" / "*.txt")


def _config(corpus, cache, vocab=300):
  from configs import base

  c = base.get_config()
  d, m, t = c.data, c.model, c.train
  d.corpus, d.val_fraction, d.cache_dir, d.near_dup_threshold = corpus, 0.3, cache, 0.0
  d.min_doc_chars, d.num_workers = 16, 1
  d.tokenizer.vocab_size = vocab
  m.num_layers, m.d_model, m.num_heads, m.max_seq_len = 1, 32, 2, 16
  t.seq_len, t.global_batch_size, t.steps, t.warmup_steps = 16, 8, 4, 1
  t.eval_every, t.eval_batches, t.checkpoint_every, t.sample_every, t.log_every = 2, 1, 2, 0, 1
  t.preflight = False
  return c


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  from llm_jax.train import checkpoint, loop, run_dir, state

  root = tmp_path_factory.mktemp("e2e")
  corpus = _corpus(root / "corpus")
  workdir = str(root / "run")
  setup = loop.build(_config(corpus, str(root / "cache")))
  run_dir.write(workdir, setup.config, setup.prepared, start_step=0, argv=["test"])
  ckpts = checkpoint.Checkpoints(workdir, async_save=False)
  st, _ = state.create_state(setup.model, setup.optimizer, setup.mesh, setup.config, 0)
  ckpts.save(2, st, {"step": 2})
  st = st.replace(params=jax.tree.map(lambda x: x * 1.5, st.params))  # another model at step 4
  ckpts.save(4, st, {"step": 4})
  ckpts.close()
  with open(os.path.join(workdir, "metrics.jsonl"), "w") as f:
    for step in range(0, 5):
      f.write(json.dumps({"step": step, "loss": 6.0 - 0.1 * step}) + "\n")
    f.write(json.dumps({"step": 4, "val_loss": 5.7, "val_loss/code": 5.6, "val_loss/docs": 5.8}) + "\n")
  return {"root": root, "corpus": corpus, "workdir": workdir}


def test_evaluate_prints_table_and_writes_report(run, capsys):
  wd = run["workdir"]
  assert run_command("llm_jax.evaluate", f"--workdir={wd}", "--batch_size=3") == 0
  out = capsys.readouterr().out
  assert "all (micro)" in out and "  code" in out and "  docs" in out and "ECE" in out
  assert "multiple choice" in out and "greedy match" in out
  ev = os.path.join(wd, "eval", "4")
  res = json.load(open(os.path.join(ev, "results.json")))
  assert res["meta"]["step"] == 4 and set(res["heldout"]["domains"]) == {"code", "docs"}
  ov = res["heldout"]["overall"]
  assert ov["loss_se"] > 0 and ov["bits_per_byte"] > 0 and 0 <= ov["ece"] <= 1
  assert len(ov["reliability"]["count"]) == 15 and sum(ov["reliability"]["count"]) == ov["tokens"]
  assert len(res["generations"]["samples"]) >= 3
  report = open(os.path.join(ev, "report.md")).read()
  for png in ("loss_by_domain.png", "reliability.png", "training_curve.png"):
    with open(os.path.join(ev, png), "rb") as f:
      assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert f"]({png})" in report
  assert "| docs |" in report and "## Frozen suite" in report and "## Samples" in report
  # The same numbers at another eval batch size (8 fake devices: rows are padded to the mesh).
  assert (
    run_command("llm_jax.evaluate", f"--workdir={wd}", "--batch_size=8", "--suite=none", f"--out={ev}-b8")
    == 0
  )
  res8 = json.load(open(os.path.join(ev + "-b8", "results.json")))
  for key in ("loss", "bits_per_byte", "ece", "mean_rank"):
    assert res8["heldout"]["overall"][key] == pytest.approx(ov[key], rel=1e-6)


def test_compare_two_steps(run, capsys):
  wd = run["workdir"]
  assert run_command("llm_jax.evaluate", f"--workdir={wd}", "--step=2", "--suite=none") == 0
  if not os.path.exists(os.path.join(wd, "eval", "4", "results.json")):
    assert run_command("llm_jax.evaluate", f"--workdir={wd}", "--suite=none") == 0
  capsys.readouterr()
  assert run_command("llm_jax.evaluate", f"--compare={os.path.join(wd, 'eval', '2')},{wd}") == 0
  out = capsys.readouterr().out
  assert "[A] step 2" in out and "[B] step 4" in out and "all/loss" in out and "B-A" in out
  assert "standard error" in out


def test_corpus_glob_scored_with_run_tokenizer(run, capsys):
  wd = run["workdir"]
  assert (
    run_command(
      "llm_jax.evaluate", f"--workdir={wd}", f"--corpus={run['corpus']}", "--suite=none", "--max_windows=6"
    )
    == 0
  )
  res_dir = [d for d in os.listdir(os.path.join(wd, "eval", "4")) if d.startswith("corpus-")]
  res = json.load(open(os.path.join(wd, "eval", "4", res_dir[0], "results.json")))
  assert res["meta"]["windows"] == 6 and res["heldout"]["overall"]["tokens"] == 6 * 16


def test_bad_inputs_have_clear_messages(run, tmp_path, capsys):
  wd = run["workdir"]
  # A step that does not exist.
  assert run_command("llm_jax.evaluate", f"--workdir={wd}", "--step=3") == 1
  err = capsys.readouterr().err
  assert "step 3" in err and "[2, 4]" in err
  # A workdir without checkpoints.
  empty = tmp_path / "empty"
  empty.mkdir()
  (empty / "config.json").write_text(open(os.path.join(wd, "config.json")).read())
  assert run_command("llm_jax.evaluate", f"--workdir={empty}") == 1
  assert "no checkpoints/" in capsys.readouterr().err
  # A prepared corpus made with another tokenizer.
  from llm_jax.data import prepare

  other = prepare.prepare(_config(run["corpus"], str(tmp_path / "cache2"), vocab=320))
  assert run_command("llm_jax.evaluate", f"--workdir={wd}", f"--corpus={other.dir}", "--suite=none") == 1
  err = capsys.readouterr().err
  assert "manifest.json: tokenizer.sha256" in err and "another tokenizer" in err
  # A split the data does not have (data.val_fraction=0 holds out no 'val'): says what to pass instead.
  assert run_command("llm_jax.evaluate", f"--workdir={wd}", "--split=test", "--suite=none") == 1
  err = capsys.readouterr().err
  assert "'test'" in err and "['train', 'val']" in err and "--corpus" in err and "--split" in err, err
  # A malformed eval line.
  bad = tmp_path / "bad.jsonl"
  bad.write_text('{"id": "x", "type": "choice", "prompt": "p", "choices": ["a", "b"], "answer": "a"}\n')
  assert run_command("llm_jax.evaluate", f"--workdir={wd}", f"--suite={bad}", "--max_windows=1") == 1
  assert f"{bad}:1: key 'answer'" in capsys.readouterr().err
  # A corpus with a bad record: named, with advice evaluate's user can follow (it advised
  # data.on_bad_record, a key evaluate does not take).
  (tmp_path / "held.jsonl").write_text('{"text": "fine"}\n{"text": 5}\n')
  assert run_command("llm_jax.evaluate", f"--workdir={wd}", f"--corpus={tmp_path / 'held.jsonl'}") == 1
  err = capsys.readouterr().err
  assert "held.jsonl:2" in err and "fix or remove that record" in err and "on_bad_record" not in err, err
  # --compare of a run never evaluated.
  assert run_command("llm_jax.evaluate", f"--compare={wd},{empty}") == 1
  assert "has no evaluation results" in capsys.readouterr().err


def test_exported_package_is_scorable(run, tmp_path, capsys):
  from llm_jax.artifacts.export import export

  pkg = str(tmp_path / "pkg")
  export(run["workdir"], pkg, step=4)
  assert run_command("llm_jax.evaluate", f"--package={pkg}", "--suite=none") == 1
  assert "pass --corpus" in capsys.readouterr().err
  common = [f"--corpus={run['corpus']}", "--suite=none", "--seq_len=16", "--max_windows=6"]
  assert run_command("llm_jax.evaluate", f"--package={pkg}", f"--out={tmp_path / 'p'}", *common) == 0
  assert "step 4" in capsys.readouterr().out
  assert (
    run_command("llm_jax.evaluate", f"--workdir={run['workdir']}", f"--out={tmp_path / 'w'}", *common) == 0
  )
  p = json.load(open(tmp_path / "p" / "results.json"))
  w = json.load(open(tmp_path / "w" / "results.json"))
  assert p["meta"]["kind"] == "package" and w["meta"]["kind"] == "run"
  assert p["heldout"]["overall"]["loss"] == pytest.approx(w["heldout"]["overall"]["loss"], rel=1e-5)
