"""Packages: export from a real workdir, load with nothing else, same logits; int8 bound; bad packages."""

import dataclasses
import json
import os
import random
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from run_cmd import run_command
from tiny_package import SERVER_CFG, write_tiny_package

from llm_jax import config as config_lib
from llm_jax.artifacts import export as export_lib
from llm_jax.artifacts import open_model, package, weights_file
from llm_jax.artifacts.errors import ArtifactError
from llm_jax.data.tokenizer import train_tokenizer
from llm_jax.eval import precision as precision_report
from llm_jax.generate import prompt_logits
from llm_jax.model import Decoder, ModelConfig, quantize

OVERRIDES = {
  "model.d_model": 32,
  "model.num_heads": 4,
  "model.num_layers": 2,
  "model.vocab_size": 384,
  "model.max_seq_len": 32,
  "model.init_std": 0.3,
  "model.dtype": "float32",
  "train.seq_len": 32,
  "train.global_batch_size": 8,
}


def _text(seed, n):
  rng = random.Random(seed)
  words = "the cat sat on a mat and def return import class self print data model".split()
  return " ".join(rng.choice(words) for _ in range(n))


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, devices):
  """A run directory as training leaves it: config, tokenizer, manifest, run.json, a checkpoint."""
  from llm_jax import sharding as sharding_lib
  from llm_jax.train import checkpoint as ckpt_lib
  from llm_jax.train import optimizer as opt_lib
  from llm_jax.train import state as state_lib

  d = tmp_path_factory.mktemp("run")
  tok = train_tokenizer([_text(i, 150) + "\n" for i in range(40)], str(d / "tokenizer.model"), vocab_size=300)
  config = config_lib.load("configs/base.py", OVERRIDES)
  model = Decoder(ModelConfig.from_config(config, tok.vocab_size))
  mesh = sharding_lib.make_mesh(config)
  state, _ = state_lib.create_state(model, opt_lib.make_optimizer(config), mesh, config, seed=4)
  config_lib.save_json(config, str(d / "config.json"))
  ckpts = ckpt_lib.Checkpoints(str(d), keep=3)
  ckpts.save(7, state, {"step": 7})
  ckpts.close()
  (d / "manifest.json").write_text('{"documents": 40}')
  (d / "run.json").write_text(
    json.dumps(
      {
        "git": {"commit": "abc123", "dirty": True},
        "tokenizer_sha256": tok.sha256,
        "manifest_sha256": "m" * 64,
      }
    )
  )
  params = jax.tree.map(np.asarray, state.params)
  return d, params, model.cfg, tok


def _logits(params, cfg, tokens):
  return np.asarray(Decoder(cfg).apply({"params": params}, tokens))


TOKENS = np.array([[1, 20, 30, 40, 50, 60, 70, 80], [1, 99, 98, 97, 7, 8, 9, 10]], np.int32)


def test_export_load_same_logits(workdir, tmp_path):
  d, params, cfg, tok = workdir
  assert run_command("llm_jax.export", f"--workdir={d}", f"--out={tmp_path / 'pkg'}") == 0
  loaded = open_model(str(tmp_path / "pkg"), dtype="auto")
  meta = loaded.meta
  assert meta["format_version"] == package.FORMAT_VERSION
  assert meta["provenance"] == {
    "training_step": 7,
    "git_commit": "abc123+dirty",
    "tokenizer_sha256": tok.sha256,
    "manifest_sha256": "m" * 64,
    "source": str(d),
  }
  assert meta["architecture"]["d_model"] == 32 and meta["parameter_count"] == cfg.param_count()
  assert meta["tensors"]["blocks/attn/query/kernel"] == {"shape": [2, 32, 4, 8], "dtype": "float32"}
  assert set(os.listdir(tmp_path / "pkg")) == {
    "model.json",
    "weights.safetensors",
    "tokenizer.model",
    "README.md",
  }
  card = (tmp_path / "pkg" / "README.md").read_text()
  assert "blocks/attn/query/kernel | (2, 32, 4, 8) | float32" in card and "abc123" in card
  np.testing.assert_allclose(
    _logits(loaded.params, loaded.model_config, TOKENS), _logits(params, cfg, TOKENS), atol=1e-6
  )
  assert loaded.tokenizer.encode("the cat") == tok.encode("the cat")
  with pytest.raises(package.PackageError, match="exists and is not empty"):
    export_lib.export(str(d), str(tmp_path / "pkg"))


