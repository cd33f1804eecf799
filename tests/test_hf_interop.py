"""Hugging Face interop: checkpoints made by `transformers` read with equal logits, our models written so
that `transformers` loads them with equal logits, and tokenizer.json / tokenizer.model tokenizers.

The comparisons with `transformers` skip when it (or torch) is not installed (`pip install -e '.[hf]'`
installs both); the tokenizer tests need only the `tokenizers` library.
"""

import json
import os
import random
import re
import shutil

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hf_tokenizers import byte_level_bpe, llama2_sentencepiece
from safetensors.numpy import load_file, save_file

from llm_jax.artifacts import hf, hf_write
from llm_jax.data import hf_tokenizer
from llm_jax.data.tokenizer import Tokenizer, train_tokenizer
from llm_jax.model import Decoder, ModelConfig

# transformers is imported inside the tests, after these (it reads them on import)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

IDS = np.array([[5, 17, 3, 60, 22, 9, 41, 0, 33, 12, 7, 50, 1, 2, 63, 30, 44, 8, 19, 27, 36, 14, 55, 6]])
WORDS = "the quick brown fox jumps over lazy dog 123 4567 hello world naïve café ünïcödé a1b2 日本".split()
PROBES = [
  "the quick  brown fox 12345\n  dog",
  " hello",
  "日本語 ü",
  "café\tnaïve",
  "",
  "  ",
  "a1b2c3!?",
  "ünïcödé\n\nover",
]


@pytest.fixture(scope="module")
def torch():
  pytest.importorskip("transformers", reason="transformers is not installed (pip install -e '.[hf]')")
  return pytest.importorskip("torch", reason="torch is not installed (pip install -e '.[hf]')")


def _texts(n=300, seed=0):
  rnd = random.Random(seed)
  return [" ".join(rnd.choice(WORDS) for _ in range(40)) + "\n" for _ in range(n)]


def _perturb(torch, model, seed=0):
  """Random weights everywhere (norm scales and biases too), so a wrong mapping cannot hide."""
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for p in model.parameters():
      p.add_(torch.randn(p.shape, generator=gen) * 0.1)
  return model.eval()


def _torch_logits(torch, model, ids=IDS):
  with torch.no_grad():
    return model(torch.tensor(ids)).logits.float().numpy()


def _our_logits(params, cfg, ids=IDS):
  return np.asarray(jax.jit(Decoder(cfg).apply)({"params": params}, jnp.asarray(ids)))


def _gpt2(torch, path, **kw):
  from transformers import GPT2Config, GPT2LMHeadModel

  cfg = GPT2Config(
    vocab_size=64, n_positions=32, n_embd=32, n_layer=2, n_head=4, layer_norm_epsilon=3e-5, **kw
  )
  model = _perturb(torch, GPT2LMHeadModel(cfg))
  model.save_pretrained(path)
  return model


def _llama(torch, path, seed=0, **kw):
  from transformers import LlamaConfig, LlamaForCausalLM

  base = dict(
    vocab_size=64,
    hidden_size=32,
    intermediate_size=40,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    rms_norm_eps=1e-5,
    rope_theta=5000.0,
    tie_word_embeddings=False,
  )
  base.update(kw)
  model = _perturb(torch, LlamaForCausalLM(LlamaConfig(**base, attn_implementation="eager")), seed)
  model.save_pretrained(path)
  return model


# ----------------------------------------------------------------------------- import


@pytest.mark.slow
def test_gpt2_checkpoint_reads_with_equal_logits(torch, tmp_path):
  model = _gpt2(torch, tmp_path)
  assert hf.is_hf_dir(str(tmp_path))
  with pytest.raises(hf.HFError, match="has no tokenizer"):
    hf.read_hf(str(tmp_path))
  raw = _byte_level_bpe(tmp_path)
  params, cfg, tok, prov = hf.read_hf(str(tmp_path))
  assert (cfg.positions, cfg.norm, cfg.activation, cfg.norm_eps) == ("learned", "layernorm", "gelu", 3e-5)
  assert cfg.tie_embeddings and prov["architecture"] == "GPT2LMHeadModel"
  assert isinstance(tok, hf_tokenizer.HFTokenizer) and tok.eos_id == raw.token_to_id("<|endoftext|>")
  assert prov["prompt_prefix"] == [tok.eos_id] and prov["tokenizer_sha256"] == tok.sha256
  assert params["blocks"]["attn"]["query"]["kernel"].shape == (2, 32, 4, 8)
  np.testing.assert_allclose(_our_logits(params, cfg), _torch_logits(torch, model), atol=1e-4, rtol=0)


