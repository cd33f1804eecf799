"""Supervised fine-tuning data: JSONL conversations -> packed rows with loss on response tokens only.

Each line is either `{"prompt": ..., "response": ...}` or `{"messages": [{"role", "content"}, ...]}`
(roles system, user, assistant; at least one assistant turn). A line is rendered with the templates in
config.finetune.sft, tokenized piece by piece (so the boundary between prompt and response is exact),
wrapped in bos ... eos, and every token gets a weight: 1 when it belongs to a response (the assistant's
content, the text the template puts after it, and the final eos), else 0. Examples are packed greedily
into rows of train.seq_len with `segment_ids` (1, 2, ... per example, 0 for padding) and `positions`
restarting at 0 in every example, so packed examples never attend to each other.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from collections.abc import Iterator

import grain
import numpy as np

from llm_jax.data.errors import DataError
from llm_jax.data.loader import StepLoader

ROLES = ("system", "user", "assistant")
_STATE_KEYS = ("seq_len", "global_batch_size", "seed", "data_sha256")


class SFTError(DataError):
  """A bad SFT file, line or template; the message names the file and line or the config key."""


@dataclasses.dataclass(frozen=True)
class Templates:
  """How a record becomes text: the prompt template and the per-turn template."""

  prompt: str = "### Prompt:\n{prompt}\n\n### Response:\n"
  turn: str = "<|{role}|>\n{content}\n"

  def check(self) -> None:
    if "{prompt}" not in self.prompt:
      raise SFTError(f"finetune.sft.prompt_template={self.prompt!r} must contain {{prompt}}")
    if "{content}" not in self.turn or "{role}" not in self.turn:
      raise SFTError(f"finetune.sft.turn_template={self.turn!r} must contain {{role}} and {{content}}")
    try:
      self.prompt.format(prompt="")
      self.turn.format(role="", content="")
    except (KeyError, IndexError, ValueError) as e:
      raise SFTError(
        f"finetune.sft templates: unknown or malformed field {e}; only {{prompt}} "
        "(prompt_template) and {role}, {content} (turn_template) are filled; write other "
        "braces as {{ and }}"
      ) from e


def templates_from_config(config) -> Templates:
  """Templates from config.finetune.sft (defaults when the section is absent)."""
  f = config.get("finetune") if hasattr(config, "get") else None
  s = f.get("sft") if f is not None else None
  t = Templates() if s is None else Templates(prompt=s.prompt_template, turn=s.turn_template)
  t.check()
  return t


def render(record: dict, templates: Templates) -> list[tuple[str, bool]]:
  """A record as (text, trained) pieces: prompts and headers untrained, responses trained."""
  if "messages" in record:
    pieces = []
    for m in record["messages"]:
      head, _, tail = templates.turn.format(role=m["role"], content="\x00").partition("\x00")
      trained = m["role"] == "assistant"
      pieces += [(head, False), (m["content"], trained), (tail, trained)]
    return [p for p in pieces if p[0]]
  return [(templates.prompt.format(prompt=record["prompt"]), False), (record["response"], True)]


def _check_record(rec, where: str) -> dict:
  if not isinstance(rec, dict):
    raise SFTError(f"{where}: a line must be a JSON object, got {type(rec).__name__}")
  if "messages" in rec:
    msgs = rec["messages"]
    if not isinstance(msgs, list) or not msgs:
      raise SFTError(f"{where}: 'messages' must be a non-empty list of {{role, content}} objects")
    msgs = [_message(m, f"{where}: messages[{i}]") for i, m in enumerate(msgs)]
    if not any(m["role"] == "assistant" and m["content"] for m in msgs):
      raise SFTError(f"{where}: no assistant message with content: nothing to train on (no response)")
    return {**rec, "messages": msgs}
  for key in ("prompt", "response"):
    if key not in rec:
      raise SFTError(f"{where}: missing key {key!r}; a line needs 'prompt' and 'response' (or 'messages')")
    if not isinstance(rec[key], str):
      raise SFTError(f"{where}: {key!r} must be a string, got {type(rec[key]).__name__}")
  if not rec["response"]:
    raise SFTError(f"{where}: 'response' is empty: nothing to train on")
  for key in ("prompt", "response"):
    _check_unicode(rec[key], f"{where}: {key!r}")
  return rec


def _message(m, where: str) -> dict:
  """One chat message as the server reads it: role `developer` is `system` (OpenAI's newer name),
  content a string or a list of {"type": "text", "text": ...} parts (joined)."""
  if not isinstance(m, dict) or not isinstance(m.get("role"), str):
    raise SFTError(f"{where} must be an object with string 'role' and 'content'")
  content = m.get("content")
  if isinstance(content, list) and all(
    isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in content
  ):
    content = "".join(p["text"] for p in content)
  if not isinstance(content, str):
    raise SFTError(
      f"{where} must be an object with string 'role' and 'content' (a string or a list of text parts)"
    )
  role = "system" if m["role"] == "developer" else m["role"]
  if role not in ROLES:
    raise SFTError(f"{where}.role={m['role']!r} is not one of {', '.join(ROLES)} (or developer)")
  _check_unicode(content, f"{where}.content")
  return {**m, "role": role, "content": content}


def _check_unicode(text: str, where: str) -> None:
  """A lone surrogate (JSON can escape one, "\\ud800") is no Unicode text: named, not a TypeError."""
  try:
    text.encode("utf-8")
  except UnicodeEncodeError as e:
    raise SFTError(
      f"{where} holds a lone surrogate (U+{ord(text[e.start]):04X} at character {e.start}), "
      "which is not valid Unicode text"
    ) from e


def read_jsonl(path: str) -> list[dict]:
  """The records of an SFT file; a malformed line raises naming the file and line."""
  try:  # lines end at \n alone: JSON strings may hold U+2028, U+0085 raw (splitlines split them)
    with open(path, encoding="utf-8-sig", newline="") as f:
      lines = [line.removesuffix("\r") for line in f.read().split("\n")]
  except OSError as e:
    raise SFTError(f"cannot read SFT file {path!r}: {e}") from e
  except UnicodeDecodeError as e:
    raise SFTError(f"{path}: not UTF-8 text ({e})") from e
  records = []
  for lineno, line in enumerate(lines, 1):
    if not line.strip():
      continue
    where = f"{path}:{lineno}"
    try:
      rec = json.loads(line)
    except json.JSONDecodeError as e:
      raise SFTError(f"{where}: not valid JSON at column {e.colno} ({e.msg})") from e
    records.append(_check_record(rec, where))
  if not records:
    raise SFTError(f"{path}: no records")
  return records


def tokenize(record: dict, tokenizer, templates: Templates) -> tuple[np.ndarray, np.ndarray]:
  """(ids [n] int32, weights [n] float32): bos + pieces + eos; weight 1 on response tokens and eos."""
  ids, w = [tokenizer.bos_id], [0.0]
  pieces = render(record, templates)
  for text, trained in pieces:
    new = tokenizer.encode(text)
    ids += new
    w += [1.0 if trained else 0.0] * len(new)
  ids.append(tokenizer.eos_id)
  w.append(1.0 if pieces[-1][1] else 0.0)
  return np.asarray(ids, np.int32), np.asarray(w, np.float32)


def pack(
  examples: list[tuple[np.ndarray, np.ndarray]], seq_len: int, source: str = "SFT data"
) -> dict[str, np.ndarray]:
  """Examples -> rows [R, seq_len] of inputs, targets, weights (of targets), segment_ids, positions.

  An example of n tokens gives n-1 (input, target) pairs; longer than seq_len it is cut to seq_len
  pairs. Examples fill rows first-fit in order; an example never straddles rows. `source` names the
  examples in warnings and errors (the SFT file).
  """
  L = int(seq_len)
  rows: list[list[tuple[np.ndarray, np.ndarray, np.ndarray]]] = []
  used: list[int] = []
  cut, dropped = [], []  # record numbers (1-based)
  for k, (ids, w) in enumerate(examples, 1):
    inp, tgt, tw = ids[:-1], ids[1:], w[1:]
    if len(inp) > L:
      cut.append(k)
      inp, tgt, tw = inp[:L], tgt[:L], tw[:L]
    if not tw.any():
      dropped.append(k)
      continue
    for r in range(max(0, len(rows) - 8), len(rows)):  # first fit among the last few open rows
      if used[r] + len(inp) <= L:
        rows[r].append((inp, tgt, tw))
        used[r] += len(inp)
        break
    else:
      rows.append([(inp, tgt, tw)])
      used.append(len(inp))
  if cut:
    logging.warning(
      "%s: %d examples longer than train.seq_len=%d were cut (the first: record %d)",
      source,
      len(cut),
      L,
      cut[0],
    )
  if dropped:
    logging.warning(
      "%s: %d examples had no response token within train.seq_len=%d and were dropped (the first: record %d)",
      source,
      len(dropped),
      L,
      dropped[0],
    )
  if not rows:
    raise SFTError(
      f"{source}: no example has a response token within train.seq_len={L} (prompts too long: raise "
      "train.seq_len or shorten them)"
    )
  R = len(rows)
  out = {k: np.zeros((R, L), np.int32) for k in ("inputs", "targets", "segment_ids", "positions")}
  out["weights"] = np.zeros((R, L), np.float32)
  for r, row in enumerate(rows):
    at = 0
    for seg, (inp, tgt, tw) in enumerate(row, 1):
      n = len(inp)
      out["inputs"][r, at : at + n] = inp
      out["targets"][r, at : at + n] = tgt
      out["weights"][r, at : at + n] = tw
      out["segment_ids"][r, at : at + n] = seg
      out["positions"][r, at : at + n] = np.arange(n)
      at += n
  out["domain_ids"] = np.zeros((R, L), np.int32)
  return out


def load(path: str, tokenizer, seq_len: int, templates: Templates) -> dict[str, np.ndarray]:
  """An SFT file read, tokenized and packed (see `pack`)."""
  records = read_jsonl(path)
  rows = pack([tokenize(r, tokenizer, templates) for r in records], seq_len, source=path)
  logging.info(
    "SFT %s: %d records -> %d rows of %d tokens, %.0f response tokens",
    path,
    len(records),
    len(rows["inputs"]),
    seq_len,
    rows["weights"].sum(),
  )
  return rows


def rows_sha256(rows: dict[str, np.ndarray]) -> str:
  """A hash of packed rows (the identity of the stream, stored with the iterator state)."""
  h = hashlib.sha256()
  for k in sorted(rows):
    h.update(k.encode())
    h.update(np.ascontiguousarray(rows[k]).tobytes())
  return h.hexdigest()[:20]


class SFTLoader(StepLoader):
  """Shuffled, repeating, resumable batches of packed SFT rows with the TrainLoader interface."""

  state_keys = _STATE_KEYS

  def __init__(
    self,
    rows: dict[str, np.ndarray],
    global_batch_size: int,
    seed: int,
    process_index: int = 0,
    process_count: int = 1,
  ):
    if global_batch_size <= 0 or global_batch_size % process_count:
      raise SFTError(
        f"train.global_batch_size={global_batch_size} must be a positive multiple of the "
        f"process count {process_count}"
      )
    self.rows = rows
    self.seq_len = int(rows["inputs"].shape[1])
    self.global_batch_size, self.seed = int(global_batch_size), int(seed)
    self.process_index, self.process_count = int(process_index), int(process_count)
    self.local_batch_size = self.global_batch_size // self.process_count
    self.data_sha256 = rows_sha256(rows)
    self.step = 0
    n = len(rows["inputs"])
    ids = grain.MapDataset.range(n).shuffle(seed=self.seed % (1 << 32)).repeat()
    batches = ids.batch(self.local_batch_size, batch_fn=lambda x: np.asarray(x, np.int64))
    local = batches[self.process_index :: self.process_count]
    self.dataset = local.map(lambda idx: {k: v[idx] for k, v in self.rows.items()})

  def _mismatch(self, key: str, saved) -> Exception:
    return SFTError(
      f"loader state field {key!r} is {saved!r} but this SFT loader has "
      f"{getattr(self, key)!r}; the checkpoint was made with other SFT data or settings"
    )

  @property
  def epoch(self) -> float:
    return self.step * self.global_batch_size / len(self.rows["inputs"])


def eval_batches(
  rows: dict[str, np.ndarray],
  batch_size: int,
  max_batches: int | None = None,
  process_index: int = 0,
  process_count: int = 1,
) -> Iterator[dict[str, np.ndarray]]:
  """Every packed row once, in order; padding rows of the last batch have weights 0."""
  n = len(rows["inputs"])
  b = batch_size // process_count
  n_batches = -(-n // batch_size)
  if max_batches is not None:
    n_batches = min(n_batches, int(max_batches))
  for i in range(n_batches):
    lo = i * batch_size + process_index * b
    idx = np.arange(lo, lo + b)
    valid = idx < n
    idx = np.where(valid, idx, 0)
    batch = {k: v[idx] for k, v in rows.items()}
    batch["weights"] = batch["weights"] * valid[:, None]
    yield batch
