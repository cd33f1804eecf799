"""serve.pacing: the next decode chunk's deadline from the host's observations of the device (pure
host logic on made-up times; the engine's use of it runs in test_serve_engine)."""

import pytest

from llm_jax.serve.pacing import Pacer

K = ("decode", 32, 128, False)
ms = 1e-3


def steady(p: Pacer, chunks: int, d: float = 10 * ms, t: float = 0.0) -> float:
  """`chunks` back-to-back chunks of `d` seconds, each dispatched 2 ms before the previous one ends
  and its predecessor's outputs waited for; returns the time the last chunk started."""
  p.dispatched(K, t, 0.5 * ms)
  start = t
  for _ in range(chunks):
    p.dispatched(K, start + d - 2 * ms, 0.5 * ms)
    start += d
    p.ended(start, waited=True)
  return start


def test_no_estimate_no_wait():
  p = Pacer()
  assert p.deadline() is None  # nothing in flight
  p.dispatched(K, 0.0, 0.5 * ms)
  assert p.deadline() is None  # in flight, but its program not timed yet: dispatch at once


def test_deadline_is_the_chunks_end_less_preparation_and_margin():
  p = Pacer(margin_s=1 * ms)
  start = steady(p, 4)
  assert p.estimate(K) == pytest.approx(10 * ms)
  assert p.deadline() == pytest.approx(start + 10 * ms - 1 * ms - 0.5 * ms)


def test_admissions_before_a_chunk_move_its_start():
  p = Pacer(margin_s=1 * ms)
  start = steady(p, 3)
  p.dispatched(K, start + 8 * ms, 0.5 * ms)
  p.ended(start + 10 * ms, waited=True)  # the previous chunk
  p.ended(start + 13 * ms, waited=True)  # an admission queued after it: the chunk starts after this
  assert p.deadline() == pytest.approx(start + 13 * ms + 10 * ms - 1.5 * ms)
  # and the chunk's sample is measured from there: not inflated by the admission
  p.dispatched(K, start + 21 * ms, 0.5 * ms)
  p.ended(start + 23 * ms, waited=True)
  assert p.estimate(K) == pytest.approx(10 * ms)


def test_outputs_found_ready_give_no_sample_and_an_early_start():
  p = Pacer(margin_s=1 * ms)
  start = steady(p, 3)
  # the host came late: the previous chunk was done before it looked, so its end (and this chunk's
  # start) is unknown; only the dispatch time bounds the start from below
  p.dispatched(K, start + 15 * ms, 0.5 * ms)
  p.ended(start + 16 * ms, waited=False)
  assert p.deadline() == pytest.approx(start + 15 * ms + 10 * ms - 1.5 * ms)
  before = list(p._durations[K])
  # this chunk's end is waited for, but its start was a lower bound: no sample (it could include
  # time the device sat idle)
  p.dispatched(K, start + 30 * ms, 0.5 * ms)
  p.ended(start + 35 * ms, waited=True)
  assert list(p._durations[K]) == before


def test_a_slow_sample_does_not_move_the_estimate():
  p = Pacer()
  start = steady(p, 5)
  p.dispatched(K, start + 8 * ms, 0.5 * ms)
  p.ended(start + 40 * ms, waited=True)  # one chunk delayed by something else on the device
  assert len(p._durations[K]) == 5 and max(p._durations[K]) == pytest.approx(40 * ms)
  assert p.estimate(K) == pytest.approx(10 * ms)


def test_collected_ends_the_flight():
  p = Pacer()
  start = steady(p, 3)
  p.collected(start + 10 * ms, waited=True)  # the last chunk's outputs; nothing follows
  assert p.deadline() is None
  assert len(p._durations[K]) == 3
  p.reset()
  assert p.deadline() is None


def test_programs_are_timed_apart():
  p = Pacer()
  steady(p, 3)
  other = ("decode", 2, 0, False)
  p.dispatched(other, 1.0, 0.5 * ms)
  assert p.deadline() is None  # a program of its own, not timed yet
  assert p.estimate(other) is None and p.estimate(K) == pytest.approx(10 * ms)
