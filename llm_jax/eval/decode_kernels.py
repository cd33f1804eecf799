"""Operations per decode step: the optimized HLO of `decode_loop`'s while body, counted by opcode.

Each top-level instruction of the body (a fusion, a gemm custom call, a scatter, a copy, ...) is one
kernel launch on a GPU, so the count is the number of kernels per decode step; on CPU it is a rough
proxy (CPU and GPU fuse differently). Used by bench/gpu_decode.sh and the decode-lever tests.
"""

from __future__ import annotations

import collections
import re

import jax

from llm_jax import generate as G

# Instructions that launch nothing: tuple plumbing, parameters, constants, views.
_FREE = {"parameter", "get-tuple-element", "tuple", "constant", "bitcast", "after-all", "partition-id"}
_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?[\w.\-]+\s*=\s*.*?\s([a-z][a-z0-9\-]*)\(", re.M)


def _computations(hlo: str) -> dict[str, str]:
  """{computation name: its body text} of an HLO module's text."""
  out, name, lines = {}, None, []
  for line in hlo.splitlines():
    m = re.match(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$", line)
    if m and not line.startswith(" "):
      name, lines = m.group(1), []
    elif line.startswith("}") and name is not None:
      out[name] = "\n".join(lines)
      name = None
    elif name is not None:
      lines.append(line)
  return out


def _opcode(line: str) -> str | None:
  if "=" not in line:
    return None
  rhs = line.split("=", 1)[1]
  # `%x = bf16[2,768]{1,0} fusion(...)`, `%y = (f32[..], s32[]) while(...)`: the opcode follows the
  # shape, which may be a tuple with spaces; take the first `word(` after the shape.
  m = re.search(r"(?:\]|\)|\}|[a-z0-9]\[\])\s+([a-z][a-z0-9\-]*)\(", rhs)
  if m is None:
    m = re.search(r"\s([a-z][a-z0-9\-]*)\(", rhs)
  return m.group(1) if m else None


def while_body_ops(hlo: str) -> collections.Counter:
  """Opcode counts of the largest while body in an optimized HLO module (the decode step)."""
  comps = _computations(hlo)
  bodies = re.findall(r"\bwhile\(.*?body=%?([\w.\-]+)", hlo)
  if not bodies:
    raise ValueError("no while loop in the HLO module")
  best = collections.Counter()
  for body in bodies:
    ops = _count(comps, body)
    if sum(ops.values()) > sum(best.values()):
      best = ops
  return best


def _count(comps: dict[str, str], name: str, depth: int = 0) -> collections.Counter:
  """Opcodes of a computation; a `call` (e.g. XLA:GPU's command-buffer outlining) counts its callee's."""
  ops = collections.Counter()
  for line in comps.get(name, "").splitlines():
    op = _opcode(line)
    callee = re.search(r"to_apply=%?([\w.\-]+)", line)
    if op == "call" and callee and depth < 4:
      ops.update(_count(comps, callee.group(1), depth + 1))
    elif op is not None and op not in _FREE:
      ops[op] += 1
  return ops


def speed_batch(cfg, batch: int, new_tokens: int) -> G.Batch:
  """The batch `eval.precision.decode_speed` times and `step_ops` compiles: `batch` prompts of 8
  tokens, greedy, `new_tokens` each (at most max_seq_len - 8)."""
  new_tokens = min(new_tokens, cfg.max_seq_len - 8)
  prompts = [[1, 5 + i % 50, 6, 7, 8, 9, 10, 11] for i in range(batch)]
  return G.make_batch(prompts, [G.SamplingParams(max_new_tokens=new_tokens)] * batch, cfg)


def step_ops(params, cfg, batch: int, new_tokens: int = 32) -> collections.Counter:
  """Opcode counts of one greedy decode step (compiled as `decode_speed` runs it, not executed)."""
  b = speed_batch(cfg, batch, new_tokens)
  state = jax.eval_shape(lambda p: b.start(p, cfg), params)
  lowered = G.decode_loop.lower(params, state, cfg=cfg, eos_id=-1, **b.loop_args())
  return while_body_ops(lowered.compile().as_text())


def format_ops(ops: collections.Counter) -> str:
  """'123 (fusion 80, custom-call 36, ...)': the total and the opcodes, most frequent first."""
  parts = ", ".join(f"{k} {v}" for k, v in ops.most_common())
  return f"{sum(ops.values())} ({parts})"
