"""Fine-tuning an imported model on its own tokenizer: a GPT-2-shaped Hugging Face checkpoint whose
tokenizer.json (byte-level BPE, trained here with `tokenizers`, <|endoftext|> the last id) is not
llm_jax's SentencePiece model, and a LLaMA-shaped one with a LLaMA-2 style SentencePiece model (unk 0,
bos 1, eos 2, no pad). The data is prepared with the source's tokenizer (documents separated by its
EOS), the run directory holds its files, and the run opens, generates and exports with it.

Full fine-tuning, LoRA and SFT run through the real train command (tests/run_cmd.py).
"""

import hashlib
import json
import os
import random
import shutil

import httpx
import jax
import numpy as np
import pytest
from hf_tokenizers import byte_level_bpe, llama2_sentencepiece
from run_cmd import run_command

from llm_jax import config as config_lib
from llm_jax.artifacts import hf, open_model
from llm_jax.data import hf_tokenizer, shards
from llm_jax.data.prepare import key as key_lib
from llm_jax.data.tokenizer import train_tokenizer
from llm_jax.finetune import extension as finetune
from llm_jax.serve import app as app_lib

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "hf")
WORDS = "alpha beta gamma delta value total count index item name data result list text line".split()
SAMPLE = "alpha beta total, item 42: naïve line"
# The GPT-2 fixture's architecture as config.model keys (what init_from checks).
GPT2 = {
  "model.positions": "learned",
  "model.norm": "layernorm",
  "model.activation": "gelu",
  "model.d_model": 16,
  "model.num_heads": 2,
  "model.num_layers": 2,
  "model.mlp_dim": 64,
  "model.max_seq_len": 32,
  "model.vocab_size": 320,
  "model.tie_embeddings": True,
  "model.use_bias": True,
  "model.norm_eps": 3e-5,
}
LLAMA = {
  "model.positions": "rope",
  "model.norm": "rmsnorm",
  "model.activation": "swiglu",
  "model.d_model": 16,
  "model.num_heads": 4,
  "model.num_kv_heads": 2,
  "model.head_dim": 8,
  "model.mlp_dim": 24,
  "model.num_layers": 2,
  "model.max_seq_len": 64,
  "model.vocab_size": 320,
  "model.tie_embeddings": False,
  "model.use_bias": False,
  "model.rope_theta": 5000.0,
  "model.rope_scaling": "llama3",
  "model.rope_scaling_factor": 4.0,
  "model.rope_low_freq_factor": 0.25,
  "model.rope_high_freq_factor": 2.0,
  "model.rope_original_max_len": 16,
}


def _hf_dir(root, family: str, make_tokenizer) -> str:
  """The golden fixture's config.json + weights with a tokenizer made by `make_tokenizer(dir)`."""
  out = root / family
  os.makedirs(out)
  for name in ("config.json", "model.safetensors"):
    shutil.copy(os.path.join(FIXTURES, family, name), out / name)
  make_tokenizer(out)
  tok = hf_tokenizer.load_tokenizer(str(out))
  config = json.loads((out / "config.json").read_text())
  config.update(bos_token_id=tok.bos_id, eos_token_id=tok.eos_id)
  (out / "config.json").write_text(json.dumps(config))
  return str(out)


