"""Golden Hugging Face fixtures (tests/fixtures/hf, made by tests/fixtures/make_hf_fixtures.py with the
real transformers): opened by open_model with the recorded logits and no torch; HF -> package -> HF
bitwise; old- and new-shaped model.json; and, when transformers and torch import, the fixture script
rerun for real."""

import dataclasses
import importlib.util
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from run_cmd import run_command
from safetensors.numpy import load_file

from llm_jax.artifacts import ArtifactError, hf, open_model, package
from llm_jax.data import hf_tokenizer
from llm_jax.data.tokenizer import train_tokenizer
from llm_jax.model import Decoder, ModelConfig
from llm_jax.model.params import init_params

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")
FAMILIES = ("gpt2", "llama")
_APPLY = {}


def _fixture(family):
  d = os.path.join(FIXTURES, "hf", family)
  with open(os.path.join(d, "expected.json")) as f:
    ids = json.load(f)["ids"]
  return d, np.asarray([ids], np.int32), np.load(os.path.join(d, "expected_logits.npy"))


def _logits(params, cfg, ids):
  if cfg not in _APPLY:  # one compile per architecture for the whole module
    _APPLY[cfg] = jax.jit(Decoder(cfg).apply)
  return np.asarray(_APPLY[cfg]({"params": params}, jnp.asarray(ids)))


def _equal_trees(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), a, b)


@pytest.mark.parametrize("family", FAMILIES)
def test_fixture_opens_with_the_logits_transformers_recorded(family):
  d, ids, expected = _fixture(family)
  opened = open_model(d)
  assert opened.kind == "hf" and opened.step == 0
  assert isinstance(opened.tokenizer, hf_tokenizer.HFTokenizer)
  assert opened.model_config.positions == {"gpt2": "learned", "llama": "rope"}[family]
  bos = opened.tokenizer.bos_id
  assert opened.prompt_prefix == [bos]  # GPT-2: <|endoftext|>; LLaMA-3: <|begin_of_text|>
  np.testing.assert_allclose(_logits(opened.params, opened.model_config, ids), expected, atol=1e-4, rtol=0)
  described = open_model(d, weights=False)
  assert described.params is None and described.model_config == opened.model_config
  assert described.tokenizer.sha256 == opened.tokenizer.sha256
  with pytest.raises(ArtifactError, match="one set of weights; step=3"):
    open_model(d, step=3)


@pytest.mark.parametrize("family", FAMILIES)
def test_hf_to_package_to_hf_is_bitwise(family, tmp_path):
  d, ids, expected = _fixture(family)
  pkg, back = str(tmp_path / "pkg"), str(tmp_path / "hf")
  assert run_command("llm_jax.export", f"--workdir={d}", f"--out={pkg}") == 0
  with open(os.path.join(pkg, "model.json")) as f:
    meta = json.load(f)
  src = hf_tokenizer.load_tokenizer(d)
  assert meta["format_version"] == package.HF_TOKENIZER_FORMAT_VERSION
  assert meta["special_ids"] == {"pad": src.pad_id, "bos": src.bos_id, "eos": src.eos_id, "unk": src.unk_id}
  assert meta["prompt_prefix"] == [src.bos_id] and meta["provenance"]["tokenizer_sha256"] == src.sha256
  assert ("rope_scaling" in meta["architecture"]) == (family == "llama")  # defaults are left out
  assert "dropout" not in meta["architecture"] and "max_seq_len" in meta["architecture"]
  assert sorted(f for f in os.listdir(pkg) if f.startswith("tokenizer")) == [
    "tokenizer.json",
    "tokenizer_config.json",
  ]
  opened_pkg, opened_hf = open_model(pkg), open_model(d)
  assert opened_pkg.kind == "package" and opened_pkg.model_config == opened_hf.model_config
  _equal_trees(opened_pkg.params, opened_hf.params)
  tok = opened_pkg.tokenizer
  assert (tok.sha256, tok.eos_id, tok.bos_id, tok.prompt_prefix) == (
    src.sha256,
    src.eos_id,
    src.bos_id,
    opened_pkg.prompt_prefix,
  )
  np.testing.assert_allclose(
    _logits(opened_pkg.params, opened_pkg.model_config, ids), expected, atol=1e-4, rtol=0
  )

  assert run_command("llm_jax.export", "--format=hf", f"--workdir={pkg}", f"--out={back}") == 0
  params, cfg, tok_back, _ = hf.read_hf(back)
  _equal_trees(params, opened_hf.params)
  assert cfg == opened_hf.model_config and tok_back.sha256 == src.sha256
  ours, theirs = (load_file(os.path.join(x, "model.safetensors")) for x in (back, d))
  assert set(ours) == set(theirs)  # the names transformers saved, the values bit for bit
  for key in ours:
    np.testing.assert_array_equal(ours[key], theirs[key])
  assert run_command("llm_jax.export", "--format=hf", f"--workdir={pkg}", f"--out={back}") == 1  # not empty