def test_overwrite_replaces_only_an_earlier_package(workdir, tmp_path):
  """--overwrite replaces an earlier package and nothing else: not the run being exported or a folder
  holding it, not another run directory, not a folder of other files, not a file. Before, each was
  moved aside and deleted (exporting a run onto itself left a package and no checkpoints)."""
  d = workdir[0]
  run, other, run2 = tmp_path / "run", tmp_path / "notes", tmp_path / "run2"
  shutil.copytree(d, run)
  shutil.copytree(d, run2)
  other.mkdir()
  (other / "a.txt").write_text("keep")
  (tmp_path / "file").write_text("x")
  before = sorted(os.listdir(run))
  for out, match in [
    (run, "is the model being exported or holds it"),
    (tmp_path, "is the model being exported or holds it"),
    (run2, "is a run directory \\(it holds run.json\\)"),
    (other, "is not a package \\(no model.json\\)"),
    (tmp_path / "file", "is a file"),
  ]:
    with pytest.raises(ArtifactError, match=match):  # PackageError is one
      export_lib.export(str(run), str(out), overwrite=True)
  assert sorted(os.listdir(run)) == before and sorted(os.listdir(run2)) == before
  assert (other / "a.txt").read_text() == "keep"
  pkg = tmp_path / "pkg"
  export_lib.export(str(run), str(pkg))
  export_lib.export(str(run), str(pkg), overwrite=True, weights_dtype="bfloat16")
  assert json.loads((pkg / "model.json").read_text())["precision"]["weights"] == "bfloat16"


def test_int8_within_bound_of_float(workdir, tmp_path):
  d, params, cfg, tok = workdir
  meta = export_lib.export(str(d), str(tmp_path / "q"), quantize="int8")
  f32_bytes = sum(np.asarray(x).nbytes for x in jax.tree.leaves(params))
  assert meta["precision"]["weights"] == "int8"
  assert meta["weights_bytes"] < 0.4 * f32_bytes
  q = open_model(str(tmp_path / "q"), dtype="auto")
  qmem = open_model(str(tmp_path / "q"), keep_int8=True, dtype="auto")
  assert quantize.has_qtensors(qmem.params) and not quantize.has_qtensors(q.params)
  want = _logits(params, cfg, TOKENS)
  got = _logits(q.params, q.model_config, TOKENS)
  # Stated bounds: the mean logit error is under 3% of the float logits' spread, the largest 20%.
  err = np.abs(got - want)
  print("int8 logit error mean/max vs std:", err.mean(), err.max(), want.std())
  assert err.mean() < 0.03 * want.std() and err.max() < 0.2 * want.std()
  # ... and perplexity on held-out text within 1% of float32.
  wins = precision_report.windows(tok.encode(_text(99, 2000)), cfg.max_seq_len, 8)
  ppl32 = precision_report.perplexity(params, cfg, wins)
  ppl8 = precision_report.perplexity(qmem.params, qmem.model_config, wins)
  print("perplexity float32 / int8:", ppl32, ppl8)
  assert abs(ppl8 / ppl32 - 1) < 0.01, (ppl8, ppl32)
  assert abs(precision_report.perplexity(q.params, q.model_config, wins) - ppl8) < 1e-3 * ppl8