@pytest.fixture(scope="module")
def env(tmp_path_factory, devices):
  root = tmp_path_factory.mktemp("hftok")
  rng = random.Random(0)
  os.makedirs(root / "corpus")
  docs = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(30, 60))) + ".\n" for _ in range(40)]
  for i, doc in enumerate(docs):
    (root / "corpus" / f"d{i}.txt").write_text(doc)
  gpt2 = _hf_dir(root, "gpt2", lambda d: byte_level_bpe(d, docs * 3, vocab_size=300, specials_last=True))
  llama = _hf_dir(
    root, "llama", lambda d: shutil.move(llama2_sentencepiece(root / "sp", docs * 3), d / "tokenizer.model")
  )
  sft = root / "sft.jsonl"
  sft.write_text(
    "\n".join(json.dumps({"prompt": f"item {i}", "response": f"value {i} total"}) for i in range(24)) + "\n"
  )
  old = jax.config.jax_compilation_cache_dir
  jax.config.update("jax_compilation_cache_dir", str(root / "xla_cache"))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
  over = {
    "data.corpus": f"{root}/corpus/*.txt",
    "data.cache_dir": str(root / "data_cache"),
    "data.mixture": "",
    "data.val_fraction": 0.15,
    "data.near_dup_threshold": 0.0,
    "train.seq_len": 32,
    "train.global_batch_size": 8,
    "train.steps": 6,
    "train.warmup_steps": 1,
    "train.learning_rate": 3e-3,
    "train.eval_every": 6,
    "train.eval_batches": 1,
    "train.checkpoint_every": 3,
    "train.sample_every": 0,
    "train.log_every": 1,
    "train.preflight": False,
    "sharding.data": 8,
  }
  yield {"root": root, "gpt2": gpt2, "llama": llama, "over": over, "sft": str(sft), "docs": docs}
  jax.config.update("jax_compilation_cache_dir", old)


def _flags(over: dict) -> list[str]:
  return [f"--config.{k}={v}" for k, v in over.items()]


def _train(env, config: str, workdir: str, **over) -> list[dict]:
  """Runs `python -m llm_jax.train`; returns metrics.jsonl's training lines."""
  args = [f"--config=configs/{config}", f"--workdir={workdir}", *_flags({**env["over"], **over})]
  assert run_command("llm_jax.train", *args) == 0
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [r for r in map(json.loads, f) if "loss" in r]


def _first_shard(prepared_dir: str) -> tuple[np.ndarray, np.ndarray]:
  manifest = json.loads(open(os.path.join(prepared_dir, "manifest.json")).read())
  shard = shards.open_split(prepared_dir, "train", manifest)[0]
  return np.asarray(shard.tokens), shard.offsets


def test_a_tokenizer_json_source_prepares_data_on_its_own_tokenizer(env):
  """Before: refused ('reuse_source_tokenizer needs an llm_jax SentencePiece tokenizer')."""
  config = config_lib.load("configs/base.py", {**env["over"], **GPT2, "init_from": env["gpt2"]})
  ext = finetune.FinetuneExtension()
  ext.validate(config)
  with config.unlocked():
    ext.resolve_config(config)
  assert config.reuse_source_tokenizer  # a foreign tokenizer is always the source's
  source = hf_tokenizer.load_tokenizer(env["gpt2"])
  assert source.eos_id == source.vocab_size - 1 and source.eos_id not in (0, 2)
  prepared = ext.prepare_data(config)
  tok = prepared.tokenizer()
  assert isinstance(tok, hf_tokenizer.HFTokenizer) and tok.sha256 == source.sha256
  assert (tok.eos_id, tok.bos_id, tok.pad_id) == (source.eos_id, source.bos_id, source.pad_id)
  assert sorted(os.path.basename(f) for f in prepared.tokenizer_files()) == [
    "tokenizer.json",
    "tokenizer_config.json",
  ]
  m = prepared.manifest["tokenizer"]
  assert m["eos_id"] == source.eos_id and m["type"] == "HFTokenizer"
  tokens, offsets = _first_shard(prepared.dir)
  assert tokens.dtype == np.uint16
  assert tokens[0] == source.eos_id and (tokens[offsets[1:] - 1] == source.eos_id).all()
  first_doc = tokens[offsets[0] : offsets[1] - 1].tolist()
  assert source.eos_id not in first_doc and source.decode(first_doc).strip() in {
    d.strip() for d in env["docs"]
  }
  # The cache key names the tokenizer: the same data with our own trained tokenizer is cached apart.
  assert key_lib.cache_key(config, source) != key_lib.cache_key(config)
  assert os.path.basename(prepared.dir) == key_lib.cache_key(config, source)


