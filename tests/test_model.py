"""Decoder: shapes, causality, KV-cache decoding, parameter counting, config checks."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llm_jax import config as config_lib
from llm_jax.model import Decoder, ModelConfig

TINY = [
  "model.num_layers=2",
  "model.d_model=32",
  "model.num_heads=4",
  "model.max_seq_len=16",
  "train.seq_len=16",
  "train.global_batch_size=8",
]
LLAMA = {
  "model.positions": "rope",
  "model.norm": "rmsnorm",
  "model.activation": "swiglu",
  "model.tie_embeddings": False,
  "model.use_bias": False,
  "model.num_kv_heads": 2,
}


def tiny_config(extra=()):
  c = config_lib.load("configs/tiny.py", TINY)
  for k, v in dict(extra).items():
    config_lib.set_key(c, k, v)
  return c


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def built(request):
  c = tiny_config(LLAMA if request.param == "llama" else {})
  cfg = ModelConfig.from_config(c, tokenizer_size=100, platform="cpu")
  model = Decoder(cfg)
  params = nn.unbox(model.init(jax.random.key(0), jnp.zeros((1, 16), jnp.int32)))["params"]
  return cfg, model, params, jax.jit(lambda p, t: model.apply({"params": p}, t))


def test_forward_shapes_and_param_count(built):
  cfg, model, params, fwd = built
  assert cfg.vocab_size == 128  # 100 padded to a multiple of 128
  tokens = jnp.ones((3, 16), jnp.int32)
  logits = fwd(params, tokens)
  assert logits.shape == (3, 16, 128) and logits.dtype == jnp.float32
  assert sum(x.size for x in jax.tree.leaves(params)) == cfg.param_count()


def test_causality(built):
  _, _, params, fwd = built
  rng = np.random.default_rng(1)
  a = rng.integers(0, 100, (2, 16)).astype(np.int32)
  for t in (0, 7, 14):
    b = a.copy()
    b[:, t + 1 :] = rng.integers(0, 100, (2, 15 - t))
    la, lb = fwd(params, a), fwd(params, b)
    np.testing.assert_allclose(la[:, : t + 1], lb[:, : t + 1], atol=1e-5)
    assert not np.allclose(la[:, t + 1 :], lb[:, t + 1 :], atol=1e-3)


def test_kv_cache_matches_full_recompute(built):
  cfg, _, params, fwd = built
  dec = Decoder(cfg, decode=True)
  tokens = np.random.default_rng(2).integers(0, 100, (2, 12)).astype(np.int32)
  cache = dec.init(jax.random.key(0), jnp.zeros((2, 1), jnp.int32))["cache"]
  # jitted: two programs (the prompt of 8, then one token), not every op compiled alone
  step = jax.jit(
    lambda cache, t, pos: dec.apply({"params": params, "cache": cache}, t, pos, mutable=["cache"])
  )
  out, mut = step(cache, tokens[:, :8], np.broadcast_to(np.arange(8), (2, 8)))
  outs = [out]
  for i in range(8, 12):
    out, mut = step(mut["cache"], tokens[:, i : i + 1], np.full((2, 1), i))
    outs.append(out)
  np.testing.assert_allclose(np.concatenate(outs, 1), fwd(params, tokens), atol=2e-5)


def test_flops_per_token_formula():
  c = config_lib.load("configs/gpt_small.py")
  cfg = ModelConfig.from_config(c, tokenizer_size=50257, platform="gpu")
  assert cfg.vocab_size == 50304 and cfg.attention == "cudnn" and cfg.dtype == "bfloat16"
  n = cfg.param_count(include_embedding=False) + 50304 * 768
  assert cfg.flops_per_token(1024) == 6 * n + 12 * 12 * 12 * 64 * 1024
  assert 123e6 < cfg.param_count() < 126e6


def test_unknown_key_and_cross_field_checks_name_the_key():
  with pytest.raises(config_lib.ConfigError, match="model.num_layer"):
    config_lib.load("configs/tiny.py", ["model.num_layer=3"])
  with pytest.raises(config_lib.ConfigError, match="train.seq_len"):
    config_lib.validate(tiny_config({"train.seq_len": 32}))
  with pytest.raises(config_lib.ConfigError, match="sharding.tensor"):
    config_lib.validate(tiny_config({"model.num_heads": 2, "sharding.data": 1, "sharding.tensor": 8}), 8)
  with pytest.raises(config_lib.ConfigError, match="train.global_batch_size"):
    config_lib.validate(tiny_config({"train.global_batch_size": 4}), 8)
  with pytest.raises(config_lib.ConfigError, match="model.num_kv_heads"):
    config_lib.validate(tiny_config({"model.num_kv_heads": 3}))
  with pytest.raises(config_lib.ConfigError, match="model.norm"):
    config_lib.validate(tiny_config({"model.norm": "batchnorm"}))
  assert config_lib.mesh_shape(tiny_config({"sharding.tensor": 2}), 8) == (4, 1, 2)


def test_a_misspelled_key_in_a_config_file_fails_naming_it(tmp_path):
  """A preset that sets a key configs/base.py does not have (a typo) fails when loaded, like the same
  typo as a --config override, instead of adding a key nothing reads."""
  from llm_jax import cli

  path = tmp_path / "typo.py"
  path.write_text(
    "from configs import tiny\n\n\ndef get_config():\n"
    "  c = tiny.get_config()\n  c.train.stpes = 5\n  return c\n"
  )
  with pytest.raises(AttributeError, match=r"stpes[\s\S]*Did you mean \"steps\""):
    config_lib.load(str(path))
  problem = cli.config_override_error([f"--config={path}"])
  assert problem and "stpes" in problem and str(path) in problem


@pytest.mark.parametrize(
  "extra, key",
  [
    ({"model.num_heads": 0}, "model.num_heads"),
    ({"model.num_layers": 0}, "model.num_layers"),
    ({"model.num_layers": -1}, "model.num_layers"),
    ({"model.d_model": 0}, "model.d_model"),
    ({"model.d_model": -32}, "model.d_model"),
    ({"model.head_dim": -8}, "model.head_dim"),
    ({"model.num_kv_heads": -1}, "model.num_kv_heads"),
    ({"model.mlp_dim": -5}, "model.mlp_dim"),
    ({"model.vocab_size": -5}, "model.vocab_size"),
    ({"model.vocab_multiple": 0}, "model.vocab_multiple"),
    ({"model.vocab_multiple": -64}, "model.vocab_multiple"),
    ({"model.dropout": 1.5}, "model.dropout"),
    ({"model.attention_dropout": -0.1}, "model.attention_dropout"),
    ({"model.norm_eps": -1.0}, "model.norm_eps"),
    ({"model.param_dtype": "int8"}, "model.param_dtype"),
    ({"model.positions": "rope", "model.d_model": 36}, "model.head_dim"),  # 36 / 4 heads: odd 9
    ({"model.positions": "rope", "model.head_dim": 7}, "model.head_dim"),
    ({"model.positions": "rope", "model.rope_theta": 0.0}, "model.rope_theta"),
    ({"model.rope_scaling": "linear", "model.rope_scaling_factor": 0.0}, "model.rope_scaling_factor"),
  ],
)
def test_impossible_model_shapes_fail_at_config_time_naming_the_key(extra, key):
  """A model that cannot be built fails in validate with its key named, not inside JAX or with a
  ZeroDivisionError."""
  with pytest.raises(config_lib.ConfigError, match=key.replace(".", r"\.")):
    config_lib.validate(tiny_config(extra))


def test_sample_tokens_must_be_positive_when_sampling():
  """train.sample_tokens <= 0 with samples on failed at the first sample step, deep in the sampler."""
  for n in (0, -3):
    with pytest.raises(config_lib.ConfigError, match="train.sample_tokens"):
      config_lib.validate(tiny_config({"train.sample_every": 100, "train.sample_tokens": n}))
  config_lib.validate(tiny_config({"train.sample_every": 0, "train.sample_tokens": 0}))  # no samples


def test_valid_model_shapes_still_pass_validation():
  config_lib.validate(tiny_config(LLAMA))
  config_lib.validate(tiny_config({"model.head_dim": 16}))  # heads * head_dim != d_model is allowed
  config_lib.validate(tiny_config({"model.vocab_multiple": 1, "model.vocab_size": 0}))
