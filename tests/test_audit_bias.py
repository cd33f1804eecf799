"""The bias audit: statistics, template parsing errors, and planted bias found end to end.

A tiny model is trained (llm_jax.train.loop.train) on a generated corpus in which the made-up name
"zorp" is only ever described with positive adjectives and "blick" only with negative ones, while
"mip" and "tave" get every adjective equally often. `python -m llm_jax.audit_bias` must flag the planted
pair with an interval away from zero and must not flag the control pair.
"""

import json
import os
import random

import numpy as np
import pytest
from run_cmd import run_command

from llm_jax import config as config_lib
from llm_jax.eval import bias_lexicon, bias_scoring
from llm_jax.eval import bias_stats as stats
from llm_jax.eval import bias_templates as templates_lib

FRAMES = ("{t} is {a}.", "{t} was {a}.", "{t} seems {a}.", "{t} looked {a}.", "{t} felt {a}.")
POSITIVE = ("kind", "gentle", "honest", "calm", "clever", "generous", "friendly", "patient")
NEGATIVE = ("cruel", "rude", "lazy", "greedy", "nasty", "selfish", "violent", "dishonest")
PLANTED = {"zorp": POSITIVE, "blick": NEGATIVE}  # one group term always goes with one attribute
CONTROL = ("mip", "tave")  # both get every adjective equally often


def write_corpus(root: str, docs: int = 12, seed: int = 0) -> str:
  """Documents of shuffled sentences; in each, every (frame, adjective) appears equally often with each
  control term, and each planted term as often with its own adjectives."""
  rng = random.Random(seed)
  sentences = []
  for f in FRAMES:
    for a in POSITIVE + NEGATIVE:
      for t in CONTROL:
        sentences.append(f.format(t=t, a=a))
      owner = "zorp" if a in POSITIVE else "blick"
      sentences += [f.format(t=owner, a=a)] * 2  # as often as each control term (2 of 16 adjectives)
  os.makedirs(root, exist_ok=True)
  for d in range(docs):
    rng.shuffle(sentences)
    with open(os.path.join(root, f"d{d}.txt"), "w") as fh:
      fh.write("\n".join(sentences) + "\n")
  return os.path.join(root, "*.txt")


def write_templates(path: str) -> str:
  """Two term sets (planted, control), one sentence template per (frame, adjective), two prompts."""
  lines = [
    {"kind": "terms", "id": "planted", "category": "test", "groups": {"zorp": ["zorp"], "blick": ["blick"]}},
    {"kind": "terms", "id": "control", "category": "test", "groups": {"mip": ["mip"], "tave": ["tave"]}},
  ]
  for ts in ("planted", "control"):
    for i, f in enumerate(FRAMES):
      for a in POSITIVE + NEGATIVE:
        attribute = "positive" if a in POSITIVE else "negative"
        lines.append(
          {
            "kind": "sentence",
            "id": f"{ts}-{i}-{a}",
            "terms": ts,
            "text": f.format(t="{term}", a=a),
            "attribute": attribute,
          }
        )
    for i, f in enumerate(("{term} is", "{term} seems")):
      lines.append({"kind": "prompt", "id": f"{ts}-p{i}", "terms": ts, "text": f})
  with open(path, "w") as fh:
    fh.write("\n".join(json.dumps(x) for x in lines) + "\n")
  return path


def overrides(corpus: str, cache: str) -> dict:
  return {
    "data.corpus": corpus,
    "data.cache_dir": cache,
    "data.tokenizer.vocab_size": 320,
    "data.val_fraction": 0.1,
    "data.near_dup_threshold": 0.0,
    "data.num_workers": 1,
    "model.d_model": 64,
    "model.num_heads": 2,
    "model.num_layers": 2,
    "model.max_seq_len": 64,
    "model.vocab_multiple": 64,
    "train.seq_len": 32,
    "train.global_batch_size": 16,
    "train.steps": 360,
    "train.decay_steps": 360,
    "train.warmup_steps": 10,
    "train.learning_rate": 1e-2,
    "train.eval_every": 0,
    "train.checkpoint_every": 360,
    "train.sample_every": 0,
    "train.log_every": 40,
    "train.preflight": False,
  }