def test_quantize_report_cli(workdir, tmp_path):
  """`python -m llm_jax.quantize` (a fresh process, the module run as __main__) reports every
  precision: sizes, perplexity change and decode speed."""
  import subprocess
  import sys

  d, params, cfg, tok = workdir
  package.write_package(str(tmp_path / "pkg"), params, cfg, str(d / "tokenizer.model"), step=3)
  (tmp_path / "held.txt").write_text(_text(7, 1500))
  out = subprocess.run(
    [
      sys.executable,
      "-m",
      "llm_jax.quantize",
      "--package",
      str(tmp_path / "pkg"),
      "--text",
      str(tmp_path / "held.txt"),
      "--batch",
      "1",
      "--new_tokens",
      "4",
      "--json",
    ],
    capture_output=True,
    text=True,
    timeout=300,
    env={**os.environ, "JAX_PLATFORMS": "cpu"},
  )
  assert out.returncode == 0, out.stderr[-2000:]
  rows = json.loads(out.stdout[: out.stdout.rindex("\n[")])  # the JSON, then a "[device]" line
  by = {r["variant"].split()[0].rstrip(","): r for r in rows}
  assert set(by) == {"float32", "bfloat16", "int8"} and len(rows) == 4, [r["variant"] for r in rows]
  int8 = [r for r in rows if r["variant"].startswith("int8")]
  # int8 kernels are a quarter of float32; in a model this small, float norms, biases and positions
  # and the per-channel scales add the rest (0.31 of float32 here)
  assert all(
    r["stored_bytes"] < min(0.35 * by["float32"]["stored_bytes"], by["bfloat16"]["stored_bytes"])
    for r in int8
  )
  assert all(abs(r["perplexity_change_pct"]) < 1.0 and r["tokens_per_s_batch1"] > 0 for r in int8)


def test_quantize_usage_errors_name_the_flag(tmp_path, capsys):
  """--batch=0 is a usage error naming --batch (it loaded the package and failed 'no prompts given')."""
  (tmp_path / "held.txt").write_text("x")
  for bad in (["--batch=0"], ["--batch=1", "--new_tokens=0"]):
    code = run_command(
      "llm_jax.quantize", f"--package={tmp_path / 'none'}", f"--text={tmp_path / 'held.txt'}", *bad
    )
    err = capsys.readouterr().err
    assert code == 2 and (bad[-1].split("=")[0] in err), err


def test_quantize_per_channel_roundtrip():
  w = np.random.default_rng(0).normal(size=(2, 16, 4, 8)).astype(np.float32)
  w[:, :, 1, :] *= 100  # one head much larger: per-channel scales keep the others precise
  tree = {
    "blocks": {"attn": {"query": {"kernel": w}, "out": {"kernel": w.transpose(0, 2, 3, 1)}}},
    "embedding": w[0, :, 0, :],
    "pos_embedding": w[0, :, 0, :],
  }
  q = quantize.quantize_params(tree)
  qk = q["blocks"]["attn"]["query"]["kernel"]
  assert qk.q.dtype == np.int8 and qk.scale.shape == (2, 1, 4, 8)
  assert q["blocks"]["attn"]["out"]["kernel"].scale.shape == (2, 1, 1, 16)
  assert q["embedding"].scale.shape == (16, 1) and not quantize.is_qtensor(q["pos_embedding"])
  back = quantize.dequantize(q)
  err = np.abs(np.asarray(back["blocks"]["attn"]["query"]["kernel"]) - w)
  assert (err <= np.abs(w).max(axis=1, keepdims=True) / 127 / 2 + 1e-6).all()
  assert err[:, :, 0].max() < 0.05  # the small head is not swamped by the large one


