"""/v1/chat/completions through the openai client (streamed and not), over a package whose model.json
records the SFT chat template it was fine-tuned with."""

import dataclasses

import httpx
import ml_collections
import pytest
from tiny_package import SERVER_CFG, write_tiny_package

from llm_jax.artifacts import opened as opened_lib
from llm_jax.data.tokenizer import Tokenizer
from llm_jax.serve import app as app_lib

CFG = dataclasses.replace(SERVER_CFG, max_seq_len=64)
TURN = "[{role}] {content}\n"
KEY = "c" * 24
MESSAGES = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "the cat"}]


@pytest.fixture(scope="module")
def pkg(tmp_path_factory):
  chat = {"prompt": "Q: {prompt}\nA: ", "turn": TURN}
  return write_tiny_package(tmp_path_factory.mktemp("chat"), CFG, chat_template=chat)[0]


@pytest.fixture(scope="module")
def server(pkg):
  s = app_lib.ServerSettings(
    package=str(pkg),
    slots=2,
    max_concurrent=4,
    decode_chunk=2,
    request_timeout_s=60.0,
    api_key=KEY,
    audit_log=str(pkg.parent / "a.jsonl"),
  )
  srv = app_lib.ServerThread(app_lib.create_app(s))
  srv.start()
  yield srv
  srv.stop()


def _client(server):
  import openai

  return openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0)


def test_prompt_is_the_sft_rendering(server, pkg):
  tok = Tokenizer.load(str(pkg / "tokenizer.model"))
  r = httpx.post(
    f"{server.url}/tokenize", json={"messages": MESSAGES}, headers={"Authorization": f"Bearer {KEY}"}
  ).json()
  # BOS, then each piece tokenized alone, as llm_jax.finetune.sft.tokenize does, then the header
  want = [tok.bos_id]
  for piece in ["[system] ", "be brief", "\n", "[user] ", "the cat", "\n", "[assistant] "]:
    want += tok.encode(piece)
  assert r["tokens"] == want
  info = httpx.get(f"{server.url}/tokenizer_info", headers={"Authorization": f"Bearer {KEY}"}).json()
  jinja2 = pytest.importorskip("jinja2")
  text = jinja2.Template(info["chat_template"]).render(messages=MESSAGES, add_generation_prompt=True)
  assert text == "<s>[system] be brief\n[user] the cat\n[assistant] "


def test_chat_matches_completion_of_the_rendered_prompt(server):
  client = _client(server)
  r = client.chat.completions.create(model="pkg", messages=MESSAGES, max_tokens=6, temperature=0)
  c = r.choices[0]
  assert r.object == "chat.completion" and c.message.role == "assistant"
  assert c.finish_reason in ("stop", "length") and r.usage.completion_tokens <= 6
  hdr = {"Authorization": f"Bearer {KEY}"}
  ids = httpx.post(f"{server.url}/tokenize", json={"messages": MESSAGES}, headers=hdr).json()["tokens"]
  plain = httpx.post(
    f"{server.url}/v1/completions",
    headers=hdr,
    timeout=60,
    json={"prompt": ids, "max_tokens": 6, "temperature": 0, "stop": ["[user]"]},
  ).json()["choices"][0]
  want = plain["text"]
  if plain["finish_reason"] == "stop" and want.endswith("\n"):
    want = want[:-1]  # the template's tail after the assistant's content
  assert c.message.content == want
  assert r.usage.prompt_tokens == len(ids)


def test_chat_stream_equals_non_stream(server):
  client = _client(server)
  whole = client.chat.completions.create(model="pkg", messages=MESSAGES, max_tokens=8, temperature=0)
  chunks = list(
    client.chat.completions.create(
      model="pkg",
      messages=MESSAGES,
      max_tokens=8,
      temperature=0,
      stream=True,
      stream_options={"include_usage": True},
    )
  )
  assert chunks[0].choices[0].delta.role == "assistant"
  text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
  finish = [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason]
  assert text == whole.choices[0].message.content
  assert finish == [whole.choices[0].finish_reason]
  assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_chat_logprobs_limits_and_key(server):
  client = _client(server)
  r = client.chat.completions.create(
    model="pkg", messages=MESSAGES, max_tokens=3, temperature=0, logprobs=True, top_logprobs=2
  )
  content = r.choices[0].logprobs.content
  assert len(content) == r.usage.completion_tokens
  assert all(e.logprob == max(t.logprob for t in e.top_logprobs) for e in content)  # greedy
  import openai

  with pytest.raises(openai.BadRequestError) as e:  # 400: past the context (OpenAI and vLLM answer 400)
    client.chat.completions.create(model="pkg", messages=MESSAGES, max_tokens=64)
  assert e.value.status_code == 400
  bad = openai.OpenAI(base_url=f"{server.url}/v1", api_key="wrong" * 4, max_retries=0)
  with pytest.raises(openai.AuthenticationError):
    bad.chat.completions.create(model="pkg", messages=MESSAGES, max_tokens=2)


