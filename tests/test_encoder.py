"""Encoders: masking statistics, bidirectional attention, encoder pieces, classification, mesh equivalence."""

import functools
import types

import jax
import numpy as np
import pytest

from llm_jax import config as config_lib
from llm_jax import sharding
from llm_jax.data import tokenizer as tok_lib
from llm_jax.data.errors import DataError
from llm_jax.data.prepare import key as key_lib
from llm_jax.encoder import examples, labelled, masking
from llm_jax.encoder.classifier import Classifier
from llm_jax.eval import bias_scoring, scoring
from llm_jax.model import Decoder, ModelConfig
from llm_jax.train import optimizer as optimizer_lib
from llm_jax.train import state as state_lib
from llm_jax.train import step as step_lib

BASE = [
  "model.num_layers=2",
  "model.d_model=32",
  "model.num_heads=4",
  "model.max_seq_len=16",
  "train.seq_len=16",
  "train.global_batch_size=8",
  "train.warmup_steps=0",
  "train.learning_rate=0.01",
  "model.causal=False",
  "train.sample_every=0",
]
SPEC = masking.MaskSpec(mask_id=4, cls_id=5, sep_id=6, vocab_size=100, seed=3)


def load(overrides=()):
  return config_lib.load("configs/bert_tiny.py", BASE + list(overrides))