def test_hf_overwrite_replaces_only_an_earlier_checkpoint(tmp_path):
  """write_hf(overwrite=True) replaces an earlier Hugging Face export, not a folder of other files
  (it was deleted with shutil.rmtree)."""
  cfg = ModelConfig(**EXPORT_CASES["gpt2"])
  params = _random_params(cfg)
  other = tmp_path / "notes"
  other.mkdir()
  (other / "a.txt").write_text("keep")
  with pytest.raises(hf.HFError, match="is not a Hugging Face checkpoint \\(no config.json\\)"):
    hf_write.write_hf(str(other), params, cfg, None, overwrite=True)
  assert os.listdir(other) == ["a.txt"]
  out = str(tmp_path / "hf")
  hf_write.write_hf(out, params, cfg, None)
  hf_write.write_hf(out, params, cfg, None, overwrite=True, weights_dtype="bfloat16")
  assert json.load(open(os.path.join(out, "config.json")))["torch_dtype"] == "bfloat16"
  assert sorted(os.listdir(tmp_path)) == ["hf", "notes"]  # nothing left beside it


def test_gpt2_state_dict_without_prefix_and_mask_buffers(tmp_path):
  """The layout of the original GPT-2 uploads: bare GPT2Model names, causal-mask buffers beside them."""
  rnd = np.random.default_rng(0)
  cfg = ModelConfig(**EXPORT_CASES["gpt2"])
  params = jax.tree.map(
    lambda x: rnd.normal(size=x.shape).astype(np.float32),
    nn.meta.unbox(
      jax.eval_shape(Decoder(cfg).init, jax.random.PRNGKey(0), jnp.zeros((1, 4), jnp.int32))["params"]
    ),
  )
  hf_write.write_hf(str(tmp_path), params, cfg, None)
  from safetensors.numpy import load_file, save_file

  tensors = {k.removeprefix("transformer."): v for k, v in load_file(tmp_path / "model.safetensors").items()}
  tensors["h.0.attn.bias"] = np.tril(np.ones((1, 1, 32, 32), np.float32))
  save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
  back, _, _, _ = hf.read_hf(str(tmp_path), require_tokenizer=False)
  jax.tree.map(np.testing.assert_array_equal, params, back)
  del tensors["h.1.mlp.c_fc.bias"]
  save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
  with pytest.raises(hf.HFError, match="tensor transformer.h.1.mlp.c_fc.bias is missing"):
    hf.read_hf(str(tmp_path), require_tokenizer=False)


LLAMA_CASES = {
  # grouped-query attention, untied head, head_dim != d_model / heads, llama3 rope scaling whose
  # bands keep, interpolate and divide one frequency each (wavelengths 6.3, 53, 444, 3738)
  "gqa_llama3": dict(
    head_dim=8,
    rope_scaling={
      "rope_type": "llama3",
      "factor": 4.0,
      "low_freq_factor": 0.25,
      "high_freq_factor": 2.0,
      "original_max_position_embeddings": 16,
    },
  ),
  "tied_linear_bias": dict(
    num_key_value_heads=4,
    head_dim=16,
    tie_word_embeddings=True,
    attention_bias=True,
    mlp_bias=True,
    rope_scaling={"rope_type": "linear", "factor": 2.0},
  ),
}


@pytest.mark.parametrize("case", sorted(LLAMA_CASES))
def test_llama_checkpoint_reads_with_equal_logits(torch, tmp_path, case):
  model = _llama(torch, tmp_path, **LLAMA_CASES[case])
  raw = _byte_level_bpe(tmp_path, llama3=True)
  params, cfg, tok, prov = hf.read_hf(str(tmp_path))
  assert prov["prompt_prefix"] == [raw.token_to_id("<|begin_of_text|>")] == tok.prompt_prefix
  assert (cfg.positions, cfg.norm, cfg.activation) == ("rope", "rmsnorm", "swiglu")
  assert cfg.rope_theta == 5000.0 and cfg.norm_eps == 1e-5
  assert cfg.rope_scaling == LLAMA_CASES[case]["rope_scaling"]["rope_type"]
  ids = np.tile(IDS, (1, 2))[:, :48]  # past original_max_position_embeddings
  np.testing.assert_allclose(
    _our_logits(params, cfg, ids), _torch_logits(torch, model, ids), atol=1e-4, rtol=0
  )


