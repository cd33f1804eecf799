"""Fine-tuning an imported Hugging Face model through the training loop: init_from an HF checkpoint
directory (freezing + SFT) or the package converted from it (LoRA), then back out with --format=hf.

The model is the golden LLaMA fixture (tests/fixtures/hf/llama, weights made by transformers) with its
tokenizer.json swapped for an llm_jax SentencePiece tokenizer.model (saved as Hugging Face does): the
round trip of one of our models through the Hugging Face format. Sources with their own tokenizers
(tokenizer.json, LLaMA-2 SentencePiece ids): tests/test_hf_finetune_tokenizers.py.
"""

import json
import os
import random
import shutil

import jax
import numpy as np
import pytest
from run_cmd import run_command

from llm_jax import config as config_lib
from llm_jax.artifacts import hf, open_model
from llm_jax.data import hf_tokenizer
from llm_jax.data.tokenizer import Tokenizer, train_tokenizer
from llm_jax.finetune import extension as finetune

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "hf", "llama")
WORDS = "alpha beta gamma delta value total count index item name data result list text line".split()
# The fixture's architecture as config.model keys (the shapes init_from checks, RoPE as imported).
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
  "model.norm_eps": 1e-5,
  "model.rope_scaling": "llama3",
  "model.rope_scaling_factor": 4.0,
  "model.rope_low_freq_factor": 0.25,
  "model.rope_high_freq_factor": 2.0,
  "model.rope_original_max_len": 16,
}


@pytest.fixture(scope="module")
def env(tmp_path_factory, devices):
  root = tmp_path_factory.mktemp("hfft")
  rng = random.Random(0)
  os.makedirs(root / "corpus")
  docs = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(30, 60))) + ".\n" for _ in range(40)]
  for i, doc in enumerate(docs):
    (root / "corpus" / f"d{i}.txt").write_text(doc)
  imported = root / "imported"
  shutil.copytree(FIXTURE, imported)
  for name in ("tokenizer.json", "tokenizer_config.json"):
    os.remove(imported / name)
  tok = train_tokenizer(docs * 3, str(root / "sp.model"), vocab_size=300)
  hf_tokenizer.save_hf_tokenizer(tok, str(imported), model_max_length=64)
  config = json.loads((imported / "config.json").read_text())
  config.update(pad_token_id=tok.pad_id, bos_token_id=tok.bos_id, eos_token_id=tok.eos_id)
  (imported / "config.json").write_text(json.dumps(config))
  # an instruct checkpoint's end-of-turn id beside EOS (LLaMA-3's <|eot_id|>): kept by its fine-tunes
  stop = tok.encode("item")[0]
  (imported / hf.GENERATION_CONFIG).write_text(json.dumps({"eos_token_id": [tok.eos_id, stop]}))
  sft = root / "sft.jsonl"
  sft.write_text(
    "\n".join(json.dumps({"prompt": f"item {i}", "response": f"value {i} total"}) for i in range(24)) + "\n"
  )
  old = jax.config.jax_compilation_cache_dir
  jax.config.update("jax_compilation_cache_dir", str(root / "xla_cache"))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
  over = {
    **LLAMA,
    "data.corpus": f"{root}/corpus/*.txt",
    "data.cache_dir": str(root / "data_cache"),
    "data.val_fraction": 0.15,
    "data.near_dup_threshold": 0.0,
    "train.seq_len": 32,
    "train.global_batch_size": 8,
    "train.steps": 4,
    "train.warmup_steps": 1,
    "train.learning_rate": 3e-3,
    "train.eval_every": 4,
    "train.eval_batches": 1,
    "train.checkpoint_every": 4,
    "train.sample_every": 0,
    "train.log_every": 1,
    "train.preflight": False,
    "sharding.data": 8,
    "reuse_source_tokenizer": True,
    "finetune.sft.train_file": str(sft),
    "finetune.sft.prompt_template": "Q: {prompt}\nA: ",
  }
  yield {"root": root, "imported": str(imported), "over": over, "tok": tok, "stop": stop}
  jax.config.update("jax_compilation_cache_dir", old)


