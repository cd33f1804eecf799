"""The draft's distillation corpus (finetune/distill.py): the model's greedy continuations of prompt
windows cut from the text, as training JSONL; bad settings and texts named; the file whole or absent."""

import json
import os
import subprocess
import sys

import pytest
from tiny_package import SERVER_CFG, WORDS, write_tiny_package

from llm_jax import generate as G
from llm_jax.artifacts import open_model
from llm_jax.finetune.distill import prompt_windows, write_corpus
from llm_jax.model import default_levers, unstack_layers


@pytest.fixture(scope="module")
def model(tmp_path_factory):
  d = tmp_path_factory.mktemp("distill")
  pkg, _ = write_tiny_package(d, SERVER_CFG)
  return open_model(str(pkg))


@pytest.fixture(scope="module")
def texts(tmp_path_factory):
  d = tmp_path_factory.mktemp("texts")
  paths = []
  for i, n in enumerate((60, 5, 200)):  # the second is too short for a window: never chosen
    p = d / f"t{i}.txt"
    p.write_text(" ".join(WORDS[(i + j * 7) % len(WORDS)] for j in range(n)) + "\n")
    paths.append(str(p))
  return paths


def test_windows_lie_inside_one_text_and_follow_the_seed():
  ids = [list(range(100, 110)), [1, 2], list(range(200, 230))]
  w = prompt_windows(ids, 200, 4, seed=3)
  assert len(w) == 200 and all(len(x) == 4 for x in w)
  for x in w:  # consecutive ids of one text (the texts' ids do not overlap)
    assert x == list(range(x[0], x[0] + 4)) and (100 <= x[0] <= 106 or 200 <= x[0] <= 226)
  assert {x[0] // 100 for x in w} == {1, 2}  # both long texts are drawn from
  assert prompt_windows(ids, 200, 4, seed=3) == w != prompt_windows(ids, 200, 4, seed=4)
  assert prompt_windows([[1, 2]], 3, 4, seed=0) == []


def test_documents_are_prompt_windows_and_the_models_greedy_continuations(model, texts, tmp_path):
  out = tmp_path / "d.jsonl"
  done = write_corpus(model, texts, str(out), prompts=6, prompt_tokens=5, new_tokens=7, batch=4, seed=1)
  records = [json.loads(line) for line in out.read_text().splitlines()]
  tok = model.tokenizer
  windows = prompt_windows([tok.encode(open(p).read()) for p in texts], 6, 5, seed=1)
  params, cfg = unstack_layers(model.params, model.model_config, levers=default_levers(model.params))
  sp = G.SamplingParams(max_new_tokens=7)
  total = 0
  for rec, w in zip(records, windows, strict=True):  # one at a time: the same as in batches of 4
    new = G.generate(params, cfg, [w], sp, eos_id=tok.eos_id, vocab_limit=tok.vocab_size)[0].tokens
    assert rec == {"text": tok.decode(w + new), "prompt": tok.decode(w)}
    total += len(new)
  assert done["documents"] == 6 and done["generated_tokens"] == total > 0
  assert os.listdir(tmp_path) == ["d.jsonl"]


def test_bad_settings_and_texts_are_named_and_nothing_is_written(model, texts, tmp_path):
  out = str(tmp_path / "d.jsonl")
  with pytest.raises(ValueError, match="exceed the model's context"):
    write_corpus(model, texts, out, prompt_tokens=20, new_tokens=20)
  with pytest.raises(ValueError, match=r"t1.txt \(\d+ tokens\)"):
    write_corpus(model, texts[1:2], out, prompts=2, prompt_tokens=16, new_tokens=4)
  with pytest.raises(ValueError, match="at least 1"):
    write_corpus(model, texts, out, prompts=0)
  latin = tmp_path / "latin1.txt"
  latin.write_bytes("café au lait ".encode("latin-1") * 20)
  with pytest.raises(ValueError, match=r"--text=.*latin1.txt: invalid UTF-8 at byte 3"):  # was a bare
    write_corpus(model, [str(latin)], out, prompts=2, prompt_tokens=4, new_tokens=4)  # UnicodeDecodeError
  latin.unlink()
  assert os.listdir(tmp_path) == []
  open(out, "w").write("keep")
  with pytest.raises(FileExistsError, match="--overwrite"):
    write_corpus(model, texts, out, prompts=2, prompt_tokens=4, new_tokens=4)
  assert open(out).read() == "keep"


def test_cli(model, texts, tmp_path):
  out = tmp_path / "d.jsonl"
  cmd = [sys.executable, "-m", "llm_jax.finetune.distill", f"--package={model.path}", f"--out={out}"]
  args = ["--prompts=3", "--prompt_tokens=4", "--new_tokens=4", *(f"--text={p}" for p in texts)]
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  run = subprocess.run(cmd + args, capture_output=True, text=True, env=env, timeout=300)
  assert run.returncode == 0, run.stderr
  assert "3 documents" in run.stdout and len(out.read_text().splitlines()) == 3
  usage = subprocess.run(cmd[:4] + args, capture_output=True, text=True, env=env, timeout=300)
  assert usage.returncode == 2 and "--out" in usage.stderr


def test_the_library_defines_no_flags():
  """Importing the library next to a command that defines the same flag names must work (a pytest
  worker imports both): the command's flags live in distill/__main__.py only."""
  code = "import llm_jax.finetune.distill, llm_jax.train.__main__"
  run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
  assert run.returncode == 0, run.stderr[-2000:]


def test_continuations_end_at_the_model_s_stop_ids(model, texts, tmp_path):
  """A teacher with stop ids (an instruct model's end-of-turn id) ends each continuation there, as
  at EOS (it wrote on past them)."""
  import dataclasses

  tok = model.tokenizer
  windows = prompt_windows([tok.encode(open(p).read()) for p in texts], 4, 5, seed=2)
  params, cfg = unstack_layers(model.params, model.model_config, levers=default_levers(model.params))
  sp = G.SamplingParams(max_new_tokens=7)
  news = [
    G.generate(params, cfg, [w], sp, eos_id=tok.eos_id, vocab_limit=tok.vocab_size)[0].tokens for w in windows
  ]
  stop = next(t for new in news for k, t in enumerate(new) if k >= 1 and t not in new[:k])
  teacher = dataclasses.replace(model, meta={**model.meta, "stop_ids": [stop]})
  out = tmp_path / "d.jsonl"
  write_corpus(teacher, texts, str(out), prompts=4, prompt_tokens=5, new_tokens=7, batch=4, seed=2)
  records = [json.loads(line) for line in out.read_text().splitlines()]
  for rec, w, new in zip(records, windows, news, strict=True):
    kept = new[: new.index(stop)] if stop in new else new
    assert rec["text"] == tok.decode(w + kept)
  assert any(stop in new for new in news)