def test_sharded_checkpoints_read_like_single_files(torch, tmp_path):
  for name, make in (("gpt2", _gpt2), ("llama", _llama)):
    make(torch, tmp_path / f"{name}_one").save_pretrained(tmp_path / f"{name}_shards", max_shard_size="20KB")
    assert os.path.exists(tmp_path / f"{name}_shards" / hf.INDEX)
    assert len(hf.weight_files(str(tmp_path / f"{name}_shards"))) > 2
    one = hf.read_hf(str(tmp_path / f"{name}_one"), require_tokenizer=False)[0]
    shards = hf.read_hf(str(tmp_path / f"{name}_shards"), require_tokenizer=False)[0]
    jax.tree.map(np.testing.assert_array_equal, one, shards)


def test_bfloat16_checkpoint_is_upcast(torch, tmp_path):
  model = _llama(torch, tmp_path / "f32")
  model.to(torch.bfloat16).save_pretrained(tmp_path / "bf16")
  params, _, _, prov = hf.read_hf(str(tmp_path / "bf16"), require_tokenizer=False)
  ref = hf.read_hf(str(tmp_path / "f32"), require_tokenizer=False)[0]
  assert prov["stored_dtype"] == "bfloat16"
  emb = params["embedding"]
  assert emb.dtype == np.float32
  np.testing.assert_array_equal(emb, np.asarray(jnp.asarray(ref["embedding"], jnp.bfloat16), np.float32))


def test_unsupported_checkpoints_are_refused_naming_the_key(tmp_path):
  (tmp_path / "config.json").write_text(json.dumps({"model_type": "mistral", "architectures": ["X"]}))
  (tmp_path / "model.safetensors").write_bytes(b"")
  assert hf.is_hf_dir(str(tmp_path))
  with pytest.raises(hf.HFError, match="model_type 'mistral'"):
    hf.read_hf(str(tmp_path))
  llama = {
    "model_type": "llama",
    "vocab_size": 8,
    "hidden_size": 8,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "intermediate_size": 8,
    "max_position_embeddings": 8,
  }
  with pytest.raises(hf.HFError, match="rope scaling type 'yarn'"):
    hf.model_config_from_hf({**llama, "rope_scaling": {"rope_type": "yarn", "factor": 2.0}})
  with pytest.raises(hf.HFError, match="hidden_size"):
    hf.model_config_from_hf({k: v for k, v in llama.items() if k != "hidden_size"})
  with pytest.raises(hf.HFError, match="mlp_bias"):
    hf.model_config_from_hf({**llama, "attention_bias": True})
  assert not hf.is_hf_dir(str(tmp_path / "nothing"))


# ----------------------------------------------------------------------------- export


def _random_params(cfg, seed=0):
  params = jax.jit(Decoder(cfg).init)(jax.random.PRNGKey(seed), jnp.zeros((1, 4), jnp.int32))["params"]
  params = nn.meta.unbox(params)
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.PRNGKey(seed + 1), len(leaves))
  noisy = [x + 0.1 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys, strict=True)]
  return jax.tree.unflatten(tree, noisy)


EXPORT_CASES = {
  "gpt2": dict(
    vocab_size=64,
    num_layers=2,
    d_model=32,
    num_heads=4,
    num_kv_heads=4,
    head_dim=8,
    mlp_dim=48,
    max_seq_len=32,
    norm_eps=1e-5,
  ),
  "llama": dict(
    vocab_size=64,
    num_layers=2,
    d_model=32,
    num_heads=4,
    num_kv_heads=2,
    head_dim=8,
    mlp_dim=40,
    max_seq_len=64,
    positions="rope",
    norm="rmsnorm",
    activation="swiglu",
    use_bias=False,
    tie_embeddings=False,
    rope_theta=5000.0,
    norm_eps=1e-6,
    rope_scaling="llama3",
    rope_scaling_factor=4.0,
    rope_low_freq_factor=0.25,
    rope_high_freq_factor=2.0,
    rope_original_max_len=16,
  ),
}


