"""The training loop end to end on a tiny corpus: determinism, exact resume, budget raise, another mesh,
NaN policies, shape and corruption errors, metrics files. Runs share one XLA compilation cache."""

import glob
import json
import os
import random
import shutil
import signal
import struct

import jax
import numpy as np
import pytest

from llm_jax import config as config_lib
from llm_jax.artifacts import open_model
from llm_jax.data.shards import file_sha256
from llm_jax.generate import samples
from llm_jax.train import checkpoint as ckpt_lib
from llm_jax.train import loop, run_dir
from llm_jax.train import metrics as metrics_lib

WORDS = (
  "alpha beta gamma delta value total count index item name data result list text line word "
  "self other key path size"
).split()


def write_corpus(root: str, n_docs: int = 80, seed: int = 0) -> None:
  """Python-like and prose-like .txt documents under root/code and root/prose (two domains)."""
  rng = random.Random(seed)
  for dom in ("code", "prose"):
    os.makedirs(os.path.join(root, dom), exist_ok=True)
  for i in range(n_docs):
    lines = []
    for j in range(rng.randint(4, 9)):
      a, b, c = rng.sample(WORDS, 3)
      lines.append(f"def {a}_{b}_{i}_{j}({c}, n={j}):\n    return {c} + {rng.randint(0, 99)} * n\n")
    with open(os.path.join(root, "code", f"f{i}.txt"), "w") as f:
      f.write("\n".join(lines))
    sent = " ".join(rng.choice(WORDS) for _ in range(rng.randint(40, 80)))
    with open(os.path.join(root, "prose", f"p{i}.txt"), "w") as f:
      f.write(f"The {sent}.\nA {rng.choice(WORDS)} of {i} words.\n")


def overrides(corpus: str, cache: str) -> dict:
  return {
    "data.corpus": f"{corpus}/*/*.txt",
    "data.cache_dir": cache,
    "data.tokenizer.vocab_size": 384,
    "data.val_fraction": 0.15,
    "data.near_dup_threshold": 0.0,
    "model.d_model": 32,
    "model.num_heads": 2,
    "model.num_layers": 1,
    "model.max_seq_len": 32,
    "model.vocab_multiple": 64,
    "train.seq_len": 32,
    "train.global_batch_size": 8,
    "train.steps": 16,
    "train.decay_steps": 16,
    "train.warmup_steps": 2,
    "train.learning_rate": 3e-3,
    "train.eval_every": 8,
    "train.eval_batches": 2,
    "train.checkpoint_every": 4,
    "train.keep_checkpoints": 10,
    "train.sample_every": 0,
    "train.log_every": 1,
    "train.preflight": False,
  }


@pytest.fixture(scope="module")
def env(tmp_path_factory, devices):
  """Corpus, data cache and a shared XLA compilation cache for every run of this module."""
  root = tmp_path_factory.mktemp("loop")
  write_corpus(str(root / "corpus"))
  old = jax.config.jax_compilation_cache_dir
  jax.config.update("jax_compilation_cache_dir", str(root / "xla_cache"))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
  yield {"root": root, "over": overrides(str(root / "corpus"), str(root / "data_cache"))}
  jax.config.update("jax_compilation_cache_dir", old)


def cfg(env, **extra):
  over = dict(env["over"])
  over.update({k.replace("__", "."): v for k, v in extra.items()})
  return config_lib.load("configs/base.py", over)


class Hook:
  """Adds loss weights to every batch (NaN at `poison` steps) and sends SIGTERM at `sigterm_at`."""

  def __init__(self, poison=(), sigterm_at=None):
    self.poison, self.sigterm_at = set(poison), sigterm_at

  def __call__(self, step, batch):
    w = np.ones(batch["targets"].shape, np.float32)
    if step in self.poison:
      w[0, 0] = np.nan
    if step == self.sigterm_at:
      os.kill(os.getpid(), signal.SIGTERM)
    return {**batch, "weights": w}