def test_own_sentencepiece_keeps_its_cache_key(env, tmp_path):
  """A given llm_jax SentencePiece model is keyed as before: sha256(key + the file's sha256)."""
  config = config_lib.load("configs/base.py", env["over"])
  path = str(tmp_path / "own.model")
  train_tokenizer(env["docs"] * 3, path, vocab_size=300)
  with open(path, "rb") as f:
    sha = hashlib.sha256(f.read()).hexdigest()
  want = hashlib.sha256((key_lib.cache_key(config) + sha).encode()).hexdigest()[:20]
  assert key_lib.cache_key(config, path) == want


def test_large_vocabularies_are_stored_as_uint32(tmp_path):
  writer = shards.ShardWriter(str(tmp_path), "train", 70_000, 1 << 20, eos_id=69_999)
  writer.add([65_536, 5, 69_998], 0, 3)
  writer.flush()
  tokens = np.load(tmp_path / writer.records[0]["path"])
  assert tokens.dtype == np.uint32 and tokens.tolist() == [69_999, 65_536, 5, 69_998, 69_999]


@pytest.mark.slow
def test_full_finetune_of_a_gpt2_checkpoint_with_its_tokenizer_json(env):
  workdir = str(env["root"] / "full")
  rows = _train(env, "finetune_code.py", workdir, init_from=env["gpt2"], **GPT2)
  losses = [r["loss"] for r in rows]
  assert len(losses) == 6 and np.isfinite(losses).all() and losses[-1] < losses[0]
  assert {"tokenizer.json", "tokenizer_config.json"} <= set(os.listdir(workdir))
  assert "tokenizer.model" not in os.listdir(workdir)
  source = hf_tokenizer.load_tokenizer(env["gpt2"])
  tuned = open_model(workdir)
  assert tuned.kind == "run" and tuned.step == 6 and tuned.tokenizer.sha256 == source.sha256
  assert tuned.tokenizer.encode(SAMPLE) == source.encode(SAMPLE) and tuned.tokenizer.eos_id == source.eos_id
  assert tuned.prompt_prefix == [source.eos_id]  # the separator before every training document
  data_dir = json.loads(open(os.path.join(workdir, "run.json")).read())["data_dir"]
  tokens, _ = _first_shard(data_dir)
  assert tokens[0] == source.eos_id
  assert run_command("llm_jax.generate", f"--workdir={workdir}", "--prompt=alpha", "--max_new_tokens=4") == 0
  out = str(env["root"] / "full_eval")
  args = ["--suite=none", "--no_generations", "--max_windows=4", f"--out={out}"]
  assert run_command("llm_jax.evaluate", f"--workdir={workdir}", *args) == 0
  results = json.loads(open(os.path.join(out, "results.json")).read())
  overall = results["heldout"]["overall"]
  assert overall["tokens"] > 0 and 0 < overall["bits_per_byte"] < np.inf
  pkg, back = str(env["root"] / "full_pkg"), str(env["root"] / "full_hf")
  assert run_command("llm_jax.export", f"--workdir={workdir}", f"--out={pkg}") == 0
  assert run_command("llm_jax.export", "--format=hf", f"--workdir={workdir}", f"--out={back}") == 0
  packaged = open_model(pkg)
  assert packaged.tokenizer.sha256 == source.sha256 and packaged.prompt_prefix == [source.eos_id]
  params, cfg, tok, _ = hf.read_hf(back)
  assert tok.sha256 == source.sha256 and tok.encode(SAMPLE) == source.encode(SAMPLE)
  assert cfg == open_model(env["gpt2"]).model_config
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), b), tuned.params, params)


