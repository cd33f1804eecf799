"""TrainLoader / eval_batches: determinism, process slicing, epochs, domains, segments, mixture, resume."""
import json
import os
import random
import subprocess
import sys

import numpy as np
import pytest

from configs import base
from llm_jax.data.errors import DataError
from llm_jax.data.loader import TrainLoader, eval_batches
from llm_jax.data.prepare import prepare
from llm_jax.data.shards import open_split
from llm_jax.data.tokenizer import EOS_ID

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
L, G = 16, 8


@pytest.fixture(scope="module")
def pdir(tmp_path_factory):
  root = tmp_path_factory.mktemp("corpus")
  rng = random.Random(0)
  vocab = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 9)))
           for _ in range(300)]
  for dom, n in (("prose", 30), ("code", 15)):
    (root / dom).mkdir()
    for i in range(n):
      words = [rng.choice(vocab) for _ in range(rng.randint(20, 150))]
      text = " ".join(words) if dom == "prose" else "def f():\n    " + "\n    ".join(words) + "\n"
      (root / dom / f"{i}.txt").write_text(text, encoding="utf-8")
  c = base.get_config()
  c.data.corpus = f"{root}/prose/*.txt,{root}/code/*.txt"
  c.data.cache_dir = str(tmp_path_factory.mktemp("cache"))
  c.data.tokenizer.vocab_size = 400
  c.data.val_fraction = 0.2
  c.data.shard_tokens = 1500
  c.data.num_workers = 1
  return prepare(c).dir


def _global(pdir, step, n, **kw):
  parts = [TrainLoader(pdir, "train", L, G, seed=3, process_index=p, process_count=n, **kw).batch_at(step)
           for p in range(n)]
  return {k: np.concatenate([b[k] for b in parts]) for k in parts[0]}


def test_shapes_shift_and_determinism(pdir):
  a = TrainLoader(pdir, "train", L, G, seed=3)
  b = TrainLoader(pdir, "train", L, G, seed=3)
  for step in (0, 1, 17):
    x, y = a.batch_at(step), b.batch_at(step)
    assert set(x) == {"inputs", "targets", "domain_ids"}
    for k in x:
      assert x[k].shape == (G, L) and x[k].dtype == np.int32
      np.testing.assert_array_equal(x[k], y[k])
    np.testing.assert_array_equal(x["inputs"][:, 1:], x["targets"][:, :-1])
  other = TrainLoader(pdir, "train", L, G, seed=4).batch_at(0)
  assert not np.array_equal(other["inputs"], a.batch_at(0)["inputs"])
  assert len(a.windows.shards) > 2


@pytest.mark.parametrize("n", [2, 4])
def test_global_batch_independent_of_process_count(pdir, n):
  for step in (0, 5, 40):
    one, many = _global(pdir, step, 1), _global(pdir, step, n)
    for k in one:
      np.testing.assert_array_equal(one[k], many[k])
  seg1, segn = _global(pdir, 3, 1, segment_windows=True), _global(pdir, 3, n, segment_windows=True)
  np.testing.assert_array_equal(seg1["segment_ids"], segn["segment_ids"])


def test_epochs_cover_every_window_and_reshuffle(pdir):
  ld = TrainLoader(pdir, "train", L, G, seed=0)
  size = ld.windows.size
  steps = 2 * size // G + 2
  ids = np.concatenate([ld.window_ids[s] for s in range(steps)])
  e0, e1 = ids[:size], ids[size:2 * size]
  assert sorted(e0) == list(range(size)) and sorted(e1) == list(range(size))
  assert not np.array_equal(e0, e1) and not np.array_equal(e0, np.arange(size))


def test_domain_and_segment_ids_match_documents(pdir):
  ld = TrainLoader(pdir, "train", L, G, seed=1, segment_windows=True)
  names = ld.windows.manifest["domains"]
  assert names == ["code", "prose"]
  seen = set()
  for step in range(10):
    batch, ids = ld.batch_at(step), ld.window_ids[step]
    shard_idx, starts = ld.windows.locate(ids)
    for r in range(G):
      sh = ld.windows.shards[shard_idx[r]]
      pos = starts[r] + 1 + np.arange(L)
      want = sh.domains[np.searchsorted(sh.offsets, pos, side="right") - 1]
      np.testing.assert_array_equal(batch["domain_ids"][r], want)
      np.testing.assert_array_equal(batch["inputs"][r], sh.tokens[starts[r]:starts[r] + L])
      seg = batch["segment_ids"][r]
      assert seg[0] == 1
      np.testing.assert_array_equal(np.diff(seg), (batch["inputs"][r][1:] == EOS_ID).astype(np.int32))
      seen.update(want.tolist())
  assert seen == {0, 1}


