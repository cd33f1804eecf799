"""KV-cache decoding: prefill, a jitted decode loop over a preallocated cache, sampling and text.

Greedy, temperature, top-k, top-p, repetition penalty, stop sequences, max new tokens, per-row seeds
and log-probabilities of the chosen tokens. Prompts of different lengths share a batch: they are
right-padded, and each row's decode continues at its own position.

    sampling.py  SamplingParams, top-k/top-p masks, the repetition penalty, the sampled token
    draw.py      DecodeState (per row, on device) and the draw of each row's next token from it
    decode.py    prefill, the decode step, start / decode_chunk / decode_loop, buckets
    mesh.py      parameters on a mesh for tensor-parallel decoding (shard_params, mesh_context)
    batching.py  prompts padded to bucketed shapes (make_batch, Batch)
    stream.py    TextStream (incremental detokenization, stops), stream() and generate()
    speculative.py  speculative decoding, greedy or sampled: a small draft model or prompt lookup proposes
                 tokens, the target checks them in one pass (rows=N: N prompts at a time, rows refilled)
    rounds.py    its compiled side: begin (both prefills), advance (the rounds), refill
    __main__.py  python -m llm_jax.generate --package=PKG --prompt "def main(" [--temperature=0.8]

Conventions: the token sampled at step i of a row sits at position len(prompt) + i; a row stops at
EOS (not emitted), after its max new tokens, or when its next position would pass max_seq_len.
Log-probabilities are of the model's own distribution (before penalty, temperature and filters).
"""

from llm_jax.generate.batching import Batch, make_batch, pad_prompts
from llm_jax.generate.decode import (
  EOS_ID,
  MIN_PREFILL,
  MIN_ROWS,
  MIN_SPAN,
  PAD_ID,
  bucket,
  decode_chunk,
  decode_loop,
  decode_span,
  empty_cache,
  empty_state,
  prompt_logits,
  row_axis,
  start,
)

# The unjitted prefill, draw and parameter dequantization, for callers that fuse them into their own
# jitted functions (llm_jax.serve admits prompts into a running batch and draws their first token).
from llm_jax.generate.decode import _float_params as _float_params
from llm_jax.generate.decode import _start as _start
from llm_jax.generate.draw import DecodeState
from llm_jax.generate.draw import draw as draw
from llm_jax.generate.mesh import mesh_context, shard_params
from llm_jax.generate.sampling import (
  SamplingParams,
  all_greedy,
  any_filtered,
  apply_repetition_penalty,
  chosen_logprob,
  needs_filter,
  sample,
  sampling_arrays,
  top_k_top_p_mask,
)
from llm_jax.generate.speculative import speculative_generate, speculative_stream
from llm_jax.generate.stream import Generation, TextStream, context_ids, decode_after, generate, stream

__all__ = [
  "EOS_ID",
  "MIN_PREFILL",
  "MIN_ROWS",
  "MIN_SPAN",
  "PAD_ID",
  "Batch",
  "DecodeState",
  "Generation",
  "SamplingParams",
  "TextStream",
  "all_greedy",
  "any_filtered",
  "apply_repetition_penalty",
  "bucket",
  "chosen_logprob",
  "context_ids",
  "decode_after",
  "decode_chunk",
  "decode_loop",
  "decode_span",
  "empty_cache",
  "empty_state",
  "generate",
  "make_batch",
  "mesh_context",
  "needs_filter",
  "pad_prompts",
  "prompt_logits",
  "row_axis",
  "sample",
  "sampling_arrays",
  "shard_params",
  "speculative_generate",
  "speculative_stream",
  "start",
  "stream",
  "top_k_top_p_mask",
]