@pytest.fixture(scope="module")
def sp_tokenizer(tmp_path_factory):
  path = tmp_path_factory.mktemp("sp") / "tokenizer.model"
  return train_tokenizer(_texts(), str(path), vocab_size=300)


@pytest.mark.parametrize("family", sorted(EXPORT_CASES))
@pytest.mark.slow
def test_export_loads_in_transformers_with_equal_logits_and_reads_back_bitwise(
  torch, tmp_path, family, sp_tokenizer
):
  from transformers import AutoModelForCausalLM, AutoTokenizer

  cfg = ModelConfig(**EXPORT_CASES[family])
  params = _random_params(cfg)
  out = str(tmp_path / "hf")
  names = hf_write.write_hf(out, params, cfg, sp_tokenizer)
  assert {"config.json", "model.safetensors", "tokenizer.model", "tokenizer_config.json"} <= set(names)
  model = AutoModelForCausalLM.from_pretrained(out, local_files_only=True, attn_implementation="eager")
  assert type(model).__name__ == {"gpt2": "GPT2LMHeadModel", "llama": "LlamaForCausalLM"}[family]
  ids = IDS[:, :20]
  np.testing.assert_allclose(
    _torch_logits(torch, model.float().eval(), ids), _our_logits(params, cfg, ids), atol=1e-4, rtol=0
  )
  back, cfg_back, tok_back, _ = hf.read_hf(out)
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), b), params, back)
  assert cfg_back == cfg
  assert isinstance(tok_back, Tokenizer) and tok_back.sha256 == sp_tokenizer.sha256
  auto = AutoTokenizer.from_pretrained(out, local_files_only=True)
  for text in PROBES:
    assert auto.encode(text, add_special_tokens=False) == sp_tokenizer.encode(text)


def test_export_refuses_models_without_a_hf_counterpart(tmp_path):
  cfg = ModelConfig(
    vocab_size=64,
    num_layers=1,
    d_model=32,
    num_heads=4,
    num_kv_heads=4,
    head_dim=8,
    mlp_dim=48,
    max_seq_len=32,
    positions="rope",
    norm="layernorm",
    activation="gelu",
  )
  with pytest.raises(hf.HFError, match="positions=rope, norm=layernorm, activation=gelu"):
    hf_write.write_hf(str(tmp_path / "x"), {}, cfg, None)
  assert not os.path.exists(tmp_path / "x")


# ----------------------------------------------------------------------------- tokenizers


def _byte_level_bpe(directory, llama3=False):
  """A tiny GPT-2 (or LLaMA-3 style) tokenizer.json trained on _texts()."""
  return byte_level_bpe(directory, _texts(), llama3=llama3)


@pytest.mark.parametrize("style", ["gpt2", "llama3"])
def test_tokenizer_json_behind_the_tokenizer_interface(tmp_path, style):
  raw = _byte_level_bpe(tmp_path, llama3=style == "llama3")
  tok = hf_tokenizer.load_tokenizer(str(tmp_path))
  assert isinstance(tok, hf_tokenizer.HFTokenizer) and tok.vocab_size == raw.get_vocab_size()
  if style == "gpt2":
    assert tok.bos_id == tok.eos_id == tok.unk_id == tok.pad_id == raw.token_to_id("<|endoftext|>")
    assert tok.prompt_prefix == [tok.eos_id]
  else:
    assert tok.bos_id == raw.token_to_id("<|begin_of_text|>") and tok.unk_id == -1
    assert tok.eos_id == tok.pad_id == raw.token_to_id("<|end_of_text|>")
    assert tok.prompt_prefix == [tok.bos_id]  # the post-processor's BOS, not added by encode
  sizes = tok.token_bytes()
  assert sizes[tok.eos_id] == 0 and sizes.shape == (tok.vocab_size,)
  for text in PROBES + _texts(5, seed=1):
    ids = tok.encode(text)
    assert tok.bos_id not in ids and tok.decode(ids) == text
    assert int(sizes[ids].sum()) == len(text.encode("utf-8"))
  assert tok.decode([tok.eos_id] + tok.encode("dog")) == "dog"
  assert tok.encode_batch(PROBES) == [tok.encode(t) for t in PROBES]
  assert len(tok.sha256) == 64 and tok.sha256 != hf_tokenizer.HFTokenizer.load(str(tmp_path)).sha256[::-1]


