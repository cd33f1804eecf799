"""Streams one completion per prompt to stdout from a model package or a training run directory.

    python -m llm_jax.generate --package=PKG --prompt="def main(" [--temperature=0.8 --top_p=0.9]
    python -m llm_jax.generate --workdir=runs/tiny [--step=600] --prompt="The " --prompt="A "
    python -m llm_jax.generate --package=PKG --draft=SMALL_PKG [--draft_tokens=4] --prompt="def main("
    python -m llm_jax.generate --package=PKG --ngram=3 --prompt="$(cat file.py) # the same, renamed:"

The document separator the model saw before every training document (EOS) is put before each
prompt unless --no_prefix. Status lines (model loaded, seconds per prompt) go to stderr.

`--draft`: speculative decoding with a smaller model of the same tokenizer (a package or run
directory; generate/speculative.py): greedy, the same text as greedy decoding without it; sampled
(--temperature, --top_k, --top_p, --seed), text distributed as the model's own samples. It streams a
few rounds at a time, with the share of draft tokens accepted on stderr. `--ngram=N`: the same
without a draft model, the proposals looked up in the prompt and the tokens so far (the tokens that
followed the latest earlier occurrence of the last N or fewer): for outputs that repeat their input.
"""

from __future__ import annotations

import codecs
import dataclasses
import re
import sys
import time
from collections.abc import Iterator, Sequence

from absl import flags

from llm_jax import cli
from llm_jax.artifacts import open_model
from llm_jax.generate.sampling import SamplingParams
from llm_jax.generate.speculative import speculative_stream
from llm_jax.generate.stream import TextStream, stream
from llm_jax.model import default_levers, unstack_layers

_PACKAGE = flags.DEFINE_string("package", None, "An exported model package directory.")
_WORKDIR = flags.DEFINE_string("workdir", None, "A training run directory (latest checkpoint unless --step).")
_STEP = flags.DEFINE_string("step", None, "Checkpoint step of --workdir, or 'best' (default: latest).")
_PROMPT = flags.DEFINE_multi_string("prompt", None, "Prompt text (repeat the flag for several).")
_MAX_NEW_TOKENS = flags.DEFINE_integer("max_new_tokens", 64, "New tokens per prompt at most.")
_TEMPERATURE = flags.DEFINE_float("temperature", 0.0, "0 is greedy.")
_TOP_K = flags.DEFINE_integer("top_k", 0, "Keep the k most likely tokens (0: off).")
_TOP_P = flags.DEFINE_float("top_p", 1.0, "Keep the smallest set of tokens with this mass (1: off).")
_REPETITION_PENALTY = flags.DEFINE_float(
  "repetition_penalty", 1.0, "CTRL-style penalty on tokens already seen (1: off)."
)
_STOP = flags.DEFINE_multi_string("stop", [], "Stop sequence (repeatable; escapes such as \\n work).")
_SEED = flags.DEFINE_integer("seed", 0, "Sampling seed.")
_NO_PREFIX = flags.DEFINE_bool(
  "no_prefix", False, "Do not put the document separator (EOS, as in training) before the prompt."
)
_DTYPE = flags.DEFINE_enum(
  "dtype", None, ["float32", "bfloat16"], "Compute dtype (default: float32 on CPU, else bfloat16)."
)
_DRAFT = flags.DEFINE_string(
  "draft",
  None,
  "A smaller model (package or run directory, same tokenizer): speculative decoding.",
)
_DRAFT_TOKENS = flags.DEFINE_integer(
  "draft_tokens", 4, "Tokens proposed per round (--draft, --ngram).", lower_bound=1
)
_NGRAM = flags.DEFINE_integer(
  "ngram",
  None,
  "Speculative decoding by prompt lookup (no draft model): propose what followed the last N tokens.",
  lower_bound=1,
)
flags.mark_flags_as_mutual_exclusive(["package", "workdir"], required=True)
flags.mark_flags_as_mutual_exclusive(["draft", "ngram"])
flags.mark_flag_as_required("prompt")


_ESCAPE = re.compile(r"\\(?:u[0-9a-fA-F]{4}|U[0-9a-fA-F]{8}|x[0-9a-fA-F]{2}|[ntr0\\'\"])")


def _parse_stop(values: Sequence[str]) -> tuple[str, ...]:
  """--stop values with their escapes (\\n, \\t, \\u65e5, ...) read; other characters as written
  (a literal 日 went through unicode_escape's Latin-1 and became 'æ\\x97¥', which never matched)."""
  return tuple(_ESCAPE.sub(lambda m: codecs.decode(m.group(0), "unicode_escape"), v) for v in values if v)


def _pieces_differ(tokenizer, other) -> int:
  """How many ids two tokenizers map to different pieces (ids only one of them has count too)."""
  n = min(tokenizer.vocab_size, other.vocab_size)
  same = sum(tokenizer.id_to_piece(i) == other.id_to_piece(i) for i in range(n))
  return max(tokenizer.vocab_size, other.vocab_size) - same