def _config(env, **extra):
  return config_lib.load(
    "configs/base.py", {**env["over"], **{k.replace("__", "."): v for k, v in extra.items()}}
  )


@pytest.mark.slow
def test_freeze_and_sft_from_an_imported_checkpoint_then_export_to_hf(env):
  base = open_model(env["imported"])
  assert base.kind == "hf" and type(base.tokenizer) is Tokenizer
  workdir = str(env["root"] / "frozen")
  out = finetune.train(
    _config(
      env,
      init_from=env["imported"],
      finetune__freeze_embeddings=True,
      finetune__freeze_blocks=1,
      model__max_seq_len=48,  # a RoPE model's context sizes no weight: any, not only the source's 64
    ),
    workdir,
  )
  assert out["status"] == "complete" and out["step"] == 4 and np.isfinite(out["val_loss"])
  tuned = open_model(workdir)
  assert tuned.tokenizer.sha256 == env["tok"].sha256
  # SFT examples begin with BOS: so do its prompts (they got EOS, the pretraining separator); the
  # source's stop ids are kept (the fine-tune ran past them); the description says the same
  described = open_model(workdir, weights=False)
  for m in (tuned, described):
    assert m.prompt_prefix == [env["tok"].bos_id] and m.stop_ids == [env["stop"]]
    assert m.chat_template["prompt"] == "Q: {prompt}\nA: "
  np.testing.assert_array_equal(np.asarray(tuned.params["embedding"]), np.asarray(base.params["embedding"]))
  up_tuned = np.asarray(tuned.params["blocks"]["mlp"]["up"]["kernel"])
  up_base = np.asarray(base.params["blocks"]["mlp"]["up"]["kernel"])
  np.testing.assert_array_equal(up_tuned[0], up_base[0])  # the frozen bottom block
  assert not np.array_equal(up_tuned[1], up_base[1])
  back = str(env["root"] / "frozen_hf")
  assert run_command("llm_jax.export", "--format=hf", f"--workdir={workdir}", f"--out={back}") == 0
  params, cfg, tok, _ = hf.read_hf(back)
  assert tuned.model_config.max_seq_len == 48 and cfg.max_seq_len == 64  # the source's context declared
  assert cfg == base.model_config and tok.sha256 == env["tok"].sha256
  assert json.loads(open(os.path.join(back, hf.CONFIG)).read())["eos_token_id"] == [tok.eos_id, env["stop"]]
  # the chat template the model was fine-tuned with, as Jinja (the source's was shipped, or none)
  template = json.loads(open(os.path.join(back, "tokenizer_config.json")).read())["chat_template"]
  jinja2 = pytest.importorskip("jinja2")
  msgs = [{"role": "user", "content": "item 3"}]
  text = jinja2.Template(template).render(messages=msgs, add_generation_prompt=True)
  turn = tuned.chat_template["turn"]
  head = turn.split("{content}")[0]
  want = (
    tok.id_to_piece(tok.bos_id) + turn.format(role="user", content="item 3") + head.format(role="assistant")
  )
  assert text == want
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), b), tuned.params, params)


@pytest.mark.slow
def test_lora_from_the_package_converted_from_an_imported_checkpoint(env):
  pkg = str(env["root"] / "pkg")
  assert run_command("llm_jax.export", f"--workdir={env['imported']}", f"--out={pkg}") == 0
  workdir = str(env["root"] / "lora")
  out = finetune.train(
    _config(env, init_from=pkg, finetune__lora__rank=2, finetune__lora__targets="attn/query"), workdir
  )
  assert out["status"] == "complete" and np.isfinite(out["val_loss"])
  base, merged = open_model(pkg), open_model(workdir)  # adapters merged into the package's weights
  assert base.stop_ids == merged.stop_ids == [env["stop"]]
  q_base = np.asarray(base.params["blocks"]["attn"]["query"]["kernel"])
  assert not np.array_equal(np.asarray(merged.params["blocks"]["attn"]["query"]["kernel"]), q_base)
  np.testing.assert_array_equal(
    np.asarray(merged.params["blocks"]["mlp"]["up"]["kernel"]),
    np.asarray(base.params["blocks"]["mlp"]["up"]["kernel"]),
  )
