"""scrub.scrub: every kind of personal data and secret it covers is replaced and counted; look-alikes in code
and tables are left as they are."""

import collections

import pytest
from test_data_governance import PLANTED, SURVIVORS

from llm_jax.data import scrub


@pytest.mark.parametrize("kind,text,secret", PLANTED, ids=[f"{k}-{i}" for i, (k, _, _) in enumerate(PLANTED)])
def test_each_kind_is_replaced(kind, text, secret):
  counts = collections.Counter()
  out = scrub.scrub(text, counts)
  assert secret not in out and scrub.PLACEHOLDERS[kind] in out
  assert counts == {kind: 1}


def test_look_alikes_survive():
  for text in SURVIVORS:
    counts = collections.Counter()
    assert scrub.scrub(text, counts) == text and not counts, text
