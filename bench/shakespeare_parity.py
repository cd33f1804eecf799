"""Quality-parity run: the real training loop (llm_jax.train.loop.train: real step, evaluation,
checkpoints, metrics) with nanoGPT's sampling, windows that start at uniformly random offsets.

The packaged loader cuts the corpus into fixed windows at multiples of seq_len, so a 1 MB corpus
gives ~3,900 distinct windows that a 5,000-step run sees 82 times each; random offsets give every
step new contexts, as the PyTorch reference does. Everything else is the packaged code.

    python bench/shakespeare_parity.py --config=configs/shakespeare_char.py --workdir=/tmp/shk \
        --config.data.corpus=runs/data/tinyshakespeare/tinyshakespeare_train.txt \
        --config.data.val_corpus=runs/data/tinyshakespeare/tinyshakespeare_val.txt
"""

from __future__ import annotations

import json
import os
import time

import jax
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from llm_jax.data.loader import Windows
from llm_jax.train import loop

_CONFIG = config_flags.DEFINE_config_file("config", None, "configs/shakespeare_char.py", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory.")


class RandomWindows:
  """This process's rows of global batch `step`: windows at random offsets, a function of (seed, step)."""

  def __init__(
    self,
    prepared_dir: str,
    seq_len: int,
    global_batch_size: int,
    seed: int,
    process_index: int = 0,
    process_count: int = 1,
  ):
    shards = Windows(prepared_dir, "train", seq_len).shards
    self.tokens = np.concatenate([np.asarray(s.tokens) for s in shards]).astype(np.int32)
    self.seq_len, self.seed, self.step = int(seq_len), int(seed), 0
    rows = global_batch_size // process_count
    self.rows = slice(process_index * rows, (process_index + 1) * rows)
    self.global_batch_size = int(global_batch_size)
    self._arange = np.arange(self.seq_len + 1)

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    rng = np.random.default_rng([self.seed, self.step])
    starts = rng.integers(0, len(self.tokens) - self.seq_len - 1, self.global_batch_size)[self.rows]
    window = self.tokens[starts[:, None] + self._arange]
    self.step += 1
    return {"inputs": window[:, :-1], "targets": window[:, 1:]}

  def get_state(self) -> dict:
    return {"step": self.step, "sampling": "random_offsets", "seed": self.seed}

  def set_state(self, state: dict) -> None:
    self.step = int(state["step"])


def main(argv):
  del argv
  config = _CONFIG.value
  t0 = time.time()

  def factory(setup):
    c = setup.config
    return RandomWindows(
      setup.prepared.dir,
      c.train.seq_len,
      c.train.global_batch_size,
      c.data.seed,
      jax.process_index(),
      jax.process_count(),
    )

  summary = loop.train(config, _WORKDIR.value, loader_factory=factory)
  wall = time.time() - t0
  rows = [json.loads(line) for line in open(os.path.join(_WORKDIR.value, "metrics.jsonl"))]
  evals = [(r["val_loss"], r["step"]) for r in rows if "val_loss" in r]
  best = min(evals) if evals else (float("nan"), -1)
  print(
    json.dumps(
      {
        "best_val_loss": best[0],
        "best_step": best[1],
        "final_val_loss": evals[-1][0],
        "loop_wall_s": summary.get("wall_s"),
        "command_wall_s": round(wall, 1),
        "steps": summary.get("step"),
      }
    )
  )


if __name__ == "__main__":
  flags.mark_flags_as_required(["config", "workdir"])
  app.run(main)