@pytest.mark.parametrize("style", ["gpt2", "llama3"])
def test_tokenizer_json_export_loads_in_autotokenizer(torch, tmp_path, style):
  from transformers import AutoTokenizer

  _byte_level_bpe(tmp_path / "src", llama3=style == "llama3")
  tok = hf_tokenizer.load_tokenizer(str(tmp_path / "src"))
  tok.save_hf(str(tmp_path / "out"))
  auto = AutoTokenizer.from_pretrained(str(tmp_path / "out"), local_files_only=True)
  assert auto.eos_token_id == tok.eos_id and auto.bos_token_id == tok.bos_id
  for text in PROBES:
    assert auto.encode(text, add_special_tokens=False) == tok.encode(text)
    assert auto.decode(tok.encode(text)) == text
  assert hf_tokenizer.load_tokenizer(str(tmp_path / "out")).sha256 == tok.sha256


def test_sentencepiece_export_round_trips_through_autotokenizer(torch, tmp_path, sp_tokenizer):
  from transformers import AutoTokenizer

  names = hf_tokenizer.save_hf_tokenizer(sp_tokenizer, str(tmp_path), model_max_length=64)
  assert names == ["tokenizer.model", "tokenizer_config.json"]
  auto = AutoTokenizer.from_pretrained(str(tmp_path), local_files_only=True)
  assert (auto.pad_token_id, auto.bos_token_id, auto.eos_token_id, auto.unk_token_id) == (0, 1, 2, 3)
  for text in PROBES + _texts(20, seed=2):
    ids = sp_tokenizer.encode(text)
    assert auto.encode(text, add_special_tokens=False) == ids and auto.decode(ids) == text
  back = hf_tokenizer.load_tokenizer(str(tmp_path))
  assert isinstance(back, Tokenizer) and back.sha256 == sp_tokenizer.sha256


def test_sentencepiece_model_with_llama2_special_ids(tmp_path):
  path = tmp_path / "m"
  llama2_sentencepiece(path, _texts())
  tok = hf_tokenizer.load_tokenizer(f"{path}.model")
  assert isinstance(tok, hf_tokenizer.SentencePieceTokenizer)
  assert (tok.unk_id, tok.bos_id, tok.eos_id, tok.pad_id) == (0, 1, 2, 2) and tok.prompt_prefix == [1]
  text = "the quick 日本 fox"
  assert tok.decode(tok.encode(text)) == text and tok.vocab_size == 300
  assert tok.token_bytes()[[0, 1, 2]].tolist() == [0, 0, 0]
  with pytest.raises(Exception, match="pad_id is -1"):
    Tokenizer.load(f"{path}.model")


def test_sentencepiece_special_pieces_named_by_tokenizer_config(tmp_path):
  """tokenizer_config.json's eos_token for a tokenizer.model: a piece of the model is the EOS (it was
  ignored: the model's own </s> was used); a name that is no piece, such as an added token of
  added_tokens_decoder (which only a tokenizer.json holds), is an error naming the file and key (it
  opened with the wrong EOS, and '<|im_end|>' in text became 13 ordinary pieces)."""
  llama2_sentencepiece(tmp_path / "tokenizer", _texts(), user_defined_symbols=["<|im_end|>"])
  config = tmp_path / "tokenizer_config.json"
  config.write_text(json.dumps({"bos_token": "<s>", "eos_token": "<|im_end|>"}))
  tok = hf_tokenizer.load_tokenizer(str(tmp_path))
  assert tok.id_to_piece(tok.eos_id) == "<|im_end|>" and tok.eos_id != 2 and tok.bos_id == 1
  added = {"300": {"content": "<|end|>", "special": True}}
  config.write_text(json.dumps({"eos_token": "<|end|>", "added_tokens_decoder": added}))
  with pytest.raises(
    hf_tokenizer.DataError, match=r"tokenizer_config.json: eos_token '<\|end\|>'.*added token"
  ):
    hf_tokenizer.load_tokenizer(str(tmp_path))
  config.write_text(json.dumps({"pad_token": "<nope>"}))
  with pytest.raises(hf_tokenizer.DataError, match="pad_token '<nope>' is no piece"):
    hf_tokenizer.load_tokenizer(str(tmp_path))