def _speculate(params, cfg, draft, tokenizer, ids, sp: SamplingParams, note: list) -> Iterator[str]:
  """The text pieces of one prompt's greedy completion by speculative decoding, as they are decoded
  (stops honoured as `stream` honours them); appends a note of the draft tokens accepted to `note`."""
  text, stats = TextStream(tokenizer, sp.stop, context=ids, stop_ids=sp.stop_token_ids), {}
  try:
    rounds = speculative_stream(
      params,
      cfg,
      *draft,
      ids,
      max_new_tokens=sp.max_new_tokens,
      k=_DRAFT_TOKENS.value,
      eos_id=tokenizer.eos_id,
      vocab_limit=tokenizer.vocab_size,
      ngram=_NGRAM.value or 3,
      temperature=sp.temperature,
      top_k=sp.top_k,
      top_p=sp.top_p,
      seed=sp.seed,
    )
    for new, so_far in rounds:
      stats = so_far  # the last one is the whole prompt's
      for t in new:
        piece = text.push(t)
        if piece:
          yield piece
        if text.finished:
          break
      if text.finished:
        break
  except ValueError as e:
    raise cli.UsageError(f"--draft={_DRAFT.value}: {e}" if _DRAFT.value else f"--ngram: {e}") from e
  rest = text.close()
  if rest:
    yield rest
  share = stats["accepted"] / max(stats["proposed"], 1)
  what = "draft" if _DRAFT.value else "looked-up"
  note.append(f", {share:.0%} of {what} tokens accepted, {stats['rounds']} target calls")


def main(argv: list[str]) -> int:
  """Loads the model, then streams each prompt's completion to stdout."""
  del argv
  try:
    sp = SamplingParams(
      temperature=_TEMPERATURE.value,
      top_k=_TOP_K.value,
      top_p=_TOP_P.value,
      repetition_penalty=_REPETITION_PENALTY.value,
      max_new_tokens=_MAX_NEW_TOKENS.value,
      stop=_parse_stop(_STOP.value),
      seed=_SEED.value,
    )
  except ValueError as e:
    raise cli.UsageError(str(e)) from e
  speculate = _DRAFT.value or _NGRAM.value
  if speculate and sp.repetition_penalty != 1.0:
    name = "--draft" if _DRAFT.value else "--ngram"
    raise cli.UsageError(f"{name} takes no repetition penalty (--repetition_penalty=1)")
  t0 = time.time()
  loaded = open_model(
    _PACKAGE.value or _WORKDIR.value, cli.parse_step(_STEP.value), dtype=_DTYPE.value or "auto"
  )
  # One buffer per layer, laid out for the decode levers (model.default_levers): fewer kernels per
  # step; speculative decoding's layout has no one KV cache, which its check would copy per layer.
  levers = default_levers(loaded.params, speculative=bool(speculate))
  params, cfg = unstack_layers(loaded.params, loaded.model_config, levers=levers)
  print(f"[loaded {loaded.describe()} in {time.time() - t0:.1f}s]", file=sys.stderr)
  sp = dataclasses.replace(sp, stop_token_ids=tuple(loaded.stop_ids))  # e.g. LLaMA-3's <|eot_id|>
  draft = (None, None)  # --ngram: no draft model
  if _DRAFT.value:
    small = open_model(_DRAFT.value, dtype=_DTYPE.value or "auto")
    draft = unstack_layers(
      small.params, small.model_config, levers=default_levers(small.params, speculative=True)
    )
    print(f"[draft {small.describe()}]", file=sys.stderr)
    differ = _pieces_differ(loaded.tokenizer, small.tokenizer)
    if differ:  # correct text still (the model checks every token), but few proposals will match
      print(
        f"[warning: the draft's tokenizer differs from the model's at {differ} ids of"
        f" {loaded.tokenizer.vocab_size}: its proposals will seldom be accepted]",
        file=sys.stderr,
      )
  prefix = [] if _NO_PREFIX.value else loaded.prompt_prefix
  prompts = [(p, prefix + loaded.tokenizer.encode(p)) for p in _PROMPT.value]
  for i, (_, ids) in enumerate(prompts):  # all checked before anything is written
    if len(ids) >= cfg.max_seq_len:
      raise cli.UsageError(
        f"--prompt {i + 1} is {len(ids)} tokens (with the prompt prefix); the model's context is "
        f"{cfg.max_seq_len}: shorten it to {cfg.max_seq_len - 1} tokens or fewer"
      )
  for prompt, ids in prompts:
    room = cfg.max_seq_len - len(ids)
    if sp.max_new_tokens > room:
      print(f"[{room} new tokens at most: the context is {cfg.max_seq_len}]", file=sys.stderr)
    sys.stdout.write(prompt)
    sys.stdout.flush()
    t1 = time.time()
    note = []
    if not speculate:
      pieces = stream(params, cfg, loaded.tokenizer, ids, sp, eos_id=loaded.tokenizer.eos_id)
    else:
      pieces = _speculate(params, cfg, draft, loaded.tokenizer, ids, sp, note)
    for piece in pieces:
      sys.stdout.write(piece)
      sys.stdout.flush()
    sys.stdout.write("\n")
    print(f"[{time.time() - t1:.2f}s{''.join(note)}]", file=sys.stderr)
  return 0


if __name__ == "__main__":
  cli.run(main)
