"""Held-out metrics against hand-computed values: perplexity, bits per byte, ECE, ranks, SEs, batch size."""

import math
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llm_jax.eval import calibration, metrics, scoring

# Two rows of next-token probabilities, chosen so no confidence sits on a bin edge (k/15).
P_ROWS = np.array(
  [
    [0.10, 0.15, 0.30, 0.45],  # after token 0
    [0.50, 0.25, 0.125, 0.125],  # after token 1
    [0.25, 0.25, 0.25, 0.25],
    [0.25, 0.25, 0.25, 0.25],
  ]
)


class TableModel:
  """A stand-in for Decoder: logits depend only on the input token (log of P_ROWS)."""

  def __init__(self, p_rows):
    self.table = jnp.log(jnp.asarray(p_rows, jnp.float32))
    self.cfg = types.SimpleNamespace(vocab_size=p_rows.shape[1], max_seq_len=8)

  def apply(self, variables, tokens_BL, positions=None, segment_ids=None):
    del variables, positions, segment_ids
    return self.table[tokens_BL]


@pytest.fixture(scope="module")
def mesh():
  from jax.sharding import Mesh

  return Mesh(np.asarray(jax.devices()[:1]).reshape(1, 1, 1), ("data", "fsdp", "tensor"))


@pytest.fixture(scope="module")
def config():
  from configs import base

  return base.get_config()


def test_token_outputs_hand_values():
  model = TableModel(P_ROWS)
  batch = {"inputs": jnp.array([[0, 1, 0]]), "targets": jnp.array([[3, 1, 0]])}
  out = scoring.token_outputs({}, batch, jnp.array([1, 2, 3, 4]), model=model)
  np.testing.assert_allclose(out["nll"][0], [-math.log(0.45), -math.log(0.25), -math.log(0.1)], rtol=1e-6)
  np.testing.assert_array_equal(out["rank"][0], [1, 2, 4])
  np.testing.assert_allclose(out["confidence"][0], [0.45, 0.5, 0.45], rtol=1e-6)
  np.testing.assert_array_equal(out["bytes"][0], [4, 2, 1])


def test_perplexity_bits_per_byte_ece_by_hand(mesh, config):
  scorer = scoring.Scorer(TableModel(P_ROWS), {}, config, mesh, np.array([1, 2, 3, 4]))
  batch = {
    "inputs": np.array([[0, 1, 0, 0]], np.int32),
    "targets": np.array([[3, 1, 0, 2]], np.int32),
    "weights": np.array([[1, 1, 1, 0]], np.float32),  # the last token is padding
    "domain_ids": np.zeros((1, 4), np.int32),
  }
  res = scorer.accumulate([batch], ["all"]).result()["overall"]
  nll = math.log(1 / 0.45) + math.log(4) + math.log(10)
  assert res["tokens"] == 3 and res["bytes"] == 4 + 2 + 1
  assert res["loss"] == pytest.approx(nll / 3, rel=1e-6)
  assert res["perplexity"] == pytest.approx((4 * 10 / 0.45) ** (1 / 3), rel=1e-6)
  assert res["bits_per_byte"] == pytest.approx(math.log2(4 * 10 / 0.45) / 7, rel=1e-6)
  # Bins: conf .45 -> bin 6 (one right, one wrong), conf .5 -> bin 7 (wrong).
  assert res["ece"] == pytest.approx(2 / 3 * abs(0.5 - 0.45) + 1 / 3 * abs(0 - 0.5), abs=1e-6)
  assert res["accuracy"] == pytest.approx(1 / 3)
  assert res["mean_rank"] == pytest.approx(7 / 3) and res["median_rank"] == 2
  assert (res["top1"], res["top5"], res["top10"]) == (pytest.approx(1 / 3), 1.0, 1.0)
  assert math.isnan(res["loss_se"])  # a single window: no standard error


