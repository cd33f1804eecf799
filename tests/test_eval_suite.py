"""The frozen suite: file validation with clear messages, the default suite, and scoring with a model
that memorized its answers (so the right multiple-choice option is forced by construction)."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from llm_jax.eval import suite


def _write(path, lines):
  path.write_text("\n".join(lines) + "\n")
  return str(path)


def test_default_suite_loads():
  items = suite.load()
  kinds = {k: sum(i.type == k for i in items) for k in suite.TYPES}
  assert 30 <= len(items) <= 60, len(items)
  assert kinds["continuation"] >= 10 and kinds["choice"] >= 10 and kinds["generate"] >= 3
  assert {t for i in items for t in i.tags} >= {"code", "docs"}


@pytest.mark.parametrize(
  "line,needle",
  [
    ('{"id": "a", "type": "choice", "prompt": "x", "choices": ["a", "b"]', "malformed JSON"),
    ('{"id": "a", "type": "quiz", "prompt": "x"}', "key 'type'"),
    ('{"id": "a", "type": "continuation", "prompt": "x"}', "missing key 'expected'"),
    ('{"id": "a", "type": "choice", "prompt": "x", "choices": ["a", "b"], "answer": 2}', "key 'answer'"),
    ('{"id": "a", "type": "choice", "prompt": "x", "choices": ["a"], "answer": 0}', "key 'choices'"),
    ('{"type": "generate", "prompt": "x"}', "missing key 'id'"),
    ("[1, 2]", "JSON object"),
  ],
)
def test_malformed_lines_name_file_line_and_key(tmp_path, line, needle):
  good = '{"id": "ok", "type": "continuation", "prompt": "p", "expected": "e"}'
  path = _write(tmp_path / "bad.jsonl", [good, "", line])
  with pytest.raises(suite.SuiteError) as e:
    suite.load(path)
  assert f"{path}:3:" in str(e.value) and needle in str(e.value), str(e.value)


def test_duplicate_ids_and_empty_glob(tmp_path):
  line = '{"id": "x", "type": "generate", "prompt": "p"}'
  path = _write(tmp_path / "dup.jsonl", [line, line])
  with pytest.raises(suite.SuiteError, match=r"dup.jsonl:2: id 'x' already used at .*dup.jsonl:1"):
    suite.load(path)
  with pytest.raises(suite.SuiteError, match="matches no files"):
    suite.load(str(tmp_path / "none*.jsonl"))


def test_request_batches_score_only_continuations():
  reqs = [(0, 0, [5, 6, 7], [8, 9], 2), (1, 0, list(range(10, 40)), [41], 1)]
  ((batch, n),) = list(suite.request_batches(reqs, [2], max_len=16, batch_size=4))
  assert n == 2 and batch["inputs"].shape == (4, 16)
  np.testing.assert_array_equal(batch["inputs"][0, :5], [2, 5, 6, 7, 8])
  np.testing.assert_array_equal(batch["weights"][0, :6], [0, 0, 0, 1, 1, 0])
  assert batch["targets"][1, 15] == 41 and batch["weights"][1].sum() == 1  # context cut on the left
  assert batch["weights"][2:].sum() == 0


FACTS = ["colour: green\n", "animal: horse\n", "fruit: lemon\n"]


@pytest.fixture(scope="module")
def memorized(tmp_path_factory):
  """A tiny decoder trained until it reproduces FACTS (after EOS, as documents start in training)."""
  import flax.linen as nn

  from configs import base
  from llm_jax import sharding
  from llm_jax.data.tokenizer import train_tokenizer
  from llm_jax.eval import scoring
  from llm_jax.model import Decoder, ModelConfig

  tok = train_tokenizer(
    ["".join(FACTS) * 30 + "blue red white black cat dog cow pear apple plum\n" * 30],
    str(tmp_path_factory.mktemp("tok") / "t.model"),
    vocab_size=300,
  )
  c = base.get_config()
  c.model.num_layers, c.model.d_model, c.model.num_heads, c.model.max_seq_len = 1, 64, 2, 16
  c.model.vocab_size = 384
  c.sharding.data = 1
  model = Decoder(ModelConfig.from_config(c))
  rows = [[tok.eos_id] + tok.encode(f) for f in FACTS]
  seq = np.zeros((len(rows), 17), np.int32)
  w = np.zeros((len(rows), 16), np.float32)
  for r, ids in enumerate(rows):
    seq[r, : len(ids)] = ids
    w[r, 1 : len(ids) - 1] = 1  # the first word after EOS is a free choice
  params = nn.unbox(model.init(jax.random.key(0), jnp.zeros((1, 16), jnp.int32))["params"])
  opt = optax.adam(1e-2)
  state = opt.init(params)

  def loss_fn(p):
    logits = model.apply({"params": p}, seq[:, :-1])
    nll = optax.softmax_cross_entropy_with_integer_labels(logits, seq[:, 1:])
    return jnp.sum(nll * w) / w.sum()

  @jax.jit
  def step(p, s):
    loss, g = jax.value_and_grad(loss_fn)(p)
    upd, s = opt.update(g, s)
    return optax.apply_updates(p, upd), s, loss

  for _ in range(100):
    params, state, loss = step(params, state)
  assert float(loss) < 0.05
  mesh = sharding.make_mesh(c, jax.devices()[:1])
  return tok, scoring.Scorer(model, params, c, mesh, tok.token_bytes())


def test_memorized_model_picks_forced_answer_and_matches_greedily(memorized, tmp_path):
  tok, scorer = memorized
  lines = [
    json.dumps(
      {
        "id": "mc-colour",
        "type": "choice",
        "prompt": "colour:",
        "choices": [" red", " blue", " green\n"],
        "answer": 2,
      }
    ),
    json.dumps(
      {
        "id": "mc-animal-wrong-key",
        "type": "choice",
        "prompt": "animal:",
        "choices": [" horse", " cow"],
        "answer": 1,
      }
    ),  # the key is deliberately wrong
    json.dumps({"id": "cont-fruit", "type": "continuation", "prompt": "fruit:", "expected": " lemon"}),
    json.dumps({"id": "cont-fruit-other", "type": "continuation", "prompt": "fruit:", "expected": " apple"}),
  ]
  items = suite.load(_write(tmp_path / "s.jsonl", lines))
  res = suite.score(items, scorer, tok, [tok.eos_id], batch_size=3)
  by_id = {r["id"]: r for r in res["items"]}
  assert by_id["mc-colour"]["pick"] == 2 and by_id["mc-colour"]["correct"]
  assert by_id["mc-animal-wrong-key"]["pick"] == 0 and not by_id["mc-animal-wrong-key"]["correct"]
  assert by_id["cont-fruit"]["greedy_match"] and by_id["cont-fruit"]["logprob"] > -0.5
  assert not by_id["cont-fruit-other"]["greedy_match"]
  assert by_id["cont-fruit-other"]["logprob"] < by_id["cont-fruit"]["logprob"] - 3
  s = res["summary"]
  assert s["choice_accuracy"] == 0.5 and s["greedy_match"] == 0.5
  assert s["choice_chance"] == pytest.approx((1 / 3 + 1 / 2) / 2)


def test_samples_reproducible_with_seed(memorized):
  from llm_jax.eval import generations

  tok, scorer = memorized
  prompts, n = ["colour:", "fruit:"], [8, 8]
  a = generations.sample(scorer, tok, prompts, n, prefix_ids=[tok.eos_id], seed=3)
  b = generations.sample(scorer, tok, prompts, n, prefix_ids=[tok.eos_id], seed=3)
  assert a == b
  greedy = generations.sample(scorer, tok, prompts, n, prefix_ids=[tok.eos_id], temperature=0)
  assert greedy[1].startswith(" lemon"), greedy
