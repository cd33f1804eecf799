"""SFT data: the loss mask covers exactly the response tokens; packing isolates examples; bad lines."""

import functools
import json

import jax
import numpy as np
import pytest

from llm_jax.data.tokenizer import train_tokenizer
from llm_jax.finetune import sft
from llm_jax.model import Decoder, ModelConfig
from llm_jax.train import step as step_lib

RECORDS = [
  {"prompt": "Add two numbers.", "response": "def add(a, b):\n    return a + b"},
  {
    "messages": [
      {"role": "system", "content": "Be brief."},
      {"role": "user", "content": "Say hi."},
      {"role": "assistant", "content": "hi"},
      {"role": "user", "content": "Again?"},
      {"role": "assistant", "content": "hi again"},
    ]
  },
  {"prompt": "Name a fruit.", "response": "apple"},
]


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
  text = json.dumps(RECORDS) + "<|>#### Prompt:Response:systemuserassistant\n"
  path = tmp_path_factory.mktemp("sft") / "tok.model"
  return train_tokenizer([text * 10], str(path), vocab_size=300, model_type="char")


def write(tmp_path, lines, name="d.jsonl"):
  path = tmp_path / name
  path.write_text("\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n")
  return str(path)


def test_mask_covers_exactly_the_response(tok):
  t = sft.Templates()
  ids, w = sft.tokenize(RECORDS[0], tok, t)
  assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id and w[-1] == 1.0 and w[0] == 0.0
  assert tok.decode(ids[w == 1][:-1]) == RECORDS[0]["response"]
  assert tok.decode(ids[1:][w[1:] == 0]) == t.prompt.format(prompt=RECORDS[0]["prompt"])
  ids, w = sft.tokenize(RECORDS[1], tok, t)
  assert tok.decode(ids[w == 1][:-1]) == "hi\nhi again\n"  # assistant contents and their tails
  assert "Say hi." in tok.decode(ids[w == 0]) and "Be brief." in tok.decode(ids[w == 0])


def test_packed_rows_isolate_examples_and_weight_only_responses(tok):
  t = sft.Templates(prompt="Q: {prompt}\nA: ")
  examples = [sft.tokenize(r, tok, t) for r in RECORDS]
  rows = sft.pack(examples, seq_len=96)
  assert rows["inputs"].shape[1] == 96 and len(rows["inputs"]) < len(RECORDS)  # some packed together
  # Every example's (inputs, targets, weights) appears intact inside one row, positions from 0.
  for ids, w in examples:
    found = False
    for r in range(len(rows["inputs"])):
      for s in set(rows["segment_ids"][r]) - {0}:
        sel = rows["segment_ids"][r] == s
        if len(ids) - 1 == sel.sum() and np.array_equal(rows["inputs"][r][sel], ids[:-1]):
          np.testing.assert_array_equal(rows["targets"][r][sel], ids[1:])
          np.testing.assert_array_equal(rows["weights"][r][sel], w[1:])
          np.testing.assert_array_equal(rows["positions"][r][sel], np.arange(sel.sum()))
          found = True
    assert found
  assert rows["weights"][rows["segment_ids"] == 0].sum() == 0  # padding is never trained
  # The packed loss equals the sum of the examples' own losses: no attention across segments.
  cfg = ModelConfig(
    vocab_size=304,
    num_layers=1,
    d_model=32,
    num_heads=4,
    num_kv_heads=4,
    head_dim=8,
    mlp_dim=64,
    max_seq_len=96,
  )
  model = Decoder(cfg)
  params = model.init(jax.random.key(0), rows["inputs"][:1])["params"]
  ev = jax.jit(functools.partial(step_lib.eval_step, model=model, num_domains=1))
  packed = float(ev(params, rows)["nll_sum"])
  alone = 0.0
  for ids, w in examples:
    n = len(ids) - 1
    b = {"inputs": ids[None, :-1], "targets": ids[None, 1:], "weights": w[None, 1:]}
    pad = {k: np.pad(v, ((0, 0), (0, 96 - n))) for k, v in b.items()}
    alone += float(ev(params, pad)["nll_sum"])
  np.testing.assert_allclose(packed, alone, rtol=1e-5)