def test_ratio_se_by_hand():
  # R = 4/2 = 2, residuals -1, +1, k/(k-1) = 2: sqrt(2 * 2) / 2 = 1.
  assert metrics.ratio_se([1, 3], [1, 1]) == pytest.approx(1.0)
  # Blocks with no tokens are not blocks.
  assert metrics.ratio_se([1, 3, 0], [1, 1, 0]) == pytest.approx(1.0)
  assert math.isnan(metrics.ratio_se([1], [1]))


def test_ece_and_median_reference():
  conf = [0.05, 0.05, 0.95, 0.95, 0.95, 0.5]
  correct = [0, 0, 1, 1, 0, 1]
  want = 2 / 6 * 0.05 + 3 / 6 * abs(2 / 3 - 0.95) + 1 / 6 * 0.5
  assert calibration.expected_calibration_error(conf, correct) == pytest.approx(want)
  cal = calibration.Calibration(vocab_size=20)
  cal.add(conf, [2, 3, 1, 1, 7, 1])  # rank 1 <=> correct
  r = cal.result()
  assert r["ece"] == pytest.approx(want)
  assert r["median_rank"] == 1.5  # sorted ranks 1 1 1 2 3 7
  assert r["mean_rank"] == pytest.approx(15 / 6)
  assert r["top5"] == pytest.approx(5 / 6)
  assert calibration.bin_index([0.0, 1 / 15 - 1e-9, 1 / 15 + 1e-9, 1.0]).tolist() == [0, 0, 1, 14]


def test_domains_micro_macro_and_window_ses():
  acc = metrics.Accumulator(["a", "b"], vocab_size=8)
  # window 0: domain a, nll 1 and 3 (2 bytes each); window 1: a nll 2, b nll 6 (4 bytes).
  acc.add(
    nll=[1, 3, 2, 6],
    rank=[1, 2, 1, 3],
    confidence=[0.5] * 4,
    nbytes=[2, 2, 2, 4],
    domain=[0, 0, 0, 1],
    window=[0, 0, 1, 1],
    weight=[1] * 4,
  )
  r = acc.result()
  assert r["overall"]["loss"] == pytest.approx(12 / 4)
  assert r["domains"]["a"]["loss"] == pytest.approx(2.0)
  assert r["domains"]["b"]["loss"] == pytest.approx(6.0)
  assert r["macro"]["loss"] == pytest.approx(4.0)
  assert r["overall"]["loss_se"] == pytest.approx(metrics.ratio_se([4, 8], [2, 2]))
  assert r["domains"]["a"]["loss_se"] == pytest.approx(metrics.ratio_se([4, 2], [2, 1]))
  assert r["overall"]["bits_per_byte"] == pytest.approx(12 / (math.log(2) * 10))
  assert r["overall"]["bits_per_byte_se"] == pytest.approx(
    metrics.ratio_se(np.array([4, 8]) / math.log(2), [4, 6])
  )


def test_bytes_exact_with_byte_fallback_and_space_pieces(tmp_path):
  from llm_jax.data.tokenizer import train_tokenizer

  text = (
    "def value(self):\n    return self.value + 1\n" * 40
    + "The value of the statement is returned to the caller.\n" * 40
  )
  tok = train_tokenizer([text], str(tmp_path / "t.model"), vocab_size=300)
  sample = "  return the café €5\n"
  ids = tok.encode(sample)
  pieces = [tok.id_to_piece(i) for i in ids]
  assert any(p.startswith("<0x") for p in pieces), pieces  # é and € fall back to bytes
  assert any(p.startswith("\u2581") and len(p) > 1 for p in pieces), pieces  # leading-space pieces
  tb = tok.token_bytes()
  assert int(tb[ids].sum()) == len(sample.encode("utf-8")) == 24
  assert tb[tok.eos_id] == 0
  acc = metrics.Accumulator(["all"], tok.vocab_size)
  n = len(ids)
  acc.add(
    nll=np.full(n, math.log(2)),
    rank=np.ones(n),
    confidence=np.full(n, 0.9),
    nbytes=tb[ids],
    domain=np.zeros(n),
    window=np.zeros(n),
    weight=np.ones(n),
  )
  res = acc.result()["overall"]
  assert res["bits_per_byte"] == pytest.approx(n / 24)  # one bit per token over 24 bytes
  assert res["perplexity"] == pytest.approx(2.0)