@pytest.mark.slow
def test_lora_and_sft_from_a_gpt2_checkpoint_with_its_tokenizer_json(env):
  source = hf_tokenizer.load_tokenizer(env["gpt2"])
  lora = str(env["root"] / "lora")
  rows = _train(env, "finetune_lora.py", lora, init_from=env["gpt2"], **GPT2, **{"finetune.lora.rank": 2})
  assert len(rows) == 6 and np.isfinite([r["loss"] for r in rows]).all()
  merged = open_model(lora)
  assert merged.tokenizer.sha256 == source.sha256
  base = open_model(env["gpt2"])
  q = merged.params["blocks"]["attn"]["query"]["kernel"]
  assert not np.array_equal(np.asarray(q), np.asarray(base.params["blocks"]["attn"]["query"]["kernel"]))
  sft = str(env["root"] / "sft")
  rows = _train(
    env,
    "finetune_sft.py",
    sft,
    init_from=env["gpt2"],
    **GPT2,
    **{"finetune.sft.train_file": env["sft"], "finetune.sft.prompt_template": "Q: {prompt}\nA: "},
  )
  assert len(rows) == 6 and np.isfinite([r["loss"] for r in rows]).all()
  tuned = open_model(sft)
  assert tuned.tokenizer.encode(SAMPLE) == source.encode(SAMPLE) and tuned.chat_template is not None
  assert {"tokenizer.json", "tokenizer_config.json"} <= set(os.listdir(sft))
  _serves_with_the_source_tokenizer(sft, source)


def _serves_with_the_source_tokenizer(workdir: str, source) -> None:
  """The server on the run directory renders chats and prompts with the source's ids."""
  srv = app_lib.ServerThread(app_lib.create_app(app_lib.ServerSettings(package=workdir, slots=1)))
  srv.start()
  try:
    messages = [{"role": "user", "content": "item 3"}]
    got = httpx.post(f"{srv.url}/tokenize", json={"messages": messages}, timeout=60).json()["tokens"]
    assert got == [source.bos_id] + source.encode("<|user|>\n") + source.encode("item 3") + source.encode(
      "\n"
    ) + source.encode("<|assistant|>\n")
    got = httpx.post(f"{srv.url}/tokenize", json={"prompt": SAMPLE}, timeout=60).json()["tokens"]
    assert got == [source.eos_id] + source.encode(SAMPLE)
    r = httpx.post(
      f"{srv.url}/v1/completions",
      json={"prompt": "Q: item 3\nA: ", "max_tokens": 3, "temperature": 0},
      timeout=60,
    )
    assert r.status_code == 200 and r.json()["usage"]["prompt_tokens"] == 1 + len(
      source.encode("Q: item 3\nA: ")
    )
  finally:
    srv.stop()


@pytest.mark.slow
def test_full_finetune_of_a_llama_checkpoint_with_llama2_sentencepiece_ids(env):
  source = hf_tokenizer.load_tokenizer(env["llama"])
  assert isinstance(source, hf_tokenizer.SentencePieceTokenizer)
  assert (source.unk_id, source.bos_id, source.eos_id, source.pad_id) == (0, 1, 2, 2)
  workdir = str(env["root"] / "llama_full")
  rows = _train(env, "finetune_code.py", workdir, init_from=env["llama"], **LLAMA)
  assert len(rows) == 6 and np.isfinite([r["loss"] for r in rows]).all()
  assert {"tokenizer.model", "tokenizer_config.json"} <= set(os.listdir(workdir))
  tuned = open_model(workdir)
  assert isinstance(tuned.tokenizer, hf_tokenizer.SentencePieceTokenizer)
  assert tuned.tokenizer.sha256 == source.sha256 and tuned.tokenizer.encode(SAMPLE) == source.encode(SAMPLE)
  back = str(env["root"] / "llama_hf")
  assert run_command("llm_jax.export", "--format=hf", f"--workdir={workdir}", f"--out={back}") == 0
  assert hf.read_hf(back)[2].sha256 == source.sha256