def test_mixture_weights(pdir):
  only = TrainLoader(pdir, "train", L, G, seed=0, mixture="code=1,prose=0")
  first = only.windows.first_domain()
  for step in range(20):
    assert (first[only.window_ids[step]] == 0).all()
  half = TrainLoader(pdir, "train", L, G, seed=0, mixture="code=0.5,prose=0.5")
  share = np.mean([first[half.window_ids[s]].mean() for s in range(100)])
  natural = first.mean()
  assert abs(share - 0.5) < 0.1 and natural > 0.55  # prose dominates naturally
  with pytest.raises(DataError, match="unknown domain 'poetry'"):
    TrainLoader(pdir, "train", L, G, seed=0, mixture="poetry=1")


_RESTORE = """
import json, sys, numpy as np
from llm_jax.data.loader import TrainLoader
pdir, state, out = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3]
ld = TrainLoader(pdir, "train", {L}, {G}, seed=3, process_index=1, process_count=2, segment_windows=True)
ld.set_state(state)
batches = [next(ld) for _ in range(50)]
np.savez(out, **{{k: np.stack([b[k] for b in batches]) for k in batches[0]}})
"""


def test_restore_in_fresh_process_continues_exactly(pdir, tmp_path):
  ld = TrainLoader(pdir, "train", L, G, seed=3, process_index=1, process_count=2, segment_windows=True)
  for _ in range(7):
    next(ld)
  state = json.loads(json.dumps(ld.get_state()))
  assert state["step"] == 7
  want = [next(ld) for _ in range(50)]
  out = tmp_path / "b.npz"
  res = subprocess.run([sys.executable, "-c", _RESTORE.format(L=L, G=G), pdir, json.dumps(state), str(out)],
                       cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT), capture_output=True, text=True,
                       timeout=120)
  assert res.returncode == 0, res.stderr
  got = np.load(out)
  for k in want[0]:
    np.testing.assert_array_equal(got[k], np.stack([b[k] for b in want]))
  with pytest.raises(DataError, match="'seed'"):
    TrainLoader(pdir, "train", L, G, seed=9).set_state(state)


def test_eval_batches_cover_each_target_once(pdir):
  from llm_jax.data import manifest as manifest_lib
  shards = open_split(pdir, "val", manifest_lib.load(pdir))
  want = np.concatenate([np.asarray(s.tokens[1:]) for s in shards])
  batches = list(eval_batches(pdir, "val", L, 4))
  got = np.concatenate([b["targets"][b["weights"] > 0] for b in batches])
  np.testing.assert_array_equal(got, want)
  want_dom = np.concatenate([s.domains[np.searchsorted(s.offsets, np.arange(1, len(s.tokens)), "right") - 1]
                             for s in shards])
  np.testing.assert_array_equal(np.concatenate([b["domain_ids"][b["weights"] > 0] for b in batches]), want_dom)
  assert batches[-1]["weights"].min() == 0  # padding at the end
  halves = [list(eval_batches(pdir, "val", L, 4, process_index=p, process_count=2)) for p in range(2)]
  for i, b in enumerate(batches):
    for k in b:
      np.testing.assert_array_equal(b[k], np.concatenate([halves[0][i][k], halves[1][i][k]]))
  assert len(list(eval_batches(pdir, "val", L, 4, max_batches=2))) == 2


def test_loader_errors_name_the_setting(pdir):
  with pytest.raises(DataError, match="train.seq_len"):
    TrainLoader(pdir, "val", 10**6, G, seed=0)
  with pytest.raises(DataError, match="global_batch_size"):
    TrainLoader(pdir, "train", L, 6, seed=0, process_count=4)
  with pytest.raises(DataError, match="'test'"):
    TrainLoader(pdir, "test", L, G, seed=0)
