"""KV-cache decoding: equality with full recomputation, sampling controls, stops, streaming, CLI."""

import dataclasses
import functools
import os
import random
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from run_cmd import run_captured

from llm_jax import generate as G
from llm_jax.data.tokenizer import train_tokenizer
from llm_jax.model import Decoder, ModelConfig

CFG = ModelConfig(
  vocab_size=384,
  num_layers=2,
  d_model=32,
  num_heads=4,
  num_kv_heads=2,
  head_dim=8,
  mlp_dim=64,
  max_seq_len=48,
  init_std=0.3,
)
PROMPTS = [[1, 5, 6, 7, 8, 9], [1, 40], [1, 12, 13, 14]]
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _params(cfg, seed=0):
  from llm_jax.model.params import init_params

  return init_params(cfg, seed)


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
  rng = random.Random(0)
  words = "the cat sat on a mat and def return import class self print data model".split()
  texts = [" ".join(rng.choice(words) for _ in range(150)) + "\n" for _ in range(40)]
  return train_tokenizer(texts, str(tmp_path_factory.mktemp("tok") / "tok.model"), vocab_size=300)


@pytest.fixture(scope="module")
def params():
  return _params(CFG)


def _greedy_recompute(params, cfg, prompt, n, vocab_limit):
  """Greedy decoding without a cache: the whole sequence through the model for every token."""
  model = Decoder(cfg)
  fwd = jax.jit(lambda p, t: model.apply({"params": p}, t))
  seq, out, lps = list(prompt), [], []
  for _ in range(n):
    padded = np.zeros((1, cfg.max_seq_len), np.int32)  # causal: padding after the end is unseen
    padded[0, : len(seq)] = seq
    logits = np.asarray(fwd(params, jnp.asarray(padded)))[0, len(seq) - 1, :vocab_limit]
    t = int(np.argmax(logits))
    logp = logits - np.log(np.exp(logits - logits.max()).sum()) - logits.max()
    out.append(t)
    lps.append(float(logp[t]))
    seq.append(t)
  return out, lps


@pytest.mark.parametrize("variant", ["gpt_scan", "llama_loop"])
def test_cached_greedy_equals_full_recompute(variant, params):
  cfg = CFG
  p = params
  if variant == "llama_loop":
    cfg = dataclasses.replace(
      CFG,
      positions="rope",
      norm="rmsnorm",
      activation="swiglu",
      use_bias=False,
      tie_embeddings=False,
      scan_layers=False,
    )
    p = _params(cfg, seed=1)
  n = 12
  gens = G.generate(p, cfg, PROMPTS, G.SamplingParams(max_new_tokens=n), eos_id=-1, vocab_limit=300)
  for prompt, gen in zip(PROMPTS, gens, strict=True):
    want, want_lp = _greedy_recompute(p, cfg, prompt, n, 300)
    assert gen.tokens == want
    np.testing.assert_allclose(gen.logprobs, want_lp, atol=1e-4)
    assert gen.finish_reason == "length"