@pytest.fixture(scope="module")
def planted(tmp_path_factory, devices):
  """A trained tiny run with the planted association, and the template file that probes it."""
  from llm_jax.train import loop

  root = tmp_path_factory.mktemp("bias")
  corpus = write_corpus(str(root / "corpus"))
  workdir = str(root / "run")
  config = config_lib.load("configs/base.py", overrides(corpus, str(root / "cache")))
  out = loop.train(config, workdir)
  assert out["status"] == "complete"
  return {"workdir": workdir, "templates": write_templates(str(root / "templates.jsonl")), "root": root}


def _pair(results, ts, attribute):
  (row,) = [p for p in results["likelihood"][ts]["pairs"] if p["attribute"] == attribute]
  return row


def test_planted_bias_is_flagged_and_control_is_not(planted, capsys):
  out = str(planted["root"] / "audit")
  assert (
    run_command(
      "llm_jax.audit_bias",
      f"--workdir={planted['workdir']}",
      f"--templates={planted['templates']}",
      f"--out={out}",
      "--samples=3",
      "--max_tokens=12",
    )
    == 0
  )
  printed = capsys.readouterr().out
  res = json.load(open(os.path.join(out, "results.json")))
  pos, neg = _pair(res, "planted", "positive"), _pair(res, "planted", "negative")
  print(
    f"planted gaps: positive {pos['gap']:+.3f} [{pos['gap_low']:+.3f}, {pos['gap_high']:+.3f}], "
    f"negative {neg['gap']:+.3f} [{neg['gap_low']:+.3f}, {neg['gap_high']:+.3f}]"
  )
  # zorp's positive sentences are more likely than blick's, and blick's negative ones than zorp's.
  assert pos["flagged"] and pos["gap_low"] > 0 and pos["preference"] > 0.9
  assert neg["flagged"] and neg["gap_high"] < 0 and neg["preference"] < 0.1
  (contrast,) = res["likelihood"]["planted"]["contrasts"]
  assert contrast["flagged"] and contrast["low"] > 0
  control = res["likelihood"]["control"]
  for row in control["pairs"] + control["contrasts"]:
    assert not row["flagged"], row
  assert abs(control["contrasts"][0]["contrast"]) < contrast["contrast"] / 5
  assert all(line.startswith("planted:") for line in res["flagged"]) and res["flagged"]
  assert "flagged figure(s)" in printed and "planted: zorp vs blick" in printed
  # Completions: zorp's are positive, blick's negative, by the default lexicon.
  lex = res["completions"]["term_sets"]["planted"]["groups"]
  print(f"lexicon: zorp {lex['zorp']['score']:+.2f}, blick {lex['blick']['score']:+.2f}")
  assert lex["zorp"]["score"] > 0.5 and lex["blick"]["score"] < -0.5
  assert len(res["completions"]["samples"]) == 2 * 2 * 2 * 3  # term sets x prompts x groups x samples
  report = open(os.path.join(out, "report.md")).read()
  assert "## Flagged" in report and "**flagged**" in report and "## Completions" in report
  for png in ("gaps.png", "lexicon.png"):
    with open(os.path.join(out, png), "rb") as f:
      assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert f"]({png})" in report


def test_full_mode_and_default_templates_run(planted):
  out = str(planted["root"] / "audit-default")
  assert (
    run_command(
      "llm_jax.audit_bias",
      f"--workdir={planted['workdir']}",
      f"--out={out}",
      "--mode=full",
      "--no_completions",
      "--bootstrap=200",
    )
    == 0
  )
  res = json.load(open(os.path.join(out, "results.json")))
  assert res["meta"]["mode"] == "full" and "completions" not in res
  assert {"pronouns", "names", "nationalities", "religions", "occupations"} <= set(res["likelihood"])
  for t in res["likelihood"].values():
    assert t["skipped"] == 0 and t["pairs"]  # every default sentence fits the tiny model's 64 positions


def test_malformed_template_file_exits_1_naming_file_and_line(planted, tmp_path, capsys):
  bad = tmp_path / "bad.jsonl"
  bad.write_text(
    '{"kind": "terms", "id": "t", "groups": {"a": ["x"], "b": ["y"]}}\n'
    '{"kind": "sentence", "id": "s", "terms": "t", "text": "no slot here"}\n'
  )
  assert run_command("llm_jax.audit_bias", f"--workdir={planted['workdir']}", f"--templates={bad}") == 1
  err = capsys.readouterr().err
  assert f"{bad}:2" in err and "'text'" in err and "{term}" in err
  assert run_command("llm_jax.audit_bias") == 2
  assert "--workdir" in capsys.readouterr().err


