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
  vocab = [
    "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 9))) for _ in range(300)
  ]
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
  parts = [
    TrainLoader(pdir, "train", L, G, seed=3, process_index=p, process_count=n, **kw).batch_at(step)
    for p in range(n)
  ]
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


def _stream(ld):
  """The split's shards concatenated: window positions index it."""
  return np.concatenate([np.asarray(s.tokens, np.int64) for s in ld.windows.shards])


def _seed_with_two_offsets(pdir):
  """(seed, loader) whose first two epochs have different grid offsets."""
  for seed in range(20):
    ld = TrainLoader(pdir, "train", L, G, seed=seed)
    if ld.epochs.offset(0) != ld.epochs.offset(1):
      return seed, ld
  raise AssertionError("no seed in 0..19 gives two different offsets")


@pytest.mark.parametrize("n", [2, 4])
def test_global_batch_independent_of_process_count(pdir, n):
  ld = TrainLoader(pdir, "train", L, G, seed=3)
  crossing = ld.epochs.first_index(1) // G  # holds the end of epoch 0 and the start of epoch 1
  for step in (0, 5, crossing, crossing + 1, ld.epochs.first_index(3) // G):
    one, many = _global(pdir, step, 1), _global(pdir, step, n)
    for k in one:
      np.testing.assert_array_equal(one[k], many[k])
  seg1, segn = _global(pdir, 3, 1, segment_windows=True), _global(pdir, 3, n, segment_windows=True)
  np.testing.assert_array_equal(seg1["segment_ids"], segn["segment_ids"])
  mix1, mixn = (_global(pdir, 30, m, mixture="code=0.5,prose=0.5") for m in (1, n))
  np.testing.assert_array_equal(mix1["inputs"], mixn["inputs"])


def test_epochs_shift_the_grid_and_cover_it(pdir):
  seed, ld = _seed_with_two_offsets(pdir)
  w, stream = ld.windows, _stream(ld)
  starts = [ld.epochs.first_index(e) for e in range(3)]
  steps = starts[2] // G + 1
  pos = np.concatenate([ld.window_ids[s] for s in range(steps)])
  for e in (0, 1):
    o = ld.epochs.offset(e)
    got = pos[starts[e] : starts[e + 1]]
    grid = w.positions(np.arange(w.count(o)), o)  # every window of the grid at o, in order
    shard, start = w.locate(got)
    assert ((start - o) % L == 0).all() and (start + L + 1 <= w.lengths[shard]).all()
    np.testing.assert_array_equal(np.sort(got), grid)  # each window of the grid exactly once
    assert not np.array_equal(got, grid)  # shuffled
  assert ld.epochs.offset(0) != ld.epochs.offset(1)
  assert w.count(ld.epochs.offset(1)) == sum((w.lengths - 1 - ld.epochs.offset(1)) // L)
  # The batches are exact slices of the stream, across the epoch boundary too.
  for s in (0, starts[1] // G, starts[1] // G + 1):
    batch = ld.batch_at(s)
    for r, p in enumerate(ld.window_ids[s]):
      np.testing.assert_array_equal(batch["inputs"][r], stream[p : p + L])
      np.testing.assert_array_equal(batch["targets"][r], stream[p + 1 : p + L + 1])
  # Offsets are a function of (seed, epoch): another loader draws the same ones, another seed others.
  again = TrainLoader(pdir, "train", L, G, seed=seed)
  other = TrainLoader(pdir, "train", L, G, seed=seed + 100)
  offsets = [ld.epochs.offset(e) for e in range(12)]
  assert [again.epochs.offset(e) for e in range(12)] == offsets
  assert [other.epochs.offset(e) for e in range(12)] != offsets
  assert len(set(offsets)) > 3 and max(offsets) < L


def test_window_offsets_false_is_the_fixed_grid(pdir):
  import grain

  ld = TrainLoader(pdir, "train", L, G, seed=3, window_offsets=False)
  assert ld.epochs is None and ld.get_state()["window_offsets"] is False
  w, stream = ld.windows, _stream(ld)
  # The old loader: window k of the shards' grids at 0, L, 2L, ..., in grain's shuffle(seed).repeat() order.
  grid = [int(b) + j * L for b, n in zip(w.bases, w.lengths, strict=True) for j in range((int(n) - 1) // L)]
  order = grain.MapDataset.range(len(grid)).shuffle(seed=3 * 1_000_003 % (1 << 32)).repeat()
  for s in (0, 7, len(grid) // G + 1, 3 * len(grid) // G):
    want = np.array([grid[order[s * G + r]] for r in range(G)])
    np.testing.assert_array_equal(ld.window_ids[s], want)
    batch = ld.batch_at(s)
    for r, p in enumerate(want):
      np.testing.assert_array_equal(batch["inputs"][r], stream[p : p + L])
  # A state saved before window offsets existed continues the fixed grid and is refused by the default.
  old = {k: v for k, v in ld.get_state().items() if k != "window_offsets"}
  fixed = TrainLoader(pdir, "train", L, G, seed=3, window_offsets=False)
  fixed.set_state(dict(old, step=5))
  np.testing.assert_array_equal(next(fixed)["inputs"], ld.batch_at(5)["inputs"])
  with pytest.raises(DataError, match="'window_offsets'.*data.window_offsets=False"):
    TrainLoader(pdir, "train", L, G, seed=3).set_state(old)
  with pytest.raises(DataError, match="'window_offsets'"):
    TrainLoader(pdir, "train", L, G, seed=3).set_state(ld.get_state())
  mixed = TrainLoader(pdir, "train", L, G, seed=3, window_offsets=False, mixture="code=1")
  assert all((w.locate(mixed.window_ids[s])[1] % L == 0).all() for s in range(40))


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
      np.testing.assert_array_equal(batch["inputs"][r], sh.tokens[starts[r] : starts[r] + L])
      seg = batch["segment_ids"][r]
      assert seg[0] == 1
      np.testing.assert_array_equal(np.diff(seg), (batch["inputs"][r][1:] == EOS_ID).astype(np.int32))
      seen.update(want.tolist())
  assert seen == {0, 1}


def test_mixture_weights(pdir):
  only = TrainLoader(pdir, "train", L, G, seed=0, mixture="code=1,prose=0")
  w = only.windows
  starts = []
  for step in range(200):  # several epochs of the code windows
    assert (w.first_domains(only.window_ids[step]) == 0).all()
    starts.append(w.locate(only.window_ids[step])[1])
  assert len(np.unique(np.concatenate(starts) % L)) > 1  # the code stream's grid moves between epochs
  stream, batch = _stream(only), only.batch_at(150)
  for r, p in enumerate(only.window_ids[150]):
    np.testing.assert_array_equal(batch["inputs"][r], stream[p : p + L])
  half = TrainLoader(pdir, "train", L, G, seed=0, mixture="code=0.5,prose=0.5")
  share = np.mean([w.first_domains(half.window_ids[s]).mean() for s in range(100)])
  natural = w.first_domains(w.positions(np.arange(w.size))).mean()
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
  boundary = ld.epochs.first_index(1) // G  # the step holding the first windows of epoch 1
  assert ld.epochs.offset(0) != ld.epochs.offset(1) and boundary >= 2
  for _ in range(boundary - 2):
    next(ld)
  state = json.loads(json.dumps(ld.get_state()))
  assert state["step"] == boundary - 2 and state["window_offsets"] is True
  want = [next(ld) for _ in range(50)]  # across the end of epoch 0
  out = tmp_path / "b.npz"
  res = subprocess.run(
    [sys.executable, "-c", _RESTORE.format(L=L, G=G), pdir, json.dumps(state), str(out)],
    cwd=ROOT,
    env=dict(os.environ, PYTHONPATH=ROOT),
    capture_output=True,
    text=True,
    timeout=120,
  )
  assert res.returncode == 0, res.stderr
  got = np.load(out)
  for k in want[0]:
    np.testing.assert_array_equal(got[k], np.stack([b[k] for b in want]))
  with pytest.raises(DataError, match="'seed'.*data.seed=3"):
    TrainLoader(pdir, "train", L, G, seed=9).set_state(state)
  with pytest.raises(DataError, match="'global_batch_size'.*train.global_batch_size=8"):
    TrainLoader(pdir, "train", L, 2 * G, seed=3).set_state(state)


def test_eval_batches_cover_each_target_once(pdir):
  from llm_jax.data import manifest as manifest_lib

  shards = open_split(pdir, "val", manifest_lib.load(pdir))
  want = np.concatenate([np.asarray(s.tokens[1:]) for s in shards])
  batches = list(eval_batches(pdir, "val", L, 4))
  got = np.concatenate([b["targets"][b["weights"] > 0] for b in batches])
  np.testing.assert_array_equal(got, want)
  want_dom = np.concatenate(
    [s.domains[np.searchsorted(s.offsets, np.arange(1, len(s.tokens)), "right") - 1] for s in shards]
  )
  got_dom = np.concatenate([b["domain_ids"][b["weights"] > 0] for b in batches])
  np.testing.assert_array_equal(got_dom, want_dom)
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