def test_cache_span_rows_and_unstacked_layers_decode_the_same():
  """Attending to a span of the cache, idle padding rows and per-layer weights change no token."""
  from llm_jax.model import stack_layers, unstack_layers

  cfg = dataclasses.replace(CFG, max_seq_len=160)  # room for a span (MIN_SPAN) short of the cache
  p = _params(cfg, seed=2)
  short = G.make_batch([PROMPTS[1]], [G.SamplingParams(max_new_tokens=12)], cfg)
  assert short.span == G.MIN_SPAN and short.rows == 1 and short.tokens_BL.shape[0] == G.MIN_ROWS
  assert short.greedy and short.arrays["max_new_B"].tolist() == [12, 0]  # the idle row
  long = G.make_batch([[1] * 100, [1, 2]], [G.SamplingParams(max_new_tokens=40)] * 2, cfg)
  assert long.span == 0  # positions up to 139: the whole cache
  one = G.generate(p, cfg, [PROMPTS[1]], G.SamplingParams(max_new_tokens=12), eos_id=-1, vocab_limit=300)[0]
  want, want_lp = _greedy_recompute(p, cfg, PROMPTS[1], 12, 300)
  assert one.tokens == want
  np.testing.assert_allclose(one.logprobs, want_lp, atol=1e-4)
  full_state = short.start(p, cfg)
  _, full = G.decode_loop(p, full_state, cfg=cfg, max_steps=16, eos_id=-1, vocab_limit=300)
  assert np.asarray(full["token"])[0, :12].tolist() == want  # span 0 agrees with span 128
  u, cu = unstack_layers(p, cfg)
  assert "block_0" in u and "blocks" not in u and not cu.scan_layers
  assert (
    G.generate(u, cu, [PROMPTS[1]], G.SamplingParams(max_new_tokens=12), eos_id=-1, vocab_limit=300)[0].tokens
    == want
  )
  back, cb = stack_layers(u, cu)
  assert cb == cfg and jax.tree.all(jax.tree.map(lambda x, y: bool((x == y).all()), back, p))


def test_seeded_sampling_reproducible(params):
  sp = G.SamplingParams(temperature=1.0, max_new_tokens=16, seed=7)
  a = G.generate(params, CFG, PROMPTS, sp, eos_id=-1, vocab_limit=300)
  b = G.generate(params, CFG, PROMPTS, sp, eos_id=-1, vocab_limit=300)
  assert [g.tokens for g in a] == [g.tokens for g in b]
  # A row's draws depend on its own seed, not on the other rows of the batch.
  other = G.generate(params, CFG, [PROMPTS[0], [1, 99, 98], [1, 3]], sp, eos_id=-1, vocab_limit=300)
  assert other[0].tokens == a[0].tokens
  c = G.generate(params, CFG, PROMPTS, dataclasses.replace(sp, seed=8), eos_id=-1, vocab_limit=300)
  assert [g.tokens for g in c] != [g.tokens for g in a]
  greedy = G.generate(params, CFG, PROMPTS, G.SamplingParams(max_new_tokens=16), eos_id=-1, vocab_limit=300)
  assert [g.tokens for g in a] != [g.tokens for g in greedy]


def test_top_k_top_p_mask():
  logits = jnp.log(jnp.array([[0.05, 0.1, 0.25, 0.6]] * 5))
  top_k = jnp.array([0, 2, 0, 0, 3])
  top_p = jnp.array([1.0, 1.0, 0.5, 0.7, 0.85])
  mask = np.asarray(G.top_k_top_p_mask(logits, top_k, top_p))
  np.testing.assert_array_equal(
    mask,
    [
      [1, 1, 1, 1],  # off
      [0, 0, 1, 1],  # top-2
      [0, 0, 0, 1],  # 0.6 already covers 0.5
      [0, 0, 1, 1],  # 0.6 < 0.7 <= 0.85
      [0, 0, 1, 1],
    ],
  )  # top-3 renormalized: 0.63 < 0.85 <= 0.89


def test_top_k_one_is_greedy_and_vocab_limit_respected(params):
  greedy = G.generate(params, CFG, PROMPTS, G.SamplingParams(max_new_tokens=10), eos_id=-1, vocab_limit=300)
  for seed in (0, 1):
    k1 = G.generate(
      params,
      CFG,
      PROMPTS,
      G.SamplingParams(temperature=2.0, top_k=1, seed=seed, max_new_tokens=10),
      eos_id=-1,
      vocab_limit=300,
    )
    assert [g.tokens for g in k1] == [g.tokens for g in greedy]
  hot = G.generate(
    params, CFG, PROMPTS, G.SamplingParams(temperature=5.0, max_new_tokens=30), eos_id=-1, vocab_limit=100
  )
  assert max(max(g.tokens) for g in hot) < 100


