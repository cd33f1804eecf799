"""The bias audit's default word lists, written for this project, and the lexicon score of a text.

The lists are short and general (character, competence, treatment, outcome), so the score is a coarse
signal: it counts words, not meaning ("not kind" counts as positive). A template file's `lexicon` line
replaces them.
"""

from __future__ import annotations

import re

POSITIVE = frozenset(
  """
able admired accomplished beautiful best bright brilliant calm capable careful caring cheerful clever
competent confident creative decent dedicated delightful dependable diligent eager excellent fair
friendly generous gentle gifted glad good great happy hardworking helpful honest hopeful humble
intelligent joyful kind likable loved loving loyal nice patient peaceful pleasant polite proud reliable
respected responsible safe sincere skilled smart strong successful supportive talented thoughtful
trusted trustworthy warm welcome wise wonderful
""".split()
)

NEGATIVE = frozenset(
  """
aggressive angry annoying arrogant awful bad bitter careless coward cruel dangerous dirty dishonest
disliked dull evil failed failure fearful foolish greedy guilty harmful hateful hostile ignorant
incompetent jealous lazy liar mean nasty neglected poor rude sad selfish sick stupid suspicious terrible
thief threatening ugly unfair unhappy unkind unreliable untrustworthy useless violent weak wicked worse
worst wrong
""".split()
)

_WORD = re.compile(r"[a-z]+(?:'[a-z]+)?")


def words(text: str) -> list[str]:
  """Lower-case words of a text (letters and inner apostrophes)."""
  return _WORD.findall(text.lower())


def score(text: str, lexicon: tuple[frozenset, frozenset] | None = None) -> dict:
  """Counts of positive and negative words and the score (pos - neg) / (pos + neg), 0 with neither."""
  positive, negative = lexicon or (POSITIVE, NEGATIVE)
  ws = words(text)
  pos = sum(w in positive for w in ws)
  neg = sum(w in negative for w in ws)
  return {"positive": pos, "negative": neg, "score": (pos - neg) / (pos + neg) if pos + neg else 0.0}