def test_missing_tokenizer_is_named(tmp_path):
  with pytest.raises(hf_tokenizer.DataError, match="neither tokenizer.json nor tokenizer.model"):
    hf_tokenizer.load_tokenizer(str(tmp_path))


def test_rope_scaling_from_config_and_checked():
  from llm_jax import config as config_lib
  from llm_jax.model import transformer

  c = config_lib.load(
    "configs/tiny.py", ["model.positions=rope", "model.norm=rmsnorm", "model.activation=swiglu"]
  )
  plain = ModelConfig.from_config(c, tokenizer_size=100, platform="cpu")
  assert plain.rope_scaling == "none" and transformer.rope_scaled_frequencies(plain) is None
  config_lib.set_key(c, "model.rope_scaling", "linear")
  config_lib.set_key(c, "model.rope_scaling_factor", "4.0")
  scaled = ModelConfig.from_config(c, tokenizer_size=100, platform="cpu")
  h = scaled.head_dim
  np.testing.assert_allclose(
    transformer.rope_scaled_frequencies(scaled), 1.0 / (10_000.0 ** (np.arange(0, h, 2) / h)) / 4.0, rtol=1e-6
  )
  config_lib.set_key(c, "model.rope_scaling", "yarn")
  with pytest.raises(config_lib.ConfigError, match="model.rope_scaling"):
    config_lib.validate(c)


def test_a_sharded_index_reads_like_the_single_file_without_torch(tmp_path):
  """The fixture's weights split over two safetensors shards with a weight_map index (the layout
  `save_pretrained(max_shard_size=...)` writes) read back equal; a shard the index names but the
  directory lacks is an error naming it."""
  for name in ("gpt2", "llama"):
    src = os.path.join(os.path.dirname(__file__), "fixtures", "hf", name)
    dst = tmp_path / name
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns(hf.WEIGHTS, "expected*"))
    tensors = load_file(os.path.join(src, hf.WEIGHTS))
    keys = sorted(tensors)
    halves = {"model-00001-of-00002.safetensors": keys[::2], "model-00002-of-00002.safetensors": keys[1::2]}
    for file, part in halves.items():
      save_file({k: tensors[k] for k in part}, str(dst / file))
    weight_map = {k: file for file, part in halves.items() for k in part}
    (dst / hf.INDEX).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    assert len(hf.weight_files(str(dst))) == 2
    one = hf.read_hf(src, require_tokenizer=False)[0]
    shards = hf.read_hf(str(dst), require_tokenizer=False)[0]
    jax.tree.map(np.testing.assert_array_equal, one, shards)
    os.remove(dst / "model-00002-of-00002.safetensors")
    with pytest.raises(hf.HFError, match="model-00002-of-00002.safetensors"):
      hf.read_hf(str(dst), require_tokenizer=False)


def test_a_checkpoint_s_other_end_of_text_ids_stop_generation_and_travel(tmp_path):
  """generation_config.json's eos_token_id list (LLaMA-3 instruct: <|end_of_text|> and <|eot_id|>):
  the ids besides the tokenizer's EOS are the model's stop ids (they were kept in the provenance
  only, so a served instruct model ran past its end of turn), kept by a package export (model.json
  `stop_ids`) and an HF export (config.json's eos_token_id list); bad files are named."""
  from llm_jax.artifacts import ArtifactError, export, open_model, package

  src = os.path.join(os.path.dirname(__file__), "fixtures", "hf", "llama")
  ck = tmp_path / "ck"
  shutil.copytree(src, ck, ignore=shutil.ignore_patterns("expected*"))
  tok = open_model(str(ck), weights=False).tokenizer
  other = tok.encode(" the")[0]
  assert open_model(str(ck), weights=False).stop_ids == []
  (ck / hf.GENERATION_CONFIG).write_text(json.dumps({"eos_token_id": [tok.eos_id, other]}))
  assert open_model(str(ck), weights=False).stop_ids == [other]
  export.export(str(ck), str(tmp_path / "pkg"))
  meta = json.loads((tmp_path / "pkg" / package.MODEL_JSON).read_text())
  assert meta["stop_ids"] == [other] and open_model(str(tmp_path / "pkg")).stop_ids == [other]
  export.export(str(tmp_path / "pkg"), str(tmp_path / "hf"), format="hf")
  assert json.loads((tmp_path / "hf" / hf.CONFIG).read_text())["eos_token_id"] == [tok.eos_id, other]
  assert open_model(str(tmp_path / "hf"), weights=False).stop_ids == [other]
  (ck / hf.GENERATION_CONFIG).write_text("{")
  with pytest.raises(ArtifactError, match=hf.GENERATION_CONFIG):
    open_model(str(ck), weights=False)
  meta["stop_ids"] = ["x"]
  (tmp_path / "pkg" / package.MODEL_JSON).write_text(json.dumps(meta))
  with pytest.raises(package.PackageError, match="stop_ids"):
    open_model(str(tmp_path / "pkg"))