def rows(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def losses(workdir):
  return {r["step"]: (r["loss"], r["grad_norm"]) for r in rows(workdir) if r["step"] > 0}


@pytest.fixture(scope="module")
def reference(env):
  """An uninterrupted 16-step run with preflight, sampling, a profile trace and evaluation on the
  whole val split (both domains)."""
  workdir = str(env["root"] / "ref")
  summary = loop.train(
    cfg(
      env,
      train__preflight=True,
      train__sample_every=8,
      train__eval_batches=0,
      train__sample_tokens=6,
      train__profile_steps="2,4",
    ),
    workdir,
    batch_hook=Hook(),
    make_sampler=samples.for_training,
  )
  assert summary["status"] == "complete" and summary["step"] == 16
  return workdir


def test_fresh_runs_are_bitwise_equal_and_resume_is_exact(env, reference):
  workdir = str(env["root"] / "interrupted")
  first = loop.train(cfg(env), workdir, batch_hook=Hook(sigterm_at=5))
  assert first["status"] == "stopped by SIGTERM" and first["step"] == 6
  assert ckpt_lib.Checkpoints(workdir).steps() == [4, 6]  # the signal saved step 6
  ref = losses(reference)
  part = losses(workdir)
  assert sorted(part) == list(range(1, 7))
  assert all(part[s] == ref[s] for s in part), "two fresh runs with one seed differ"
  second = loop.train(cfg(env), workdir, batch_hook=Hook())
  assert second["status"] == "complete" and second["step"] == 16
  assert losses(workdir) == ref  # bitwise, every step
  record = json.load(open(os.path.join(workdir, "run.json")))
  assert [s["start_step"] for s in record["sessions"]] == [0, 6]


def test_budget_raise_continues_on_another_mesh(env, reference):
  workdir = str(env["root"] / "budget")
  assert loop.train(cfg(env, train__steps=10), workdir, batch_hook=Hook())["step"] == 10
  again = loop.train(cfg(env, train__steps=10), workdir, batch_hook=Hook())
  assert again["status"] == "complete" and again["step"] == 10  # nothing left to do
  mesh = dict(sharding__data=2, sharding__fsdp=2, sharding__tensor=2)
  out = loop.train(cfg(env, train__steps=16, **mesh), workdir, batch_hook=Hook())
  assert out["step"] == 16
  got, ref = losses(workdir), losses(reference)
  assert sorted(got) == list(range(1, 17))
  for s in range(1, 11):
    assert got[s] == ref[s]
  np.testing.assert_allclose(
    [got[s][0] for s in range(11, 17)], [ref[s][0] for s in range(11, 17)], rtol=2e-5
  )


def test_nan_abort_names_step_and_keeps_last_checkpoint(env):
  workdir = str(env["root"] / "nan_abort")
  with pytest.raises(loop.TrainingError, match=r"step 6 .*nan_policy=abort.*step 4"):
    loop.train(cfg(env, train__nan_policy="abort"), workdir, batch_hook=Hook(poison={5}))
  assert ckpt_lib.Checkpoints(workdir).steps() == [4]


def test_nan_skip_counts_and_aborts_after_max_in_a_row(env):
  workdir = str(env["root"] / "nan_skip")
  out = loop.train(
    cfg(env, train__nan_policy="skip", train__steps=8), workdir, batch_hook=Hook(poison={4, 5})
  )
  assert out["status"] == "complete" and out["skipped_steps"] == 2
  r = {row["step"]: row for row in rows(workdir) if row["step"] > 0}
  assert np.isnan(r[5]["loss"]) and np.isnan(r[6]["loss"])
  assert r[5]["param_norm"] == r[4]["param_norm"] == r[6]["param_norm"]  # parameters unchanged
  assert r[7]["param_norm"] != r[6]["param_norm"] and r[8]["skipped_steps"] == 2
  with pytest.raises(loop.TrainingError, match=r"3 non-finite steps in a row"):
    loop.train(
      cfg(env, train__nan_policy="skip", train__max_consecutive_skips=3, train__steps=8),
      str(env["root"] / "nan_skip3"),
      batch_hook=Hook(poison={2, 3, 4}),
    )


def test_changed_model_shape_lists_keys(env, reference):
  with pytest.raises(run_dir.RunDirError) as e:
    loop.train(cfg(env, model__d_model=64, train__steps=20), reference)
  assert "model.d_model" in str(e.value) and "model.mlp_dim" in str(e.value)
  assert "model.num_layers" not in str(e.value)


def _break_checkpoint(workdir, step):
  for path in glob.glob(os.path.join(workdir, "checkpoints", str(step), "state", "**", "*"), recursive=True):
    if os.path.isfile(path):
      with open(path, "wb") as f:
        f.write(b"\x00broken")


def test_corrupt_latest_checkpoint_is_moved_aside_and_saved_again(env, reference):
  workdir = str(env["root"] / "corrupt")
  shutil.copytree(reference, workdir)
  _break_checkpoint(workdir, 16)
  with pytest.raises(ckpt_lib.CheckpointError, match=r"step 16.*restore_fallback.*step 12") as e:
    loop.train(cfg(env, train__steps=20, train__decay_steps=20), workdir, batch_hook=Hook())
  assert "\n" not in str(e.value) and len(str(e.value)) < 400, str(e.value)  # one line, no dump
  out = loop.train(
    cfg(env, train__steps=20, train__decay_steps=20, train__restore_fallback=True, train__keep_checkpoints=2),
    workdir,
    batch_hook=Hook(),
  )
  assert out["step"] == 20
  assert os.path.isdir(os.path.join(workdir, "checkpoints", "corrupt", "16"))
  record = json.load(open(os.path.join(workdir, "run.json")))
  assert record["sessions"][-1]["start_step"] == 12  # where the session really started
  assert [r["step"] for r in rows(workdir)][-8:] == list(range(13, 21))  # re-trained from 12
  steps = ckpt_lib.Checkpoints(workdir).steps()
  assert 16 in steps and steps[-1] == 20  # step 16 saved again; the corrupt one is not counted
  assert open_model(workdir, step=16).step == 16  # ... and it reads


def test_failed_resume_changes_nothing_in_the_run_directory(env, reference):
  workdir = str(env["root"] / "unchanged")
  shutil.copytree(reference, workdir)
  names = ("config.json", "run.json", "metrics.jsonl", "manifest.json", "tokenizer.model")
  before = {n: open(os.path.join(workdir, n), "rb").read() for n in names}
  tb_before = sorted(os.listdir(os.path.join(workdir, "tb")))
  for change in (dict(data__seed=5), dict(train__global_batch_size=16)):
    with pytest.raises(Exception, match="seed|global_batch_size"):
      loop.train(cfg(env, train__steps=20, train__decay_steps=20, **change), workdir, batch_hook=Hook())
    for n in names:
      assert open(os.path.join(workdir, n), "rb").read() == before[n], (change, n)
    assert sorted(os.listdir(os.path.join(workdir, "tb"))) == tb_before


def test_resume_after_the_corpus_changed_names_the_files(env):
  """Same config, but a corpus file edited since the run started: the data (and its tokenizer) differ,
  and the refusal names the changed file instead of saying that no data.* key changed."""
  corpus = env["root"] / "corpus_edited"
  shutil.copytree(env["root"] / "corpus", corpus)
  workdir = str(env["root"] / "edited")
  c = dict(data__corpus=f"{corpus}/*/*.txt", train__eval_every=0, train__steps=4, train__decay_steps=4)
  assert loop.train(cfg(env, **c), workdir)["status"] == "complete"
  with open(corpus / "prose" / "p3.txt", "a") as f:
    f.write("zebra quokka " * 40 + "\n")
  c.update(train__steps=8, train__decay_steps=8)
  with pytest.raises(run_dir.RunDirError) as e:
    loop.train(cfg(env, **c), workdir)
  assert "p3.txt" in str(e.value) and "changed" in str(e.value), str(e.value)


def test_a_workdir_that_is_a_file_fails_first(env, tmp_path):
  path = tmp_path / "not_a_dir"
  path.write_text("x")
  with pytest.raises(run_dir.RunDirError, match="not_a_dir.*not a directory"):
    loop.train(cfg(env), str(path))
  assert path.read_text() == "x"


def test_an_unreadable_config_json_is_named_on_resume(tmp_path):
  """A run directory whose config.json is cut short (or not a JSON object) stops the resume with a
  message naming that file, not a bare JSON error with a line and column of no file."""
  for text in ('{"model": {"d_model": 3', "[1, 2]"):
    (tmp_path / "config.json").write_text(text)
    with pytest.raises(run_dir.RunDirError, match="config.json"):
      run_dir.saved_config(str(tmp_path))


class Scramble:
  """Random targets from step `after` on: the model unlearns, so the validation loss rises."""

  def __init__(self, after):
    self.after = after

  def __call__(self, step, batch):
    if step < self.after:
      return batch
    rng = np.random.default_rng(step)
    return {**batch, "targets": rng.integers(0, 384, batch["targets"].shape).astype(np.int32)}


def test_keep_best_and_early_stop(env):
  """The best-val-loss checkpoint outlives keep-last-1 retention, --step=best opens it, run.json and the
  summary name it, and train.early_stop_patience ends the run after evaluations without improvement."""
  workdir = str(env["root"] / "best")
  out = loop.train(
    cfg(
      env,
      train__learning_rate=1e-2,
      train__eval_every=2,
      train__checkpoint_every=100,
      train__keep_checkpoints=1,
      train__early_stop_patience=2,
    ),
    workdir,
    batch_hook=Scramble(after=6),
  )
  vals = {r["step"]: r["val_loss"] for r in rows(workdir) if "val_loss" in r}
  best = min(vals, key=vals.get)
  assert out["status"] == "early stop" and out["step"] == best + 4 < 16, (out, vals)
  assert out["best_step"] == best and out["best_val_loss"] == pytest.approx(vals[best])
  assert ckpt_lib.Checkpoints(workdir).steps() == [best, best + 4]  # keep 1 + the best
  assert ckpt_lib.Checkpoints(workdir).best_step() == best
  assert json.load(open(os.path.join(workdir, "run.json")))["best"]["step"] == best
  assert open_model(workdir, step="best").step == best


def test_val_fraction_zero_trains_without_evaluation(env):
  """data.val_fraction=0 prepares no val split: the run trains to the end with evaluation switched on,
  logs no validation figures and keeps no best checkpoint."""
  workdir = str(env["root"] / "no_val")
  out = loop.train(
    cfg(
      env,
      data__val_fraction=0.0,
      train__steps=4,
      train__decay_steps=4,
      train__eval_every=2,
      train__checkpoint_every=2,
    ),
    workdir,
  )
  assert out["status"] == "complete" and out["step"] == 4, out
  assert out.get("best_step") is None and not out.get("val_loss")
  assert not [r for r in rows(workdir) if any(k.startswith("val_") for k in r)]
  assert ckpt_lib.Checkpoints(workdir).steps() == [2, 4]
  assert ckpt_lib.Checkpoints(workdir).best_step() is None


def _tb_tags(tb_dir):
  """{tag: number of events} from tensorboardX event files (TFRecord framing, Event protos)."""
  from tensorboardX.proto import event_pb2

  tags = {}
  for path in glob.glob(os.path.join(tb_dir, "events.out.tfevents.*")):
    with open(path, "rb") as f:
      data = f.read()
    pos = 0
    while pos + 12 <= len(data):
      (n,) = struct.unpack("<Q", data[pos : pos + 8])
      event = event_pb2.Event.FromString(data[pos + 12 : pos + 12 + n])
      pos += 12 + n + 4
      for v in event.summary.value:
        tags[v.tag] = tags.get(v.tag, 0) + 1
  return tags


def test_run_directory_and_metrics(env, reference):
  files = set(os.listdir(reference))
  assert {
    "config.json",
    "tokenizer.model",
    "manifest.json",
    "run.json",
    "metrics.jsonl",
    "tb",
    "checkpoints",
  } <= files
  config = config_lib.from_json(os.path.join(reference, "config.json"))
  assert config.model.vocab_size == 384  # resolved from the tokenizer, padded to 64
  record = json.load(open(os.path.join(reference, "run.json")))
  assert record["tokenizer_sha256"] == file_sha256(os.path.join(reference, "tokenizer.model"))
  assert record["manifest_sha256"] == file_sha256(os.path.join(reference, "manifest.json"))
  for key in ("git", "packages", "command", "seeds", "start_time", "devices", "run_tag", "run_note"):
    assert key in record, key
  assert record["packages"]["jax"] == jax.__version__
  table = rows(reference)
  assert all("step" in r and "loss" in r for r in table)
  assert [r["step"] for r in table] == list(range(0, 17))  # preflight row, then every step
  assert table[0]["preflight_loss_after"] < table[0]["preflight_loss_before"]
  last = table[-1]
  domains = [k for k in last if k.startswith("val_loss/")]
  assert "val_loss" in last and domains and "samples" in last and len(last["samples"]) == 3
  assert "val_bpb" in last and {f"val_bpb/{k.split('/')[1]}" for k in domains} <= set(last)
  assert last["samples"][0].startswith("def ")
  tags = _tb_tags(os.path.join(reference, "tb"))
  for tag in (
    "train/loss",
    "train/lr",
    "train/grad_norm",
    "train/param_norm",
    "train/skipped_steps",
    "perf/tokens_per_s",
    "perf/step_time_s",
    "perf/data_wait_s",
    "val/loss",
    "val/perplexity",
    "samples/text_summary",
    "preflight/loss_before",
    "preflight/loss_after",
  ):
    assert tags.get(tag), (tag, sorted(tags))
  assert tags["train/loss"] == 17 and tags["val/loss"] == 2
  assert any(t.startswith("val/loss/") for t in tags)
  assert tags.get("val/bits_per_byte") == 2
  assert tags.get("val/bits_per_byte/code") == 2 and tags.get("val/bits_per_byte/prose") == 2
  assert glob.glob(os.path.join(reference, "tb", "plugins", "profile", "*", "*.xplane.pb"))


def test_val_bpb_equals_the_evaluation_metrics(env, reference):
  """The loop's val_bpb (overall, per domain) at step 16 equals llm_jax.eval.metrics on the same windows."""
  from llm_jax import sharding as sharding_lib
  from llm_jax.data import loader as loader_lib
  from llm_jax.data import prepare as prepare_lib
  from llm_jax.data.tokenizer import Tokenizer
  from llm_jax.eval import scoring
  from llm_jax.model import Decoder, ModelConfig

  config = cfg(env)
  prepared = prepare_lib.prepare(config)
  mesh = sharding_lib.make_mesh(config)
  opened = open_model(reference, mesh=mesh)
  params, saved, step = opened.params, opened.config, opened.step
  assert step == 16
  tok = Tokenizer.load(os.path.join(reference, "tokenizer.model"))
  scorer = scoring.Scorer(Decoder(ModelConfig.from_config(saved)), params, saved, mesh, tok.token_bytes())
  batches = loader_lib.eval_batches(prepared.dir, "val", 32, 8)  # train.eval_batches=0: all
  result = scorer.accumulate(batches, prepared.domains).result()
  last = rows(reference)[-1]
  assert last["step"] == 16
  assert last["val_bpb"] == pytest.approx(result["overall"]["bits_per_byte"], rel=1e-6)
  assert last["val_loss"] == pytest.approx(result["overall"]["loss"], rel=1e-6)
  assert set(result["domains"]) == {"code", "prose"}
  for name, r in result["domains"].items():
    assert last[f"val_bpb/{name}"] == pytest.approx(r["bits_per_byte"], rel=1e-6), name


def test_alerts_and_mfu():
  class FakeWriter:
    enabled = False
    alerts = []

    def alert(self, step, kind, message):
      self.alerts.append((step, kind))

  w = FakeWriter()
  a = metrics_lib.Alerts(w, throughput_share=0.5, plateau_evals=2)
  for s in range(12):
    assert not a.throughput(s, 1000.0 + s)
  assert a.throughput(12, 400.0) and w.alerts[-1] == (12, "throughput")
  assert not a.val_loss(1, 3.0) and not a.val_loss(2, 3.1) and a.val_loss(3, 3.2)
  assert w.alerts[-1] == (3, "plateau")
  assert metrics_lib.peak_flops("NVIDIA H100 80GB HBM3", "gpu") == 989e12
  assert metrics_lib.peak_flops("NVIDIA H200", "gpu") == 989e12
  assert metrics_lib.peak_flops("cpu", "cpu") is None
  assert metrics_lib.mfu(6e9, 1000.0, 2, 1e12) == pytest.approx(3.0)


@pytest.fixture(scope="module")
def char_run(env):
  """A short run on a char tokenizer (~300 pieces with byte fallback) padded to 384 model rows,
  sampling every 2 steps."""
  workdir = str(env["root"] / "char")
  out = loop.train(
    cfg(
      env,
      data__tokenizer__type="char",
      data__tokenizer__character_coverage=1.0,
      model__vocab_multiple=128,
      train__steps=4,
      train__decay_steps=4,
      train__sample_every=2,
      train__sample_tokens=12,
      train__eval_every=0,
      train__checkpoint_every=4,
    ),
    workdir,
    make_sampler=samples.for_training,
  )
  assert out["status"] == "complete" and out["step"] == 4
  return workdir


def test_sampling_with_a_char_tokenizer_and_padded_vocab(char_run):
  from llm_jax.data.tokenizer import Tokenizer

  tok = Tokenizer.load(os.path.join(char_run, "tokenizer.model"))
  config = config_lib.from_json(os.path.join(char_run, "config.json"))
  assert tok.vocab_size < config.model.vocab_size == 384  # padding rows exist
  sampled = {r["step"]: r["samples"] for r in rows(char_run) if "samples" in r}
  assert sorted(sampled) == [2, 4]
  for texts in sampled.values():
    assert len(texts) == 3 and texts[0].startswith("def ") and texts[2].startswith("The ")


def test_sampler_never_draws_padding_ids(char_run):
  """Padding rows scaled up so that they win the softmax: the sampler still keeps to real ids."""
  from llm_jax.data.tokenizer import Tokenizer
  from llm_jax.model import Decoder, ModelConfig

  tok = Tokenizer.load(os.path.join(char_run, "tokenizer.model"))
  opened = open_model(char_run)
  params, config = opened.params, opened.config
  model_cfg = ModelConfig.from_config(config)
  emb = np.asarray(params["embedding"]).copy()
  emb[tok.vocab_size :] *= 1e3
  rigged = {**params, "embedding": jax.numpy.asarray(emb)}
  prompt = [tok.eos_id] + tok.encode("def ")
  logits = Decoder(model_cfg).apply({"params": rigged}, np.asarray([prompt], np.int32))
  assert int(np.argmax(logits[0, -1])) >= tok.vocab_size  # unmasked, a padding id would win
  sampler = samples.Sampler(model_cfg, tok, ["def ", "The "], 8, seed=3)
  ids = sampler.sample_ids(rigged)
  assert len(ids) == 2 and all(0 <= i < tok.vocab_size for row in ids for i in row)
  assert sampler.sample_ids(rigged) == ids  # fixed seed: the same draws again
  assert sampler._fn._cache_size() == 1  # compiled once, reused
  texts = sampler(rigged)
  assert texts[0].startswith("def ") and texts[1].startswith("The ")