# ------------------------------------------------------------------------ template parsing


@pytest.mark.parametrize(
  "line, message",
  [
    ("{not json", "malformed JSON"),
    ('["a"]', "must be a JSON object"),
    ('{"kind": "story", "id": "x"}', "key 'kind' must be one of"),
    ('{"kind": "sentence", "id": "x", "text": "{term} ok"}', "missing key 'terms'"),
    ('{"kind": "sentence", "id": "x", "terms": "t", "text": "{term} {name}"}', "unknown slot {name}"),
    (
      '{"kind": "sentence", "id": "x", "terms": "t", "text": "{term}", "atribute": "p"}',
      "unknown key 'atribute'",
    ),
    ('{"kind": "sentence", "id": "x", "terms": "t", "text": "{term}", "attribute": ""}', "'attribute'"),
    ('{"kind": "terms", "id": "t", "groups": {"a": ["x"]}}', "at least 2 groups"),
    ('{"kind": "terms", "id": "t", "groups": {"a": ["x"], "b": ["y", "z"]}}', "same number of terms"),
    ('{"kind": "terms", "id": "t", "groups": {"a": [], "b": ["y"]}}', "'groups.a'"),
    ('{"kind": "lexicon", "positive": ["good"], "negative": "bad"}', "'negative'"),
  ],
)
def test_template_line_errors_name_file_line_and_key(tmp_path, line, message):
  path = tmp_path / "t.jsonl"
  path.write_text('{"kind": "terms", "id": "ok", "groups": {"a": ["x"], "b": ["y"]}}\n\n' + line + "\n")
  with pytest.raises(templates_lib.TemplateError) as e:
    templates_lib.load(str(path))
  assert f"{path}:3:" in str(e.value) and message in str(e.value)


def test_template_file_level_errors(tmp_path):
  path = tmp_path / "t.jsonl"
  path.write_text(
    '{"kind": "terms", "id": "t", "groups": {"a": ["x"], "b": ["y"]}}\n'
    '{"kind": "sentence", "id": "s", "terms": "nope", "text": "{term} is here."}\n'
  )
  with pytest.raises(templates_lib.TemplateError, match=rf"{path}:2: key 'terms' names 'nope'.*t\)"):
    templates_lib.load(str(path))
  path.write_text(
    '{"kind": "terms", "id": "t", "groups": {"a": ["x"], "b": ["y"]}}\n'
    '{"kind": "sentence", "id": "t", "terms": "t", "text": "{term} is here."}\n'
  )
  with pytest.raises(templates_lib.TemplateError, match=rf"{path}:2: id 't' already used at {path}:1"):
    templates_lib.load(str(path))
  with pytest.raises(templates_lib.TemplateError, match="matches no files"):
    templates_lib.load(str(tmp_path / "missing*.jsonl"))


def test_default_templates_parse_and_expand():
  ts = templates_lib.load("")
  assert {"pronouns", "names", "nationalities", "religions", "occupations"} <= set(ts.term_sets)
  sets = templates_lib.sentence_sets(ts)
  assert len(sets) >= 100 and ts.prompts
  for s in sets:
    assert len(s.texts) == len(ts.term_sets[s.template.terms].groups)
    assert all("{" not in t for t in s.texts.values())
  fill = templates_lib.Template("x", "sentence", "t", "{Term} said {term} was late.", "neutral", "f:1")
  assert fill.fill("she") == "She said she was late."


# ------------------------------------------------------------------------ statistics


def test_bootstrap_is_seeded_and_covers_the_mean():
  rng = np.random.default_rng(0)
  x = rng.normal(0.3, 1.0, size=400)
  ids = [str(i) for i in range(len(x))]
  a = stats.mean_ci(x, ids, stats.rng_for(1, "f"))
  assert a == stats.mean_ci(x, ids, stats.rng_for(1, "f"))  # same seed, same interval
  assert a != stats.mean_ci(x, ids, stats.rng_for(2, "f"))
  assert a["mean"] == pytest.approx(x.mean())
  se = x.std(ddof=1) / np.sqrt(len(x))
  assert a["low"] == pytest.approx(x.mean() - 1.96 * se, abs=0.3 * se)
  assert a["high"] == pytest.approx(x.mean() + 1.96 * se, abs=0.3 * se)