def test_rope_context_is_capped_and_restored_on_export(tmp_path):
  d, ids, expected = _fixture("llama")
  big = tmp_path / "long"
  shutil.copytree(d, big)
  config = json.loads((big / "config.json").read_text())
  config["max_position_embeddings"] = 131072
  (big / "config.json").write_text(json.dumps(config))
  opened = open_model(str(big))
  assert opened.model_config.max_seq_len == 8192
  assert opened.provenance["max_position_embeddings"] == 131072
  assert open_model(str(big), max_seq_len=100, weights=False).model_config.max_seq_len == 100
  np.testing.assert_allclose(_logits(opened.params, opened.model_config, ids), expected, atol=1e-4, rtol=0)
  assert run_command("llm_jax.export", "--format=hf", f"--workdir={big}", f"--out={tmp_path / 'out'}") == 0
  assert json.loads((tmp_path / "out" / "config.json").read_text())["max_position_embeddings"] == 131072


def test_model_json_without_defaults_and_old_full_form_read_alike(tmp_path):
  tok = train_tokenizer(
    [f"the cat {i} sat on the mat\n" for i in range(200)], str(tmp_path / "t.model"), vocab_size=300
  )
  cfg = ModelConfig(
    vocab_size=320,
    num_layers=1,
    d_model=16,
    num_heads=2,
    num_kv_heads=2,
    head_dim=8,
    mlp_dim=32,
    max_seq_len=16,
  )
  meta = package.write_package(str(tmp_path / "pkg"), init_params(cfg, 0), cfg, tok.path, step=4)
  assert meta["format_version"] == 1 and meta["prompt_prefix"] == [tok.eos_id]
  assert meta["special_ids"] == {"pad": 0, "bos": 1, "eos": 2, "unk": 3}
  assert set(meta["architecture"]) == {
    "vocab_size",
    "num_layers",
    "d_model",
    "num_heads",
    "num_kv_heads",
    "head_dim",
    "mlp_dim",
    "max_seq_len",
  }
  assert os.listdir(tmp_path / "pkg").count("tokenizer.model") == 1
  path = tmp_path / "pkg" / "model.json"
  old = json.loads(path.read_text())
  old["architecture"] = dataclasses.asdict(cfg)  # what earlier releases wrote: every field
  path.write_text(json.dumps(old))
  params, cfg_old, tok_old, _ = package.read_package(str(tmp_path / "pkg"))
  assert cfg_old == cfg and tok_old.sha256 == tok.sha256
  old["architecture"]["rope_yarn"] = 1
  path.write_text(json.dumps(old))
  with pytest.raises(package.PackageError, match=r"architecture fields \['rope_yarn'\] are unknown"):
    package.read_package(str(tmp_path / "pkg"))


# ----------------------------------------------------------------------------- the real transformers


@pytest.fixture(scope="module")
def fixture_script():
  pytest.importorskip("transformers", reason="transformers is not installed (pip install -e '.[hf]')")
  pytest.importorskip("torch", reason="torch is not installed (pip install -e '.[hf]')")
  spec = importlib.util.spec_from_file_location(
    "make_hf_fixtures", os.path.join(FIXTURES, "make_hf_fixtures.py")
  )
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


@pytest.mark.slow
def test_fixture_script_reruns_and_transformers_agrees(fixture_script, tmp_path):
  assert fixture_script.main([str(tmp_path)]) == 0
  for family in FAMILIES:
    d, ids, expected = _fixture(family)
    # transformers today computes the recorded logits from the committed weights
    np.testing.assert_allclose(fixture_script.load_logits(d, ids[0].tolist()), expected, atol=1e-5, rtol=0)
    fresh = str(tmp_path / family)
    opened = open_model(fresh)
    np.testing.assert_allclose(
      _logits(opened.params, opened.model_config, ids),
      np.load(os.path.join(fresh, "expected_logits.npy")),
      atol=1e-4,
      rtol=0,
    )
    assert opened.model_config == open_model(d, weights=False).model_config
    assert opened.tokenizer.sha256 == hf_tokenizer.load_tokenizer(d).sha256  # the tokenizer is deterministic


def test_generate_and_evaluate_take_a_hf_dir(capsys):
  from llm_jax.eval import pipeline, scored_model

  d, _, _ = _fixture("llama")
  assert run_command("llm_jax.generate", f"--workdir={d}", "--prompt=the quick", "--max_new_tokens=4") == 0
  assert capsys.readouterr().out.startswith("the quick")
  sm = scored_model.open_model(d)
  assert sm.kind == "hf" and sm.prefix_ids == [sm.tokenizer.bos_id] != [sm.tokenizer.eos_id]
  with pytest.raises(scored_model.EvalError, match=r"\(hf\) has no data of its own: pass --corpus"):
    pipeline.heldout_batches(sm, "", "val", 16, 8)