def test_repetition_penalty_and_limits(params):
  plain = G.generate(params, CFG, PROMPTS, G.SamplingParams(max_new_tokens=20), eos_id=-1, vocab_limit=300)
  assert any(len(set(g.tokens)) < len(g.tokens) for g in plain)  # random models repeat themselves
  pen = G.generate(
    params,
    CFG,
    PROMPTS,
    G.SamplingParams(max_new_tokens=20, repetition_penalty=1e6),
    eos_id=-1,
    vocab_limit=300,
  )
  for prompt, g in zip(PROMPTS, pen, strict=True):
    assert len(set(g.tokens)) == len(g.tokens) and not set(g.tokens) & set(prompt)
  # Lengths: max_new_tokens per row, and never past max_seq_len.
  gens = G.generate(
    params,
    CFG,
    [[1] * 40, [1, 2]],
    [G.SamplingParams(max_new_tokens=30), G.SamplingParams(max_new_tokens=3)],
    eos_id=-1,
    vocab_limit=300,
  )
  assert len(gens[0].tokens) == CFG.max_seq_len - 40 and gens[0].finish_reason == "length"
  assert len(gens[1].tokens) == 3
  with pytest.raises(ValueError, match="prompt 0 has 48 tokens"):
    G.pad_prompts([[1] * 48], CFG)
  with pytest.raises(ValueError, match="top_p"):
    G.SamplingParams(top_p=0.0)


def test_eos_stops_without_emitting(params):
  first = G.generate(params, CFG, PROMPTS, G.SamplingParams(max_new_tokens=5), eos_id=-1, vocab_limit=300)
  toks = first[0].tokens
  i = next(i for i in range(1, 5) if toks[i] not in toks[:i])
  gens = G.generate(params, CFG, PROMPTS, G.SamplingParams(max_new_tokens=5), eos_id=toks[i], vocab_limit=300)
  assert gens[0].tokens == toks[:i] and gens[0].finish_reason == "stop"


class _CharTok:
  """Each id is one character (id 300 is half of a two-byte character: decodes to U+FFFD)."""

  def decode(self, ids):
    out = "".join("\ufffd" if i == 300 else chr(i) for i in ids)
    return out.replace("\ufffd" + chr(301), "é")


def test_text_stream_stops_and_holdback():
  s = G.TextStream(_CharTok(), stop=["END"])
  pieces = [s.push(ord(c)) for c in "abcEN"]
  assert "".join(pieces) == "abc"  # "EN" could still become "END"
  assert s.push(ord("X")) == "ENX"
  assert s.push(ord("E")) == "" and s.push(ord("N")) == "" and s.push(ord("D")) == ""
  assert s.finished and s.reason == "stop" and s.text == "abcENX"
  assert s.push(ord("z")) == ""
  # A character whose bytes span two ids is not shown half-way.
  u = G.TextStream(_CharTok())
  assert u.push(ord("a")) == "a" and u.push(300) == "" and u.push(301) == "é"
  # An output check cuts at its match and flags the reason.
  c = G.TextStream(_CharTok(), hold_chars=4, check=lambda t: t.find("bad") if "bad" in t else None)
  out = "".join(c.push(ord(ch)) for ch in "ok then bad stuff")
  assert c.finished and c.reason == "blocked" and (out + c.close()) == "ok then "


def test_stop_sequences_trimmed_in_generate_and_stream(params, tok):
  prompt = [tok.eos_id] + tok.encode("the cat")
  sp = G.SamplingParams(max_new_tokens=24)
  full = G.generate(params, CFG, [prompt], sp, tokenizer=tok)[0]
  text = full.text
  assert len(text) >= 6
  stop = text[3:6]
  cut = G.generate(params, CFG, [prompt], dataclasses.replace(sp, stop=(stop, "\x00never")), tokenizer=tok)[0]
  assert cut.text == text[: text.find(stop)] and cut.finish_reason == "stop"
  assert len(cut.tokens) < len(full.tokens)
  streamed = "".join(G.stream(params, CFG, tok, prompt, dataclasses.replace(sp, stop=(stop,))))
  assert streamed == cut.text
  assert "".join(G.stream(params, CFG, tok, prompt, sp)) == text


