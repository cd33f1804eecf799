"""lm-evaluation-harness's `local-completions` against the server: its exact requests, parsed as it does.

`test_loglikelihood_replay` and `test_generate_until_replay` send the bodies LocalCompletionsAPI builds
(token-id prompts, batched; `max_tokens: 1, logprobs: 1, echo: true, temperature: 0` for scoring) and
parse the answers with its parser (lm_eval's own when installed, else the same slicing written here);
`test_lm_eval_end_to_end` runs lm_eval itself (tokenizer_backend=remote) when it is installed.
"""

import math
from operator import itemgetter

import httpx
import numpy as np
import pytest
from tiny_package import SERVER_CFG, write_tiny_package

from llm_jax.artifacts import open_model
from llm_jax.model import Decoder
from llm_jax.serve import app as app_lib

CFG = SERVER_CFG
MODEL = "pkg"


@pytest.fixture(scope="module")
def pkg(tmp_path_factory):
  return write_tiny_package(tmp_path_factory.mktemp("lmeval"), CFG, name=MODEL)[0]


@pytest.fixture(scope="module")
def server(pkg):
  s = app_lib.ServerSettings(
    package=str(pkg), slots=2, max_concurrent=4, decode_chunk=2, request_timeout_s=60.0, max_prompts=8
  )
  srv = app_lib.ServerThread(app_lib.create_app(s))
  srv.start()
  yield srv
  srv.stop()


@pytest.fixture(scope="module")
def reference(pkg):
  """log p(ids[t] | ids[:t]) for every t >= 1 and greediness, by the plain model (vocab-limited)."""
  import jax

  opened = open_model(str(pkg), dtype="float32")
  limit = opened.tokenizer.vocab_size

  def score(ids):
    logits = np.array(
      Decoder(opened.model_config).apply({"params": opened.params}, np.asarray([ids], np.int32))
    )[0, :-1]
    logits[:, limit:] = -np.inf
    logp = np.asarray(jax.nn.log_softmax(logits, axis=-1))
    return [float(logp[t - 1, ids[t]]) for t in range(1, len(ids))], [
      int(np.argmax(logp[t - 1])) == ids[t] for t in range(1, len(ids))
    ]

  return score


def _tokenize(url, text):
  r = httpx.post(f"{url}/tokenize", json={"prompt": text, "add_special_tokens": False})
  assert r.status_code == 200, r.text
  return r.json()["tokens"]


def _parse_logprobs(outputs, ctxlens):
  """LocalCompletionsAPI.parse_logprobs (lm_eval's own when it is installed)."""
  try:
    from lm_eval.models.openai_completions import LocalCompletionsAPI

    return LocalCompletionsAPI.parse_logprobs(outputs=outputs, ctxlens=ctxlens)
  except ImportError:
    pass
  res = []
  for out in outputs if isinstance(outputs, list) else [outputs]:
    for choice, ctxlen in zip(sorted(out["choices"], key=itemgetter("index")), ctxlens, strict=True):
      assert ctxlen > 0
      lps = choice["logprobs"]["token_logprobs"][ctxlen:-1]
      tops = choice["logprobs"]["top_logprobs"][ctxlen:-1]
      greedy = all(tok == max(top.values()) for tok, top in zip(lps, tops, strict=True))
      res.append((sum(lps), greedy))
  return res


def _parse_generations(outputs):
  res = []
  for out in outputs if isinstance(outputs, list) else [outputs]:
    tmp = [None] * len(out["choices"])
    for c in out["choices"]:
      tmp[c["index"]] = c["text"]
    res += tmp
  return res


def test_tokenizer_endpoints_as_remote_tokenizer_reads_them(server):
  info = httpx.get(f"{server.url}/tokenizer_info").json()
  assert info["eos_token"] == "</s>" and info["model_max_length"] == 32
  # lm_eval's RemoteTokenizer: eos_token_id = encode(eos_token)[0]; prefix = encode(bos_token)[0]
  assert _tokenize(server.url, info["eos_token"]) == [2]
  assert _tokenize(server.url, info["bos_token"]) == info["prompt_prefix"] == [2]
  ids = _tokenize(server.url, "the cat sat")
  r = httpx.post(f"{server.url}/detokenize", json={"tokens": ids}).json()
  assert r == {"prompt": "the cat sat"}
  full = httpx.post(
    f"{server.url}/tokenize", json={"prompt": "the cat sat", "return_token_strs": True}
  ).json()
  assert full["tokens"] == [2] + ids and full["count"] == len(ids) + 1 and full["max_model_len"] == 32
  assert "".join(full["token_strs"][1:]) == "the cat sat"
  assert httpx.post(f"{server.url}/detokenize", json={"tokens": [999]}).status_code == 400