def test_masking_statistics_and_determinism():
  tokens = np.random.default_rng(0).integers(7, 100, (64, 129)).astype(np.int32)
  tokens[:, 100:] = 0  # padding is never chosen
  batch = masking.mlm_batch({"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}, SPEC, 1, step=5)
  chosen = batch["weights"] > 0
  eligible = np.zeros_like(chosen)
  eligible[:, 1:100] = True
  assert not chosen[~eligible].any()
  assert (batch["targets"][:, 0] == SPEC.cls_id).all()
  np.testing.assert_array_equal(batch["targets"][:, 1:], tokens[:, 1:-1])
  rate = chosen.sum() / eligible.sum()
  assert 0.13 < rate < 0.17, rate
  inp, orig = batch["inputs"][chosen], batch["targets"][chosen]
  masked, kept = (inp == SPEC.mask_id).mean(), (inp == orig).mean()
  assert 0.76 < masked < 0.84, masked
  assert 0.07 < kept < 0.14, kept  # 10% kept plus the random draws that hit the original
  assert ((inp >= SPEC.first_ordinary) | (inp == SPEC.mask_id)).all()
  np.testing.assert_array_equal(batch["inputs"][~chosen], batch["targets"][~chosen])
  again = masking.mlm_batch({"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}, SPEC, 1, step=5)
  np.testing.assert_array_equal(again["inputs"], batch["inputs"])
  other = masking.mlm_batch({"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}, SPEC, 1, step=6)
  assert (other["weights"] != batch["weights"]).any()
  # Rows 32.. of the batch as a second process sees them: the same masks as in the global batch.
  half = masking.mlm_batch({"inputs": tokens[32:, :-1], "targets": tokens[32:, 1:]}, SPEC, 1, 5, first_row=32)
  np.testing.assert_array_equal(half["inputs"], batch["inputs"][32:])


def test_encoder_attends_both_ways_decoder_does_not():
  c = load()
  tokens = np.random.default_rng(1).integers(7, 100, (2, 16)).astype(np.int32)
  changed = tokens.copy()
  changed[:, 9] = (changed[:, 9] + 1 - 7) % 93 + 7
  for causal in (False, True):
    cfg = ModelConfig.from_config(load([f"model.causal={causal}"]), tokenizer_size=100, platform="cpu")
    model = Decoder(cfg)
    params = model.init(jax.random.key(0), tokens)["params"]
    a, b = (np.asarray(model.apply({"params": params}, t)) for t in (tokens, changed))
    earlier = np.abs(a[:, :9] - b[:, :9]).max()
    if causal:
      assert earlier == 0.0
    else:
      assert earlier > 1e-4  # position 8 (and before) sees the change at 9
  del c
  with pytest.raises(ValueError, match="no KV-cache decoding"):
    enc = Decoder(ModelConfig.from_config(load(), tokenizer_size=100, platform="cpu"), decode=True)
    enc.init(jax.random.key(0), tokens)


def test_encoder_pieces_in_the_tokenizer(tmp_path):
  texts = [f"def f{i}(x):\n    return x * {i} + [MASK]\n" for i in range(200)]
  plain = tok_lib.train_tokenizer(texts, str(tmp_path / "a.model"), vocab_size=300)
  enc = tok_lib.train_tokenizer(
    texts, str(tmp_path / "b.model"), vocab_size=300, control_pieces=tok_lib.ENCODER_PIECES
  )
  assert (enc.mask_id, enc.cls_id, enc.sep_id) == (4, 5, 6)
  assert plain.mask_id is None and plain.cls_id is None
  for t in (plain, enc):
    assert (t.pad_id, t.bos_id, t.eos_id, t.unk_id) == (0, 1, 2, 3)
  assert not {4, 5, 6} & set(enc.encode(texts[0]))  # text never encodes to the control pieces
  assert enc.decode(enc.encode(texts[0])) == texts[0]
  assert enc.decode([5] + enc.encode("x") + [6]) == "x"
  assert enc.token_bytes()[4:7].tolist() == [0, 0, 0]
  # The option off leaves the prepared-data key of existing configs unchanged.
  c = config_lib.load("configs/tiny.py")
  before = key_lib.cache_key(c)
  with c.unlocked():
    del c.data.tokenizer["encoder_pieces"]
  assert key_lib.cache_key(c) == before
  assert key_lib.cache_key(config_lib.load("configs/bert_tiny.py")) != before


def _step_fn(model, c, mesh):
  opt = optimizer_lib.make_optimizer(c)
  state, shardings = state_lib.create_state(model, opt, mesh, c, seed=0)
  fn = jax.jit(
    functools.partial(step_lib.train_step, model=model, optimizer=opt, config=c),
    in_shardings=(shardings, sharding.batch_sharding(mesh)),
    out_shardings=(shardings, None),
    donate_argnums=0,
  )
  return state, fn


def mlm_losses(overrides, n=3):
  c = load(overrides)
  mesh = sharding.make_mesh(c)
  config_lib.validate(c, len(jax.devices()))
  model = Decoder(ModelConfig.from_config(c, tokenizer_size=100, platform="cpu"))
  state, fn = _step_fn(model, c, mesh)
  tokens = np.random.default_rng(0).integers(7, 100, (8, 17)).astype(np.int32)
  host = masking.mlm_batch({"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}, SPEC, 1, 0)
  batch = sharding.global_batch(host, mesh)
  losses = []
  with sharding.activate(mesh, c):
    for _ in range(n):
      state, m = fn(state, batch)
      losses.append(float(m["loss"]))
  return losses


@pytest.fixture(scope="module")
def mlm_reference():
  return mlm_losses(["sharding.data=8"])


def test_mlm_loss_falls(mlm_reference):
  assert mlm_reference[2] < mlm_reference[1] < mlm_reference[0]


@pytest.mark.parametrize("mesh", [(2, 2, 2), (1, 2, 4)])
def test_mlm_same_loss_on_every_mesh(mlm_reference, mesh):
  over = [f"sharding.data={mesh[0]}", f"sharding.fsdp={mesh[1]}", f"sharding.tensor={mesh[2]}"]
  np.testing.assert_allclose(mlm_losses(over), mlm_reference, atol=1e-5)


def toy_rows(n, seed):
  """Label 1 when token 9 occurs anywhere after [CLS]: the [CLS] position must look to its right."""
  rng = np.random.default_rng(seed)
  inputs = rng.integers(10, 100, (n, 16)).astype(np.int32)
  inputs[:, 0] = SPEC.cls_id
  label = rng.integers(0, 2, n)
  where = rng.integers(2, 16, n)
  inputs[label == 1, where[label == 1]] = 9
  return {
    "inputs": inputs,
    "targets": label[:, None].astype(np.int32),
    "weights": np.ones((n, 1), np.float32),
    "segment_ids": np.ones((n, 16), np.int32),
  }


def test_classifier_learns_a_separable_set():
  c = load(["sharding.data=8", "train.learning_rate=5e-3", "train.global_batch_size=16"])
  mesh = sharding.make_mesh(c)
  model = Classifier(ModelConfig.from_config(c, tokenizer_size=100, platform="cpu"), num_labels=2)
  state, fn = _step_fn(model, c, mesh)
  predict = jax.jit(lambda p, x, s: model.apply({"params": p}, x, None, s)[:, 0].argmax(-1))
  with sharding.activate(mesh, c):
    for i in range(100):
      state, m = fn(state, sharding.global_batch(toy_rows(16, i), mesh))
      # One step in flight at a time: with many queued, XLA:CPU's 8 fake devices can pick up the next
      # step's all-reduce before every device joined this one, and under CPU contention the rendezvous
      # then aborts the process ("Termination timeout ... only 4 of them arrived").
      jax.block_until_ready(m)
    test = toy_rows(256, 10_000)
    pred = np.asarray(predict(state.params, test["inputs"], test["segment_ids"]))
  got = labelled.metrics(test["targets"][:, 0], pred, ["no", "yes"])
  assert got["accuracy"] > 0.9, got
  assert got["macro_f1"] > 0.9 and np.asarray(got["confusion"]).sum() == 256


def test_labelled_file_errors(tmp_path):
  p = tmp_path / "a.jsonl"
  p.write_text('{"text": "x", "label": "a"}\n{"text": 3, "label": "b"}\n')
  with pytest.raises(labelled.DataError, match=r"a.jsonl:2"):
    labelled.read(str(p))
  m = labelled.metrics(np.array([0, 0, 1, 2]), np.array([0, 1, 1, 1]), ["a", "b", "c"])
  assert m["confusion"] == [[1, 1, 0], [0, 1, 0], [0, 1, 0]]
  assert m["accuracy"] == 0.5 and m["majority_baseline"] == 0.5
  np.testing.assert_allclose(m["macro_f1"], (2 / 3 + 0.5 + 0.0) / 3)


def test_pseudo_log_likelihood_scorer_matches_masking_by_hand():
  c = load(["sharding.data=8"])
  mesh = sharding.make_mesh(c)
  model = Decoder(ModelConfig.from_config(c, tokenizer_size=100, platform="cpu"))
  params = model.init(jax.random.key(0), np.zeros((1, 8), np.int32))["params"]
  tok = types.SimpleNamespace(mask_id=4, cls_id=5, sep_id=6, path="stub")
  pll = bias_scoring.EncoderScorer(scoring.Scorer(model, params, c, mesh, np.zeros(100)), tok, 8)
  sentences = [[10, 11, 12, 13], [20, 21, 22]]
  counted = [[True, False, True, True], [True, True, True]]
  got = pll.score(sentences, counted)
  for t, m, g in zip(sentences, counted, got, strict=True):
    seq = np.array([5] + t + [6], np.int32)
    want = 0.0
    for i in np.nonzero(m)[0]:
      x = seq.copy()
      x[i + 1] = 4
      logp = jax.nn.log_softmax(model.apply({"params": params}, x[None])[0, i + 1])
      want += float(logp[seq[i + 1]])
    np.testing.assert_allclose(g, want, rtol=1e-4)  # padded rows see nothing of their padding


def test_make_example_writes_a_balanced_labelled_split(tmp_path):
  """make_example: docstrings of two stdlib packages, balanced, split per label, readable as labelled rows."""
  pairs = examples.stdlib_docstrings(("json", "email"), per_label=10, min_chars=40, seed=1)
  assert sorted(lab for _, lab in pairs) == ["email"] * 10 + ["json"] * 10
  assert all(len(t) >= 40 for t, _ in pairs) and len({t for t, _ in pairs}) == 20
  out = examples.write_split(pairs, str(tmp_path), val_fraction=0.2)
  assert out["counts"] == {"train": {"email": 8, "json": 8}, "val": {"email": 2, "json": 2}}
  train, val = labelled.read(out["paths"]["train"]), labelled.read(out["paths"]["val"])
  assert not {t for t, _ in train} & {t for t, _ in val}
  assert examples.stdlib_docstrings(("json", "email"), per_label=10, seed=1) == pairs
  with pytest.raises(DataError, match="no standard-library package 'nope'"):
    examples.stdlib_docstrings(("json", "nope"))