def test_long_examples_are_cut_and_loader_is_resumable(tok, tmp_path):
  path = write(tmp_path, RECORDS * 4)
  rows = sft.load(path, tok, 40, sft.Templates(prompt="{prompt}\n"))
  assert rows["inputs"].shape[1] == 40 and len(rows["inputs"]) >= 4
  loader = sft.SFTLoader(rows, global_batch_size=4, seed=3)
  first = [next(loader) for _ in range(3)]
  state = loader.get_state()
  nxt = next(loader)
  again = sft.SFTLoader(rows, global_batch_size=4, seed=3)
  again.set_state(state)
  np.testing.assert_array_equal(next(again)["inputs"], nxt["inputs"])
  np.testing.assert_array_equal(again.batch_at(0)["inputs"], first[0]["inputs"])
  with pytest.raises(sft.SFTError, match="seed"):
    sft.SFTLoader(rows, global_batch_size=4, seed=4).set_state(state)
  batches = list(sft.eval_batches(rows, batch_size=4))
  assert sum(float(b["weights"].sum()) for b in batches) == rows["weights"].sum()


@pytest.mark.parametrize(
  "line, match",
  [
    ('{"prompt": "x"', r"d.jsonl:2: not valid JSON"),
    ('{"prompt": "x"}', r"d.jsonl:2: missing key 'response'"),
    ('{"prompt": "x", "response": ""}', r"d.jsonl:2: 'response' is empty"),
    ('{"messages": [{"role": "user", "content": "x"}]}', r"d.jsonl:2: no assistant message"),
    ('{"messages": [{"role": "bot", "content": "x"}]}', r"d.jsonl:2: messages\[0\].role='bot'"),
    ("[1, 2]", r"d.jsonl:2: a line must be a JSON object"),
    ('{"prompt": "x\\ud800", "response": "y"}', r"d.jsonl:2: 'prompt' holds a lone surrogate \(U\+D800"),
    (
      '{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "\\udfff"}]}',
      r"d.jsonl:2: messages\[1\].content holds a lone surrogate",
    ),
  ],
)
def test_bad_lines_name_file_and_line(tmp_path, line, match):
  path = write(tmp_path, [RECORDS[0], line])
  with pytest.raises(sft.SFTError, match=match):
    sft.read_jsonl(path)


def test_json_lines_as_writers_write_them(tmp_path):
  """Valid JSON lines the reader refused: U+2028 / U+2029 / U+0085 written raw inside a string
  (json.dumps(ensure_ascii=False) writes them so; splitlines cut the line there), a UTF-8 BOM, CRLF
  line ends; and chat messages as the server takes them (role developer, content as text parts)."""
  recs = [
    {"prompt": "a\u2028b", "response": "c\u2029d\u0085e"},
    {
      "messages": [
        {"role": "developer", "content": "be brief"},
        {"role": "user", "content": [{"type": "text", "text": "the "}, {"type": "text", "text": "cat"}]},
        {"role": "assistant", "content": "sat"},
      ]
    },
  ]
  path = tmp_path / "w.jsonl"
  path.write_bytes(b"\xef\xbb\xbf" + "\r\n".join(json.dumps(r, ensure_ascii=False) for r in recs).encode())
  got = sft.read_jsonl(str(path))
  assert got[0] == recs[0]
  assert [(m["role"], m["content"]) for m in got[1]["messages"]] == [
    ("system", "be brief"),
    ("user", "the cat"),
    ("assistant", "sat"),
  ]


def test_bad_templates_name_the_key():
  with pytest.raises(sft.SFTError, match="finetune.sft.prompt_template"):
    sft.Templates(prompt="no field").check()
  with pytest.raises(sft.SFTError, match="finetune.sft templates"):
    sft.Templates(prompt="{prompt} {other}").check()


def test_examples_beyond_the_context_name_the_file_and_record(tok, tmp_path, caplog):
  """Cut or dropped examples (no response token within train.seq_len) are named by file and first
  record; when none is left the error names the file (it named neither)."""
  path = write(tmp_path, [RECORDS[2], {"prompt": "x" * 200, "response": "y"}, RECORDS[2]])
  with caplog.at_level("WARNING"):
    sft.load(path, tok, seq_len=80, templates=sft.Templates())
  assert f"{path}: 1 examples had no response token" in caplog.text and "the first: record 2" in caplog.text
  with pytest.raises(sft.SFTError, match=rf"{path}: no example has a response token within train.seq_len=4"):
    sft.load(path, tok, seq_len=4, templates=sft.Templates())