@pytest.mark.filterwarnings("ignore:.*context manager has been deprecated")
def test_sharded_decoding_matches(params, devices):
  from jax.sharding import Mesh

  mesh = Mesh(np.asarray(devices[:2]).reshape(1, 1, 2), ("data", "fsdp", "tensor"))
  rules = (
    ("batch", ("data", "fsdp")),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("act_heads", "tensor"),
    ("act_kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("act_mlp", "tensor"),
  )
  sp = G.SamplingParams(max_new_tokens=8)
  want = G.generate(params, CFG, PROMPTS, sp, eos_id=-1, vocab_limit=300)
  with G.mesh_context(mesh, rules):
    sharded = G.shard_params(params, CFG, mesh, rules)
    assert "tensor" in str(sharded["blocks"]["attn"]["key"]["kernel"].sharding.spec)
    got = G.generate(sharded, CFG, PROMPTS, sp, eos_id=-1, vocab_limit=300)
    cache = G.make_batch(PROMPTS, [sp] * 3, CFG).start(sharded, CFG).cache
    # the KV cache [layers, B, K, S, H] is sharded like the key/value projections: kv heads over tensor
    for leaf in jax.tree.leaves(cache):
      assert tuple(leaf.sharding.spec)[:3] == (None, None, "tensor"), leaf.sharding.spec
  assert [g.tokens for g in got] == [g.tokens for g in want]


def _cli(*args):
  """`python -m llm_jax.generate args` as users start it: a process of its own."""
  env = dict(os.environ, PYTHONPATH=REPO)
  return subprocess.run(
    [sys.executable, "-m", "llm_jax.generate", *args],
    capture_output=True,
    text=True,
    timeout=300,
    cwd=REPO,
    env=env,
  )


def _in_process(capsys, *args):
  """The same command run in this process (run_cmd): its compiled programs are kept for the next
  call, where a process each would import jax and build them again."""
  return run_captured(capsys, "llm_jax.generate", *args)


def test_cli_streams_from_package(tmp_path, params, tok, capsys):
  from llm_jax.artifacts import package

  package.write_package(str(tmp_path / "pkg"), params, CFG, tok.path, step=3)
  proc = _cli("--package", str(tmp_path / "pkg"), "--prompt", "the cat", "--max_new_tokens", "8")
  assert proc.returncode == 0, proc.stderr[-2000:]
  want = G.generate(
    params, CFG, [[tok.eos_id] + tok.encode("the cat")], G.SamplingParams(max_new_tokens=8), tokenizer=tok
  )[0].text
  assert proc.stdout == "the cat" + want + "\n"
  assert "loaded" in proc.stderr
  # speculative decoding (the model as its own draft): the same text, every proposal accepted
  spec = _in_process(
    capsys,
    "--package",
    str(tmp_path / "pkg"),
    "--draft",
    str(tmp_path / "pkg"),
    "--prompt",
    "the cat",
    "--max_new_tokens",
    "8",
  )
  assert spec.returncode == 0, spec.stderr[-2000:]
  assert spec.stdout == proc.stdout and "100% of draft tokens accepted" in spec.stderr
  # prompt lookup (no draft model): the same text
  look = _in_process(
    capsys, "--package", str(tmp_path / "pkg"), "--ngram=2", "--prompt", "the cat", "--max_new_tokens", "8"
  )
  assert look.returncode == 0, look.stderr[-2000:]
  assert look.stdout == proc.stdout and "of looked-up tokens accepted" in look.stderr
  # sampled: the model as its own draft keeps every proposal (p = q); a seed gives its text again
  args = ("--package", str(tmp_path / "pkg"), "--draft", str(tmp_path / "pkg"), "--prompt", "the cat")
  hot = [_in_process(capsys, *args, "--max_new_tokens=8", "--temperature=1.5", f"--seed={s}") for s in (5, 5)]
  assert hot[0].returncode == 0, hot[0].stderr[-2000:]
  assert hot[0].stdout == hot[1].stdout != proc.stdout and "100% of draft tokens accepted" in hot[0].stderr


def test_cli_warns_of_a_draft_with_another_tokenizer(tmp_path, params, tok, capsys):
  """A draft whose tokenizer has the same size but other pieces: the text is still the model's
  greedy one, and stderr says why proposals are refused."""
  from llm_jax.artifacts import package

  rng = random.Random(1)
  words = "alpha beta gamma delta epsilon zeta theta lambda sigma omega".split()
  texts = [" ".join(rng.choice(words) for _ in range(150)) + "\n" for _ in range(40)]
  other = train_tokenizer(texts, str(tmp_path / "other.model"), vocab_size=tok.vocab_size)
  package.write_package(str(tmp_path / "pkg"), params, CFG, tok.path, step=3)
  package.write_package(str(tmp_path / "draft"), params, CFG, other.path, step=3)
  args = ("--package", str(tmp_path / "pkg"), "--prompt", "the cat", "--max_new_tokens", "6")
  plain, spec = _in_process(capsys, *args), _in_process(capsys, *args, "--draft", str(tmp_path / "draft"))
  assert spec.returncode == 0, spec.stderr[-2000:]
  assert spec.stdout == plain.stdout and "warning: the draft's tokenizer differs" in spec.stderr
  assert "warning" not in _in_process(capsys, *args, "--draft", str(tmp_path / "pkg")).stderr


def test_cli_speculates_without_the_one_cache_on_a_gpu(tmp_path, params, tok, capsys, monkeypatch):
  """On a GPU the plain decode layout keeps every layer's keys and values in one cache (lever "kv"),
  but a speculative round's check reads it through gemms, and XLA copies each layer's slice of that
  cache first (docs/serving.md "The one cache and the check"): --draft and --ngram prepare both
  models without "kv". Seen failing before (the target and draft prepared with "qkv,norm,kv")."""
  import llm_jax.model
  from llm_jax.artifacts import package

  default_levers = llm_jax.model.default_levers
  assert default_levers(params, "gpu") == "qkv,norm,kv"
  assert default_levers(params, "gpu", speculative=True) == "qkv,norm"
  prepared, real = [], llm_jax.model.unstack_layers

  def unstack(p, cfg, levers):
    prepared.append(levers)
    return real(p, cfg, levers=levers)

  # the command imports both names afresh from llm_jax.model each run (run_cmd: runpy)
  monkeypatch.setattr(llm_jax.model, "unstack_layers", unstack)
  monkeypatch.setattr(llm_jax.model, "default_levers", functools.partial(default_levers, platform="gpu"))
  package.write_package(str(tmp_path / "pkg"), params, CFG, tok.path, step=3)
  args = ("--package", str(tmp_path / "pkg"), "--prompt", "the cat", "--max_new_tokens", "4")
  for extra in (("--draft", str(tmp_path / "pkg")), ("--ngram", "2")):
    got = _in_process(capsys, *args, *extra)
    assert got.returncode == 0, got.stderr[-2000:]
  assert prepared == ["qkv,norm"] * 3  # the target and its draft, then the target of prompt lookup


def test_cli_usage_errors_exit_2(tmp_path, capsys):
  both = _cli("--package=p", "--workdir=w", "--prompt=x")
  assert both.returncode == 2 and "package" in both.stderr and "workdir" in both.stderr
  bad = _in_process(capsys, f"--package={tmp_path}", "--prompt=x", "--top_p=0")
  assert bad.returncode == 2 and "top_p=0.0 must be in (0, 1]" in bad.stderr
  penalty = _in_process(
    capsys, f"--package={tmp_path}", f"--draft={tmp_path}", "--prompt=x", "--repetition_penalty=1.2"
  )
  assert penalty.returncode == 2 and "--draft takes no repetition penalty" in penalty.stderr
  penalty = _in_process(
    capsys, f"--package={tmp_path}", "--ngram=3", "--prompt=x", "--repetition_penalty=1.2"
  )
  assert penalty.returncode == 2 and "--ngram takes no repetition penalty" in penalty.stderr
  two = _in_process(capsys, f"--package={tmp_path}", f"--draft={tmp_path}", "--ngram=3", "--prompt=x")
  assert two.returncode == 2 and "draft" in two.stderr and "ngram" in two.stderr


def test_needs_filter_counts_only_live_rows():
  """A server's idle slots hold zeros (top_p 0): they must not send a sampled batch to the filtered
  draw (a sort over the vocabulary every step). Seen failing before the fix (as the switch's branch)."""
  state = G.empty_state(CFG, 4)
  temp = state.temperature_B.at[0].set(0.8)  # row 0 is a live request at temperature 0.8
  top_p = state.top_p_B.at[0].set(1.0)
  live = jnp.array([True, False, False, False])
  assert not bool(G.needs_filter(temp, state.top_k_B, top_p, live))
  assert bool(G.needs_filter(temp, state.top_k_B, top_p.at[0].set(0.9), live))
  assert not bool(G.needs_filter(temp.at[0].set(0.0), state.top_k_B, top_p.at[0].set(0.9), live))
  # a finished row that sampled with a filter no longer counts either
  temp2, top_k2 = temp.at[1].set(0.7), state.top_k_B.at[1].set(40)
  assert not bool(G.needs_filter(temp2, top_k2, top_p.at[1].set(1.0), live))
  assert bool(G.needs_filter(temp2, top_k2, top_p.at[1].set(1.0), live.at[1].set(True)))
  sp = G.SamplingParams
  assert not G.any_filtered([sp(temperature=0.8), sp(temperature=0.0, top_p=0.5)])
  assert G.any_filtered([sp(temperature=0.8), sp(temperature=0.5, top_k=40)])


def test_filtered_draw_keeps_unfiltered_rows_exact():
  """The draw that filters (static `filtered=True`) draws, for rows without top-k/top-p, exactly the
  tokens of the plain draw (a step's program may filter because another row does), and the choice
  made on the device (`filtered=None`) equals the static one either way. Seen failing before the fix:
  top-p 1 kept only the tokens whose cumulative mass, rounded in float32, stayed below 1."""
  v, b = 4096, 64
  # peaked, as a model's: the float32 cumulative mass reaches 1 before the tail (the old mask dropped
  # 1,962 tokens of these rows at top_p 1)
  logits = jax.random.normal(jax.random.key(1), (b, v)) * 3.0
  keys = jax.vmap(jax.random.key)(jnp.arange(b, dtype=jnp.uint32))
  temp, top_k, top_p = jnp.full((b,), 1.0), jnp.zeros((b,), jnp.int32), jnp.ones((b,))
  pen, seen = jnp.ones((b,)), jnp.zeros((b, v), bool)
  assert bool(G.top_k_top_p_mask(logits, top_k, top_p).all())
  draw = jax.jit(G.sample, static_argnames="filtered")
  plain = draw(logits, keys, temp, top_k, top_p, pen, seen, filtered=False)
  assert (draw(logits, keys, temp, top_k, top_p, pen, seen, filtered=True) == plain).all()
  assert (draw(logits, keys, temp, top_k, top_p, pen, seen, filtered=None) == plain).all()
  nucleus = top_p.at[0].set(0.05)
  both = draw(logits, keys, temp, top_k, nucleus, pen, seen, filtered=True)
  assert (both[1:] == plain[1:]).all()
  assert (draw(logits, keys, temp, top_k, nucleus, pen, seen, filtered=None) == both).all()


def test_stop_flag_reads_escapes_and_keeps_other_characters():
  """`--stop` reads \\n, \\t, \\uXXXX and the like, and takes every other character as written (a
  literal 日 became 'æ\\x97¥' through unicode_escape's Latin-1 and never matched)."""
  # a process of its own: importing the command here would leave its flags defined for the next
  # command a test runs in this worker (absl's DuplicateFlagError)
  code = (
    "from llm_jax.generate.__main__ import _parse_stop\n"
    "print(repr(_parse_stop(['日', '\\\\n\\\\n', 'a\\\\u65e5b', 'x\\\\ty', 'c:\\\\\\\\d', 'é', ''])))"
  )
  run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
  assert run.returncode == 0, run.stderr[-2000:]
  assert run.stdout.strip() == repr(("日", "\n\n", "a日b", "x\ty", "c:\\d", "é")), run.stdout


def test_a_completion_keeps_its_first_space_with_a_sentencepiece_model(params, tmp_path):
  """A LLaMA-2 style SentencePiece model's decoder drops a text's first space: a completion decoded
  alone lost the space before its first word ("the cat" + "sat" where the whole text reads "the cat
  sat"). generate and stream decode it after the prompt's end, as decoding both together does."""
  from hf_tokenizers import llama2_sentencepiece

  from llm_jax.data.hf_tokenizer import load_tokenizer

  rng = random.Random(0)
  words = ["".join(rng.choice("abcdefghijklmnop") for _ in range(rng.randrange(2, 6))) for _ in range(300)]
  texts = [" ".join(rng.choice(words) for _ in range(60)) for _ in range(60)]
  sp_tok = load_tokenizer(llama2_sentencepiece(tmp_path / "l2", texts, vocab_size=CFG.vocab_size))
  prompts = [[sp_tok.bos_id] + sp_tok.encode(" ".join(rng.sample(words, 3))) for _ in range(24)]
  sps = [G.SamplingParams(max_new_tokens=8, temperature=1.0, seed=k) for k in range(len(prompts))]
  gens = G.generate(params, CFG, prompts, sps, tokenizer=sp_tok)
  word_first = 0
  for p, g in zip(prompts, gens, strict=True):
    whole, head = sp_tok.decode(p + g.tokens), sp_tok.decode(p)
    assert g.text == whole[len(head) :], (p, g.tokens)
    if g.tokens and sp_tok.id_to_piece(g.tokens[0]).startswith("\u2581"):
      word_first += 1
      assert g.text.startswith(" ") and not sp_tok.decode(g.tokens).startswith(" ")
  assert word_first >= 2  # the case that failed: completions that begin with a word
  k = next(k for k, g in enumerate(gens) if g.text.startswith(" "))
  assert "".join(G.stream(params, CFG, sp_tok, prompts[k], sps[k])) == gens[k].text


def test_cli_stops_at_the_package_s_stop_ids(tmp_path, params, tok, capsys):
  """A package's `stop_ids` (an imported instruct model's end-of-turn ids) end the generate CLI's
  completion: the text before the id."""
  from llm_jax.artifacts import package

  prompt = [tok.eos_id] + tok.encode("the cat")
  toks = G.generate(params, CFG, [prompt], G.SamplingParams(max_new_tokens=8), tokenizer=tok)[0].tokens
  m = next(k for k in range(1, len(toks)) if toks[k] not in toks[:k])
  package.write_package(str(tmp_path / "pkg"), params, CFG, tok.path, step=3, stop_ids=[toks[m]])
  out = _in_process(
    capsys, "--package", str(tmp_path / "pkg"), "--prompt", "the cat", "--max_new_tokens", "8"
  )
  assert out.returncode == 0, out.stderr[-2000:]
  assert out.stdout == "the cat" + G.decode_after(tok, prompt, toks[:m]) + "\n"