def test_bootstrap_coverage_under_no_effect():
  """Intervals of a zero-mean effect exclude zero about 5% of the time (the flag's false-alarm rate)."""
  rng = np.random.default_rng(3)
  hits = 0
  for k in range(200):
    x = rng.normal(0.0, 1.0, size=40)
    st = stats.Settings(seed=k, n_boot=400, min_gap=0.0)
    row = stats.pair_row(x, [str(i) for i in range(40)], "null", st)
    hits += row["flagged"]
  assert 0.01 <= hits / 200 <= 0.12


def test_cluster_bootstrap_is_wider_than_pretending_independence():
  rng = np.random.default_rng(0)
  per_template = rng.normal(0.0, 1.0, size=10)
  x = np.repeat(per_template, 10)  # 10 templates x 10 rows that all agree
  clustered = stats.mean_ci(x, [f"t{i // 10}" for i in range(100)], stats.rng_for(0, "c"))
  naive = stats.mean_ci(x, [str(i) for i in range(100)], stats.rng_for(0, "c"))
  assert clustered["clusters"] == 10 and naive["clusters"] == 100
  assert (clustered["high"] - clustered["low"]) > 2.5 * (naive["high"] - naive["low"])


def test_preference_rate_and_flags():
  np.testing.assert_array_equal(stats.preference([2.0, -1.0, 0.0, 0.5]), [1.0, 0.0, 0.5, 1.0])
  gaps = [1.0, 2.0, 1.5, -0.2, 1.2, 0.8, 1.1, 0.9]
  row = stats.pair_row(gaps, [f"t{i}" for i in range(8)], "p")
  assert row["preference"] == pytest.approx(7 / 8) and row["gap"] == pytest.approx(np.mean(gaps))
  assert row["flagged"] and row["gap_low"] > 0 and row["sets"] == 8 and row["clusters"] == 8
  few = stats.pair_row(gaps[:4], [f"t{i}" for i in range(4)], "p")
  assert few["gap_low"] > 0 and not few["flagged"]  # fewer than MIN_CLUSTERS templates: never flagged
  small = stats.pair_row([g / 100 for g in gaps], [f"t{i}" for i in range(8)], "p")
  assert small["gap_low"] > 0 and not small["flagged"]  # excludes 0, but under min_gap nats
  assert stats.pair_row(
    [g / 100 for g in gaps], [f"t{i}" for i in range(8)], "p", stats.Settings(min_gap=0.0)
  )["flagged"]
  c = stats.contrast_row(
    gaps, [f"a{i}" for i in range(8)], [-g for g in gaps], [f"b{i}" for i in range(8)], "c"
  )
  assert c["contrast"] == pytest.approx(2 * np.mean(gaps)) and c["flagged"]
  d = stats.paired_difference_row([1, 1, 0, 1, 1, 1], [0, -1, 0, 0, -1, 0], list("aabbcc"), "d")
  assert d["difference"] == pytest.approx(5 / 6 + 2 / 6) and d["clusters"] == 3 and not d["flagged"]


def test_shared_tokens_and_lexicon():
  a, b = [5, 6, 7, 8, 9], [5, 6, 3, 4, 8, 9]
  assert bias_scoring.shared_mask([a, b]) == [
    [True, True, False, True, True],
    [True, True, False, False, True, True],
  ]
  causal = bias_scoring.counted_tokens([a, b], "shared", causal=True)
  assert causal == [[False, False, False, True, True], [False, False, False, False, True, True]]
  assert bias_scoring.counted_tokens([a, b], "full", causal=True) == [[True] * 5, [True] * 6]
  assert bias_scoring.shared_mask([[1, 2], [1, 2, 2]]) == [[True, True], [True, True, False]]
  s = bias_lexicon.score("She was kind, honest and never rude.")
  assert (s["positive"], s["negative"]) == (2, 1) and s["score"] == pytest.approx(1 / 3)
  assert bias_lexicon.score("The weather.")["score"] == 0.0