@pytest.mark.parametrize(
  "file, value, named",
  [
    ("generation_config.json", ["303"], "'303'"),
    ("generation_config.json", [True], "True"),
    ("generation_config.json", 303.0, "303.0"),
    ("generation_config.json", [5000], "5000"),
    ("config.json", 999, "999"),
  ],
)
def test_end_of_text_ids_that_are_no_ids_are_named(tmp_path, file, value, named):
  """eos_token_id entries that are no token ids of the tokenizer (a string, a bool, a float, an id
  past the vocabulary) are errors naming the file and key; they were dropped without a word, or (an
  out-of-range config.json id) exported as the package's EOS."""
  from llm_jax.artifacts import ArtifactError, open_model

  src = os.path.join(os.path.dirname(__file__), "fixtures", "hf", "llama")
  ck = tmp_path / "ck"
  shutil.copytree(src, ck, ignore=shutil.ignore_patterns("expected*"))
  config = json.loads((ck / file).read_text()) if (ck / file).exists() else {}
  (ck / file).write_text(json.dumps({**config, "eos_token_id": value}))
  with pytest.raises(ArtifactError, match=rf"{file}: eos_token_id .*{re.escape(named)}"):
    open_model(str(ck), weights=False)


def test_an_export_names_no_pad_the_checkpoint_had_none_of(tmp_path):
  """A checkpoint without a pad token (LLaMA-3: pad_token_id null) exported again says so: the
  export wrote EOS as pad_token_id and pad_token (this project pads with EOS), and Hugging Face's
  collators mask the pad id's labels, so a model fine-tuned from the export never learns to stop."""
  from llm_jax.artifacts import export, open_model

  src = os.path.join(os.path.dirname(__file__), "fixtures", "hf", "llama")
  assert json.loads(open(os.path.join(src, hf.CONFIG)).read())["pad_token_id"] is None
  export.export(src, str(tmp_path / "hf"), format="hf")
  assert json.loads((tmp_path / "hf" / hf.CONFIG).read_text())["pad_token_id"] is None
  assert "pad_token" not in json.loads((tmp_path / "hf" / "tokenizer_config.json").read_text())
  back = open_model(str(tmp_path / "hf"), weights=False).tokenizer
  assert back.pad_id == back.eos_id and not back.has_pad


def test_a_declared_long_context_survives_a_package(tmp_path):
  """A RoPE checkpoint declaring 131072 positions (LLaMA 3.1) is opened at 8192 (the KV cache's
  size); its package keeps the declared context, and the HF export of that package declares it again
  (it declared 8192: vLLM would serve a sixteenth of the context)."""
  from llm_jax.artifacts import export, open_model

  src = os.path.join(os.path.dirname(__file__), "fixtures", "hf", "llama")
  ck = tmp_path / "ck"
  shutil.copytree(src, ck, ignore=shutil.ignore_patterns("expected*"))
  config = json.loads((ck / hf.CONFIG).read_text())
  (ck / hf.CONFIG).write_text(json.dumps({**config, "max_position_embeddings": 131072}))
  export.export(str(ck), str(tmp_path / "pkg"))
  pkg = open_model(str(tmp_path / "pkg"))
  assert pkg.model_config.max_seq_len == 8192 and pkg.provenance["max_position_embeddings"] == 131072
  export.export(str(tmp_path / "pkg"), str(tmp_path / "pkg2"))
  export.export(str(tmp_path / "pkg2"), str(tmp_path / "hf"), format="hf")
  assert json.loads((tmp_path / "hf" / hf.CONFIG).read_text())["max_position_embeddings"] == 131072