def test_loglikelihood_replay(server, reference):
  url = server.url
  prefix = _tokenize(url, httpx.get(f"{url}/tokenizer_info").json()["bos_token"])[0]
  pairs = [("the cat", " sat on"), ("def return", " import"), ("", "the mat")]
  inputs, ctxlens = [], []
  for context, continuation in pairs:  # TemplateLM._encode_pair, then batch_loglikelihood_requests
    if context:
      whole = _tokenize(url, context + continuation)
      context_enc = _tokenize(url, context)
      continuation_enc = whole[len(context_enc) :]
    else:
      context_enc, continuation_enc = [prefix], _tokenize(url, continuation)
    inputs.append(context_enc + continuation_enc)
    ctxlens.append(len(context_enc))
  body = {
    "model": MODEL,
    "prompt": inputs,
    "temperature": 0,
    "max_tokens": 1,
    "logprobs": 1,
    "seed": 1234,
    "echo": True,
  }
  r = httpx.post(f"{url}/v1/completions", json=body, timeout=60)
  assert r.status_code == 200, r.text
  out = r.json()
  assert [c["index"] for c in out["choices"]] == [0, 1, 2]
  for c, ids in zip(out["choices"], inputs, strict=True):
    lp = c["logprobs"]
    assert len(lp["token_logprobs"]) == len(ids) + 1  # the prompt, then the one generated token
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
  results = _parse_logprobs([out], ctxlens)
  for (ll, greedy), ids, ctxlen in zip(results, inputs, ctxlens, strict=True):
    lps, argmax = reference(ids)
    assert math.isclose(ll, sum(lps[ctxlen - 1 :]), abs_tol=1e-4), (ll, lps)
    assert greedy == all(argmax[ctxlen - 1 :])
  # max_tokens 0 with echo scores the prompt alone: the same numbers, nothing generated
  r0 = httpx.post(f"{url}/v1/completions", json={**body, "max_tokens": 0}, timeout=60).json()
  for c0, c, ids in zip(r0["choices"], out["choices"], inputs, strict=True):
    assert c0["logprobs"]["token_logprobs"] == c["logprobs"]["token_logprobs"][: len(ids)]
    assert c0["finish_reason"] == "length" and r0["usage"]["completion_tokens"] == 0


def test_generate_until_replay(server):
  url = server.url
  contexts = ["the cat", "def return import"]
  encodings = [_tokenize(url, c) for c in contexts]
  body = {
    "prompt": encodings,
    "model": MODEL,
    "max_tokens": 6,
    "temperature": 0,
    "stop": ["\n\n", "</s>"],
    "seed": 1234,
  }
  r = httpx.post(f"{url}/v1/completions", json=body, timeout=60)
  assert r.status_code == 200, r.text
  texts = _parse_generations([r.json()])
  for ids, text in zip(encodings, texts, strict=True):  # each as a single request: the same greedy text
    one = httpx.post(f"{url}/v1/completions", json={**body, "prompt": ids}, timeout=60).json()
    assert one["choices"][0]["text"] == text


def test_text_prompt_echo_offsets(server):
  url = server.url
  prompt = "the cat é☃ sat"
  r = httpx.post(
    f"{url}/v1/completions",
    json={"prompt": prompt, "max_tokens": 2, "temperature": 0, "logprobs": 1, "echo": True},
    timeout=60,
  ).json()
  c, ids = r["choices"][0], _tokenize(url, prompt)
  lp = c["logprobs"]
  assert len(lp["tokens"]) >= len(ids) and lp["token_logprobs"][0] is None
  assert r["usage"]["prompt_tokens"] == len(ids) + 1  # + the hidden prefix (EOS)
  offsets = lp["text_offset"]
  assert offsets == sorted(offsets) and offsets[0] == 0 and offsets[-1] <= len(c["text"])
  head = httpx.post(f"{url}/detokenize", json={"tokens": ids[:3]}).json()["prompt"]
  assert offsets[3] == len(head)  # characters of the returned text, not of placeholders


def test_lm_eval_end_to_end(server, reference):
  """lm_eval's LocalCompletionsAPI itself, with the remote tokenizer (skipped without lm_eval)."""
  pytest.importorskip("lm_eval")
  from lm_eval.api.instance import Instance
  from lm_eval.models.openai_completions import LocalCompletionsAPI

  lm = LocalCompletionsAPI(
    base_url=f"{server.url}/v1/completions",
    model=MODEL,
    tokenizer_backend="remote",
    max_length=32,
    batch_size=2,
    max_retries=1,
  )
  reqs = [
    Instance("loglikelihood", {}, ("the cat", " sat on"), 0),
    Instance("loglikelihood", {}, ("def", " return"), 1),
  ]
  results = lm.loglikelihood(reqs, disable_tqdm=True)
  for (ll, greedy), inst in zip(results, reqs, strict=True):
    ctx, cont = inst.args
    ids = _tokenize(server.url, ctx + cont)
    n_ctx = len(_tokenize(server.url, ctx))
    lps, argmax = reference(ids)
    assert math.isclose(ll, sum(lps[n_ctx - 1 :]), abs_tol=1e-4)
    assert greedy == all(argmax[n_ctx - 1 :])
  gens = lm.generate_until(
    [Instance("generate_until", {}, ("the cat", {"until": ["\n"], "max_gen_toks": 4}), 0)], disable_tqdm=True
  )
  assert len(gens) == 1 and isinstance(gens[0], str)
