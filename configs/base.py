"""Every field llm_jax reads, with its default and meaning. Presets start from this and change a few.

    python -m llm_jax.train --config=configs/base.py --workdir=runs/base

Durations may be given in steps or in tokens (`train.steps` / `train.tokens`); they are converted in
one place, `llm_jax.config.total_steps`.
"""

import ml_collections

from llm_jax import sharding


def get_config() -> ml_collections.ConfigDict:
  """Returns the full default config."""
  c = ml_collections.ConfigDict()
  c.run_tag = ""  # short label recorded in the run record (also --config.run_tag=...)
  c.run_note = ""  # free text recorded in the run record
  c.init_from = ""  # fine-tuning: a workdir, exported package or Hugging Face checkpoint directory
  # init_from: train on the source's tokenizer instead of a new one (set by itself when the source's
  # tokenizer is not llm_jax's SentencePiece model: a tokenizer.json, other special ids)
  c.reuse_source_tokenizer = False

  # ---------------------------------------------------------------- data (llm_jax.data)
  d = c.data = ml_collections.ConfigDict()
  d.corpus = "stdlib"  # comma-separated globs (.txt, .md, .jsonl) or the word "stdlib"
  d.val_corpus = ""  # a separate frozen validation source (same syntax); empty: use val_fraction
  d.val_fraction = 0.02  # share of documents held out, chosen by a hash of normalized content
  d.domain = ""  # force one domain name for every document of `corpus` (default: parent folder)
  d.max_doc_chars = 50_000  # longer documents are cut into pieces at paragraph boundaries
  d.min_doc_chars = 32  # quality filter: shorter documents are dropped
  d.max_nontext_fraction = 0.3  # quality filter: drop documents with more non-text characters
  # quality filter: drop raw documents with a larger share of control characters (other than tab and line
  # breaks) and U+FFFD replacement characters as "binary" junk; 1 disables
  d.max_control_fraction = 0.1
  # personal data and secrets become placeholders: e-mails, IPs, phone numbers, Luhn-valid card numbers,
  # API keys, AWS keys, GitHub tokens, private key blocks, JWTs (docs/data.md lists what is not covered)
  d.scrub_pii = True
  d.dedup_exact = True  # drop documents whose normalized text hashes equal
  d.near_dup_threshold = 0.8  # MinHash LSH Jaccard threshold; 0 disables near-dedup
  d.minhash_num_perm = 64  # MinHash permutations
  d.exclude = ""  # a file of document ids or content hashes (one a line) to drop everywhere
  d.strict_removals = False  # True: an exclude entry that matches no document fails; False: a warning
  # exclude: near copies (MinHash Jaccard >= this) of a removed document go too; 0: exact copies only
  d.removal_near_threshold = 0.7
  # True: a paragraph (>= 100 chars) already held by an earlier document is removed (licence headers,
  # boilerplate); False: repeated paragraphs are only counted in the data card
  d.dedup_paragraphs = False
  d.on_bad_record = "fail"  # fail | skip: a malformed JSONL line or undecodable file
  d.cache_dir = ""  # where prepared data is cached; empty: ~/.cache/llm_jax/prepared
  d.num_workers = 0  # tokenizer processes; 0: one per core
  d.segment_windows = False  # True: windows never cross documents (segment ids); False: packed
  d.mixture = ""  # optional domain weights "docs=0.3,code=0.7"; empty: natural proportions
  d.seed = 0  # shuffling seed of the loader
  # Loader: shift the training window grid every epoch by an offset in [0, seq_len) drawn from (seed, epoch),
  # so epochs see different windows; False: the same fixed windows every epoch, reshuffled (the old loader)
  d.window_offsets = True
  d.stdlib_max_bytes = 16_000_000  # corpus "stdlib": at most this many bytes of stdlib .py files
  d.license = "unknown"  # license recorded for .txt/.md/.jsonl sources (a JSONL "license" field wins)
  d.shard_tokens = 50_000_000  # tokens per shard file (documents never straddle shards)

  t = d.tokenizer = ml_collections.ConfigDict()
  t.type = "bpe"  # bpe | unigram | char
  t.vocab_size = 4096  # pieces, including the special ids below
  t.character_coverage = 0.9995
  t.lowercase = False  # fold case before training and encoding
  t.max_sentence_length = 16384  # SentencePiece's longest training sentence in bytes
  t.input_sentence_size = 2_000_000  # training sentences sampled at most
  # Special ids are fixed: pad=0, bos=1, eos=2, unk=3.
  t.encoder_pieces = False  # True: control pieces [MASK]=4, [CLS]=5, [SEP]=6 too (encoders need them)

  # ---------------------------------------------------------------- model (llm_jax.model)
  m = c.model = ml_collections.ConfigDict()
  m.vocab_size = 0  # 0: the tokenizer's size rounded up to vocab_multiple
  m.vocab_multiple = 128  # embedding rows are padded to a multiple of this
  m.num_layers = 4
  m.d_model = 256
  m.num_heads = 4
  m.num_kv_heads = 0  # 0: same as num_heads; fewer: grouped-query attention
  m.head_dim = 0  # 0: d_model // num_heads
  m.mlp_dim = 0  # 0: 4 * d_model (gelu) or the LLaMA 8/3 rule rounded to 256 (swiglu)
  m.max_seq_len = 256  # positions the model supports (learned table size, RoPE range)
  m.positions = "learned"  # learned | rope
  m.rope_theta = 10_000.0
  m.rope_scaling = "none"  # none | linear (frequencies / factor) | llama3 (LLaMA 3.1 frequency bands)
  m.rope_scaling_factor = 1.0
  m.rope_low_freq_factor = 1.0  # llama3: wavelengths above original_max_len / this are divided by factor
  m.rope_high_freq_factor = 4.0  # llama3: wavelengths below original_max_len / this are kept
  m.rope_original_max_len = 8192  # llama3: the context length the unscaled model was trained for
  m.norm = "layernorm"  # layernorm | rmsnorm
  m.norm_eps = 1e-5
  m.activation = "gelu"  # gelu | swiglu
  m.tie_embeddings = True  # output head shares the token embedding
  m.use_bias = True  # biases in dense layers and norms
  m.dropout = 0.0
  m.attention_dropout = 0.0  # > 0: dropout on attention probabilities (nanoGPT's attn_dropout); the
  # training step then uses unfused XLA attention instead of cuDNN flash attention
  m.dtype = "auto"  # compute dtype: auto (bfloat16 on GPU/TPU, float32 on CPU) | bfloat16 | float32
  m.param_dtype = "float32"  # parameters and optimizer state
  m.attention = "auto"  # auto | cudnn | xla (jax.nn.dot_product_attention implementation)
  m.scan_layers = True  # one scanned block: fast compiles
  # scan_layers: layers per loop iteration; num_layers unrolls fully (fastest step, same params)
  m.scan_unroll = 1
  m.remat = "none"  # none | full | dots (save matmul outputs) | dots_no_batch
  m.init_std = 0.02  # GPT-2 init; residual projections scaled by 1/sqrt(2 * num_layers)
  m.logits_via_embedding_dtype = "float32"  # loss and softmax precision
  # Output-head matmul result: auto (the compute dtype, as PyTorch autocast) | float32. The loss's
  # softmax is float32 either way; bfloat16 logits halve the traffic of the largest tensor.
  m.logits_dtype = "auto"
  # False: bidirectional attention, a BERT-style encoder trained by llm_jax.encoder (encoder.* below)
  m.causal = True
  # True: the MLP matmuls in FP8 (e4m3 forward, e5m2 gradients, per-tensor scales from the current
  # amax; attention, norms and softmax stay in `dtype`); FP8 GEMMs need a Hopper-class GPU, elsewhere
  # it is emulated. KV-cache decoding ignores it. docs/performance.md, "Training switches":
  #   python -m llm_jax.bench --config=configs/gpt_small.py --synthetic --variant='model.fp8=True'
  m.fp8 = False
  # With fp8: the output head's matmul in FP8 too. Off by default: in FP8 the head moves the gradient
  # several times more than the MLP does (docs/performance.md, "Which FP8 matmuls cost the loss").
  m.fp8_head = False
  # The GELU MLP's backward GEMM and GELU gradient in one Mosaic GPU kernel: auto | xla | mosaic (auto:
  # the kernel on Hopper GPUs for a GELU MLP without fp8, XLA elsewhere; llm_jax.model.gelu_kernel,
  # docs/performance.md, "Round seven"):
  #   python -m llm_jax.bench --config=configs/gpt_small.py --synthetic --variant='model.gelu_kernel=xla'
  m.gelu_kernel = "auto"

  # ---------------------------------------------------------------- training (llm_jax.train)
  tr = c.train = ml_collections.ConfigDict()
  tr.seq_len = 256  # tokens per example (windows of seq_len + 1)
  tr.global_batch_size = 32  # examples per optimizer step over all devices and processes
  tr.microbatches = 1  # gradient accumulation: the global batch is split into this many passes
  tr.steps = 1000  # budget in optimizer steps (used when tokens == 0)
  tr.tokens = 0  # budget in tokens; > 0 overrides steps
  tr.seed = 0  # parameter init seed
  tr.dropout_seed = 0
  tr.learning_rate = 1e-3  # peak
  tr.warmup_steps = 100
  tr.schedule = "cosine"  # cosine | linear | constant (after warm-up)
  tr.min_lr_ratio = 0.1  # floor of the decay as a fraction of the peak
  tr.decay_steps = 0  # 0: decay over the whole budget
  tr.weight_decay = 0.1
  tr.decay_norms_biases_embeddings = False  # AdamW decay on norms, biases and embeddings too
  tr.b1 = 0.9
  tr.b2 = 0.95
  tr.eps = 1e-8
  tr.grad_clip = 1.0  # global-norm clipping; 0 disables
  tr.z_loss = 0.0  # weight of log(Z)^2; 0 disables
  # > 0: the training loss computes head matmul + cross-entropy in this many slices of the sequence, with
  # the gradients taken inside each slice, so the [batch, length, vocab] logits never exist at once; 0: one
  # matmul over the whole batch (docs/performance.md, "Training switches"):
  #   python -m llm_jax.bench --config=configs/gpt_small.py --synthetic --variant='train.loss_chunks=8'
  tr.loss_chunks = 0
  # auto | xla | pallas: the training loss's softmax, nll and d(logits) as XLA's fusions (three passes over
  # the logits) or one fused Pallas kernel (Triton on GPUs, Pallas's interpreter on CPUs, for tests;
  # combines with loss_chunks); auto: the kernel on GPUs unless sharding splits the vocabulary, XLA
  # elsewhere (docs/performance.md, "Round four"):
  #   python -m llm_jax.bench --config=configs/gpt_small.py --synthetic --variant='train.loss_kernel=xla'
  tr.loss_kernel = "auto"
  tr.nan_policy = "abort"  # abort | skip
  tr.max_consecutive_skips = 5  # skip policy: abort after this many non-finite steps in a row
  tr.log_every = 10  # metrics to TensorBoard / metrics.jsonl
  tr.eval_every = 200  # held-out evaluation; 0 disables
  tr.eval_batches = 8  # validation batches per evaluation (global batch each)
  tr.checkpoint_every = 500
  tr.keep_checkpoints = 3  # keep the last K ...
  tr.keep_every = 0  # ... plus every M-th step (0: none)
  tr.sample_every = 500  # sampled continuations to the log/TensorBoard; 0 disables
  tr.sample_prompts = "def ,import ,The "  # comma-separated prompts for samples
  tr.sample_tokens = 48
  tr.preflight = True  # tokenizer round trip, one batch through the model, one update lowers loss
  tr.profile_steps = ""  # "START,STOP": a JAX profiler trace into tb/
  tr.throughput_alert = 0.5  # warn when tokens/s falls below this share of its running median
  tr.plateau_evals = 5  # warn when val loss has not improved for this many evaluations
  tr.restore_fallback = False  # a checkpoint that fails to restore: move it to checkpoints/corrupt/STEP
  # and resume from the one before
  tr.keep_best = True  # with evaluation: keep the best-val-loss checkpoint beyond keep_checkpoints
  tr.early_stop_patience = 0  # end the run after this many evaluations without improvement; 0: never

  # ---------------------------------------------------------------- sharding (llm_jax.sharding)
  s = c.sharding = ml_collections.ConfigDict()
  s.data = -1  # mesh axis sizes; -1 takes the rest of the devices
  s.fsdp = 1
  s.tensor = 1
  s.rules = sharding.DEFAULT_RULES  # logical axis -> mesh axes (llm_jax/sharding.py documents them)

  # ---------------------------------------------------------------- fine-tuning (llm_jax.finetune)
  # Used with init_from (top level). docs/finetune.md has a worked example.
  f = c.finetune = ml_collections.ConfigDict()
  f.init_step = -1  # step of the init_from run's checkpoint to start from; -1: its latest
  f.freeze_embeddings = False  # freeze the token (and learned position) embeddings; tied: the head too
  f.freeze_blocks = 0  # freeze the first N transformer blocks (rows < N of the scanned arrays)
  f.freeze_patterns = ""  # comma-separated regexes over parameter names, e.g. "final_norm,/bias$"
  lo = f.lora = ml_collections.ConfigDict()
  lo.rank = 0  # > 0: train low-rank adapters only (the base stays frozen); 0: off
  lo.alpha = 16.0  # W_eff = W + (alpha / rank) * A @ B
  lo.dropout = 0.0  # dropout on the adapter path's input features
  # comma-separated regexes over kernel names (blocks/attn/query/kernel, blocks/mlp/up/kernel, ...)
  lo.targets = r"attn/(query|key|value|out)/kernel,mlp/(gate|up|down)/kernel"
  sf = f.sft = ml_collections.ConfigDict()
  sf.train_file = ""  # JSONL of {"prompt","response"} or {"messages":[{"role","content"}]}; replaces data
  sf.val_file = ""  # held-out JSONL in the same format; empty: no SFT evaluation
  sf.prompt_template = "### Prompt:\n{prompt}\n\n### Response:\n"  # the response follows it
  sf.turn_template = "<|{role}|>\n{content}\n"  # each message; loss on assistant content + its tail

  # ---------------------------------------------------------------- encoders (llm_jax.encoder)
  # Used with model.causal=False. docs/training.md (masked LM) and docs/finetune.md (classification).
  e = c.encoder = ml_collections.ConfigDict()
  e.task = "mlm"  # mlm (masked-language modelling) | classify (text classification from jsonl)
  e.mask_rate = 0.15  # mlm: share of tokens chosen for the loss
  e.mask_token_rate = 0.8  # mlm: of the chosen, replaced by [MASK] ...
  e.random_token_rate = 0.1  # ... or by a random token; the rest are kept as they are
  e.train_file = ""  # classify: JSONL of {"text": ..., "label": ...}
  e.val_file = ""  # classify: held-out JSONL in the same format (accuracy, macro-F1, confusion matrix)
  e.labels = ""  # classify: comma-separated label names; empty: the sorted labels of train_file
  e.pooling = "cls"  # classify: cls (the [CLS] position) | mean (over the text's tokens)

  # ---------------------------------------------------------------- distributed (llm_jax.distributed)
  di = c.distributed = ml_collections.ConfigDict()
  di.coordinator_address = ""  # explicit multi-process start; empty: detect SLURM / TPU or run alone
  di.num_processes = 0
  di.process_id = -1
  di.heartbeat_timeout_s = 100  # a dead peer is noticed within about this long
  # Locked: a preset may change any field, but a misspelt one (c.train.stpes = 5) fails naming the closest
  # real key instead of adding a key nothing reads (code that adds keys uses `with c.unlocked():`).
  c.lock()
  return c