def test_chat_logprob_bytes_are_the_text_bytes(server):
  """Each logprobs entry's `bytes` (and each top_logprobs entry's) are the UTF-8 bytes the token adds
  to the text: joined, they are the content (they were the UTF-8 of strings like 'bytes:\\x13')."""
  client = _client(server)
  r = client.chat.completions.create(
    model="pkg", messages=MESSAGES, max_tokens=8, temperature=0, logprobs=True, top_logprobs=3
  )
  c = r.choices[0]
  content = c.logprobs.content  # the content is cut before a stop sequence or the template's tail
  text = b"".join(bytes(e.bytes) for e in content).decode("utf-8", errors="replace")
  assert text.startswith(c.message.content) and len(c.message.content) > 0
  assert all(len(e.bytes) == 1 for e in content if e.token.startswith("bytes:"))
  for e in content:
    assert any(t.token == e.token and t.bytes == e.bytes for t in e.top_logprobs)  # greedy
    for t in e.top_logprobs:
      assert t.bytes == (
        [int(t.token[len("bytes:\\x") :], 16)] if t.token.startswith("bytes:") else list(t.token.encode())
      )


def test_developer_role_is_system(server):
  """OpenAI's `developer` role (its newer name of `system`) renders and answers as `system` (was 422)."""
  headers = {"Authorization": f"Bearer {KEY}"}
  as_dev = [{"role": "developer", "content": "be brief"}, MESSAGES[1]]
  ids = [
    httpx.post(f"{server.url}/tokenize", json={"messages": m}, headers=headers).json()["tokens"]
    for m in (as_dev, MESSAGES)
  ]
  assert ids[0] == ids[1]
  client = _client(server)
  answers = [
    client.chat.completions.create(model="pkg", messages=m, max_tokens=4, temperature=0).choices[0]
    for m in (as_dev, MESSAGES)
  ]
  assert answers[0].message.content == answers[1].message.content


@pytest.mark.parametrize("logprobs", [None, False])
def test_top_logprobs_needs_logprobs(server, logprobs):
  """top_logprobs without logprobs: true is 400 naming top_logprobs (OpenAI and vLLM reject it)."""
  body = {"messages": MESSAGES, "max_tokens": 2, "top_logprobs": 2}
  if logprobs is not None:
    body["logprobs"] = logprobs
  r = httpx.post(
    f"{server.url}/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {KEY}"}, timeout=60
  )
  assert r.status_code == 400, r.text
  err = r.json()["error"]
  assert err["param"] == "top_logprobs" and "logprobs" in err["message"]


def test_run_template_comes_from_sft_config():
  sft = ml_collections.ConfigDict(
    {"train_file": "x.jsonl", "prompt_template": "P {prompt}", "turn_template": TURN}
  )
  config = ml_collections.ConfigDict({"finetune": {"sft": sft}})
  assert opened_lib._chat_template(config) == {"prompt": "P {prompt}", "turn": TURN}
  sft.train_file = ""
  assert opened_lib._chat_template(config) is None


def test_chat_stops_at_its_template_stop_ids(server, pkg, monkeypatch):
  """The ids `chat.stop_ids_of` gives (a special user header or end-of-turn token) end the reply:
  the content before the id, finish "stop", the id counted (here the fourth token of the greedy
  reply stands in for such an id: this tokenizer has none)."""
  from llm_jax.serve import chat
  from llm_jax.serve.prompts import token_str

  client = _client(server)
  whole = client.chat.completions.create(
    model="pkg", messages=MESSAGES, max_tokens=8, temperature=0, logprobs=True
  ).choices[0]
  tok = Tokenizer.load(str(pkg.parent / "tok.model"))
  strs = [t.token for t in whole.logprobs.content]
  by_str: dict[str, list[int]] = {}
  for i in range(tok.vocab_size):
    by_str.setdefault(token_str(tok, i), []).append(i)
  m = next(k for k in range(2, len(strs)) if strs[k] not in strs[:k] and len(by_str[strs[k]]) == 1)
  monkeypatch.setattr(chat, "stop_ids_of", lambda tok, templates: (by_str[strs[m]][0],))
  r = client.chat.completions.create(model="pkg", messages=MESSAGES, max_tokens=8, temperature=0)
  want = tok.decode([by_str[t][0] for t in strs[:m]])  # ids of the same text as those drawn
  assert r.choices[0].message.content == want and r.choices[0].finish_reason == "stop"
  assert r.usage.completion_tokens == m + 1


def test_stop_ids_of_special_turn_tokens(tmp_path, pkg):
  """A tokenizer.json whose special tokens the template uses: the user header's own special token
  (<|user|>) and the tail's end-of-turn token are stop ids; a header token every role shares is not,
  and llm_jax's own SentencePiece tokenizer (templates are text there) has none."""
  from hf_tokenizers import byte_level_bpe

  from llm_jax.data.hf_tokenizer import load_tokenizer
  from llm_jax.finetune import sft
  from llm_jax.serve import chat

  raw = byte_level_bpe(tmp_path, ["the cat sat on the mat " * 20, "user assistant " * 20], vocab_size=300)
  raw.add_special_tokens(["<|user|>", "<|assistant|>", "<|system|>", "<|start|>", "<|end|>", "<|eot|>"])
  raw.save(str(tmp_path / "tokenizer.json"))
  tok = load_tokenizer(str(tmp_path))
  user, eot = tok.encode("<|user|>")[0], tok.encode("<|eot|>")[0]
  assert chat.stop_ids_of(tok, sft.Templates()) == (user,)
  llama3 = sft.Templates(turn="<|start|>{role}<|end|>\n\n{content}<|eot|>")
  assert chat.stop_ids_of(tok, llama3) == (eot,)
  assert chat.stop_ids_of(Tokenizer.load(str(pkg.parent / "tok.model")), sft.Templates()) == ()