def test_bad_packages_fail_clearly(workdir, tmp_path):
  d, params, cfg, tok = workdir
  src = tmp_path / "good"
  package.write_package(str(src), params, cfg, str(d / "tokenizer.model"), step=7, weights_dtype="bfloat16")
  assert open_model(str(src), dtype="auto").meta["tensors"]["embedding"]["dtype"] == "bfloat16"

  def variant(name, edit):
    dst = tmp_path / name
    shutil.copytree(src, dst)
    edit(dst)
    return str(dst)

  def set_json(key, value):
    def edit(p):
      meta = json.loads((p / "model.json").read_text())
      meta[key] = value
      (p / "model.json").write_text(json.dumps(meta))

    return edit

  with pytest.raises(package.PackageError, match="format_version 99 .* newer llm_jax"):
    package.read_package(variant("newer", set_json("format_version", 99)))
  with pytest.raises(package.PackageError, match="format_version is missing"):
    package.read_package(variant("none", set_json("format_version", None)))
  arch = dict(json.loads((src / "model.json").read_text())["architecture"], moe_experts=8)
  with pytest.raises(package.PackageError, match="moe_experts"):
    package.read_package(variant("arch", set_json("architecture", arch)))
  with pytest.raises(package.PackageError, match="model.json is missing"):
    package.read_package(variant("nometa", lambda p: os.remove(p / "model.json")))
  # wrong types or ids name model.json and the field (they were a TypeError from jax naming neither,
  # a ValueError after loading, or, for an id past the vocabulary, no error and empty generations)
  for i, (key, value, match) in enumerate(
    [
      (
        "architecture",
        {**arch_wo(arch), "num_layers": "2"},
        "architecture.num_layers is '2'; it must be a JSON int",
      ),
      (
        "architecture",
        {**arch_wo(arch), "use_bias": 1},
        "architecture.use_bias is 1; it must be a JSON bool",
      ),
      ("prompt_prefix", "x", "prompt_prefix is 'x', not a list of token ids below"),
      ("prompt_prefix", [99999], "prompt_prefix is \\[99999\\], not a list of token ids below"),
    ]
  ):
    with pytest.raises(package.PackageError, match=f"model.json: {match}"):
      package.read_package(variant(f"typed{i}", set_json(key, value)))
    with pytest.raises(ArtifactError, match=match):
      open_model(str(tmp_path / f"typed{i}"), weights=False)

  def damage(p):
    raw = bytearray((p / "weights.safetensors").read_bytes())
    raw[-1] ^= 0xFF
    (p / "weights.safetensors").write_bytes(bytes(raw))

  with pytest.raises(package.PackageError, match="does not match model.json's weights_block_sha256"):
    package.read_package(variant("damaged", damage))

  def truncate(p):  # damaged where the tensors cannot even be read: still reported as damaged
    raw = (p / "weights.safetensors").read_bytes()
    (p / "weights.safetensors").write_bytes(raw[: len(raw) // 2])

  with pytest.raises(package.PackageError, match="does not match model.json's weights_bytes"):
    package.read_package(variant("truncated", truncate))
  with pytest.raises(package.PackageError, match="does not fit model.json's architecture"):
    package.read_package(variant("shape", set_json("architecture", {**arch_wo(arch), "d_model": 64})))


def test_weights_are_checked_block_by_block(workdir, tmp_path, monkeypatch):
  """Packages hash their weights in blocks that readers check on several threads (a warm server
  start-up waited ~2.4 s for one thread's sha256 of 500 MB); a changed byte anywhere, a file of
  another length, a malformed block list, and (for a package written before the blocks) the whole
  file's hash are all caught before any tensor is returned."""
  d, params, cfg, tok = workdir
  monkeypatch.setattr(weights_file, "WEIGHT_BLOCK_BYTES", 4096)
  src = tmp_path / "good"
  package.write_package(str(src), params, cfg, str(d / "tokenizer.model"), step=7)
  meta = json.loads((src / "model.json").read_text())
  blocks = meta["weights_block_sha256"]
  assert blocks["block_bytes"] == 4096 and len(blocks["sha256"]) == -(-meta["weights_bytes"] // 4096) > 3
  want = package.read_package(str(src))[0]

  def variant(name, raw_edit=None, meta_edit=None):
    dst = tmp_path / name
    shutil.copytree(src, dst)
    if raw_edit:
      raw = bytearray((dst / "weights.safetensors").read_bytes())
      (dst / "weights.safetensors").write_bytes(bytes(raw_edit(raw)))
    if meta_edit:
      m = json.loads((dst / "model.json").read_text())
      meta_edit(m)
      (dst / "model.json").write_text(json.dumps(m))
    return str(dst)

  def flip(at):
    def edit(raw):
      raw[at] ^= 0x01
      return raw

    return edit

  at = 2 * 4096 + 17  # a byte inside a tensor of the third block
  with pytest.raises(package.PackageError, match="weights_block_sha256 \\(the block at byte 8192\\)"):
    package.read_package(variant("third", flip(at)))
  with pytest.raises(package.PackageError, match="weights_bytes"):
    package.read_package(variant("longer", lambda raw: raw + b"\0"))
  with pytest.raises(package.PackageError, match="weights_block_sha256 .*positive integer"):
    package.read_package(variant("bad", meta_edit=lambda m: m["weights_block_sha256"].pop("block_bytes")))

  def older(m):  # as written before the blocks: the whole file's hash
    del m["weights_block_sha256"]

  with pytest.raises(package.PackageError, match="does not match model.json's weights_sha256"):
    package.read_package(variant("older_damaged", flip(at), older))
  got = package.read_package(variant("older", meta_edit=older))[0]
  for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(got), strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert package.read_package(variant("unchecked", flip(at)), verify=False) is not None


def arch_wo(arch):
  return {k: v for k, v in arch.items() if k != "moe_experts"}


def test_random_init_export_cli(workdir, tmp_path):
  d, _, _, tok = workdir
  rc = run_command(
    "llm_jax.export",
    "--random_init=configs/base.py",
    f"--tokenizer={d / 'tokenizer.model'}",
    f"--out={tmp_path / 'rnd'}",
    "--quantize=int8",
    *[f"--config_override={k}={v}" for k, v in OVERRIDES.items()],
  )
  assert rc == 0
  loaded = open_model(str(tmp_path / "rnd"), dtype="auto")
  assert loaded.meta["provenance"]["training_step"] == 0
  assert loaded.meta["precision"]["weights"] == "int8"
  with pytest.raises(ValueError, match="already int8"):  # the report compares from a float package
    precision_report.report(str(tmp_path / "rnd"), _text(5, 800))


def test_generate_cli_from_workdir(workdir, capsys):
  from llm_jax import generate

  d, params, cfg, tok = workdir
  assert run_command("llm_jax.generate", f"--workdir={d}", "--prompt=the cat", "--max_new_tokens=6") == 0
  out = capsys.readouterr().out
  want = generate.generate(
    params,
    cfg,
    [[tok.eos_id] + tok.encode("the cat")],
    generate.SamplingParams(max_new_tokens=6),
    tokenizer=tok,
  )[0].text
  assert out == "the cat" + want + "\n"
  # a prompt past the context: one line naming it before anything is written, exit 2 (it echoed the
  # prompt, then failed with exit 1); more new tokens than the context holds: said on stderr
  long = " ".join(["the cat"] * 40)
  assert run_command("llm_jax.generate", f"--workdir={d}", "--prompt=a", f"--prompt={long}") == 2
  got = capsys.readouterr()
  assert got.out == "" and "--prompt 2 is" in got.err and "context is 32" in got.err, got
  assert run_command("llm_jax.generate", f"--workdir={d}", "--prompt=the cat", "--max_new_tokens=500") == 0
  assert "new tokens at most: the context is 32" in capsys.readouterr().err


def test_inference_writes_float32_logits_whatever_training_wrote(tmp_path):
  """A run trained on an accelerator keeps logits_dtype='bfloat16' (model.logits_dtype='auto'). Opened
  for inference, the head writes float32 logits: decoding from bf16-rounded logits turned near-ties
  into exact ties that rounding broke either way (on an H200, speculative decoding in float32 chose
  another token than greedy decoding at logits equal in bfloat16)."""
  cfg = dataclasses.replace(SERVER_CFG, logits_dtype="bfloat16")
  pkg, _ = write_tiny_package(tmp_path, cfg)
  for dtype in ("float32", "bfloat16"):
    loaded = open_model(str(pkg), dtype=dtype)
    assert loaded.model_config.logits_dtype == "float32", dtype
  logits = np.asarray(prompt_logits(loaded.params, jnp.asarray([[1, 5, 6, 7]]), loaded.model_config))
  rounded = np.asarray(jnp.asarray(logits, jnp.bfloat16).astype(jnp.float32))
  assert (logits != rounded).mean() > 0.5  # not bfloat16 values widened