@pytest.fixture(scope="module")
def tiny_model():
  import flax.linen as nn

  from configs import base
  from llm_jax.model import Decoder, ModelConfig

  c = base.get_config()
  c.model.num_layers, c.model.d_model, c.model.num_heads = 1, 32, 2
  c.model.max_seq_len, c.model.vocab_size = 16, 64
  model = Decoder(ModelConfig.from_config(c))
  params = nn.unbox(model.init(jax.random.key(0), jnp.zeros((1, 16), jnp.int32))["params"])
  return c, model, params


def test_batch_size_independent_on_mesh(tiny_model):
  from llm_jax import sharding

  c, model, params = tiny_model
  mesh = sharding.make_mesh(c)  # 8 fake devices, data-parallel
  toks = np.random.default_rng(0).integers(4, 64, size=(13, 17)).astype(np.int32)

  def batches(bs):
    for s in range(0, len(toks), bs):
      ch = toks[s : s + bs]
      b = {
        "inputs": np.zeros((bs, 16), np.int32),
        "targets": np.zeros((bs, 16), np.int32),
        "weights": np.zeros((bs, 16), np.float32),
      }
      b["inputs"][: len(ch)], b["targets"][: len(ch)], b["weights"][: len(ch)] = ch[:, :-1], ch[:, 1:], 1
      b["domain_ids"] = (b["targets"] % 2).astype(np.int32)
      yield b

  scorer = scoring.Scorer(
    model, jax.device_put(params, sharding.replicated(mesh)), c, mesh, np.ones(64, np.int32)
  )
  results = [scorer.accumulate(batches(bs), ["even", "odd"]).result() for bs in (1, 5, 16)]
  flat = [jax.tree_util.tree_leaves_with_path(r) for r in results]
  for other in flat[1:]:
    for (path, a), (_, b) in zip(flat[0], other, strict=True):
      if isinstance(a, float) and not math.isnan(a):
        assert b == pytest.approx(a, rel=1e-6, abs=1e-9), path
  assert results[0]["overall"]["tokens"] == 13 * 16
  assert results[0]["overall"]["blocks"] == 13


def test_compare_flags_differences_beyond_standard_errors(tmp_path):
  import json

  from llm_jax.eval import compare

  def write(name, loss, se, bpb, bpb_se, tok="t1"):
    row = {
      "loss": loss,
      "loss_se": se,
      "perplexity": math.exp(loss),
      "perplexity_se": None,
      "bits_per_byte": bpb,
      "bits_per_byte_se": bpb_se,
      "accuracy": 0.3,
      "ece": 0.02,
    }
    res = {
      "meta": {"source": name, "step": 1, "corpus": "c", "tokenizer_sha256": tok},
      "heldout": {"overall": row, "macro": {}, "domains": {"a": row}},
    }
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(res))
    return str(path)

  a = write("a", 3.0, 0.01, 1.00, 0.01)
  b = write("b", 2.95, 0.01, 0.99, 0.01, tok="t2")  # loss: 0.05 > 2 * 0.0141; bpb: 0.01 < 0.0141
  cmp = compare.compare([a, b])
  flags = {r["name"]: r["flags"][1] for r in cmp["rows"]}
  assert flags["all/loss"] == "**" and flags["all/bits_per_byte"] == "" and flags["all/ece"] == ""
  text = compare.text(cmp)
  assert "all/loss: B-A = -0.0500 **" in text and "different tokenizers" in text
  with pytest.raises(compare.CompareError, match="at least two"):
    compare.compare([a])
