"""Summarises a `py-spy record --format raw --threads` file: per thread, the share of samples and the
functions (inclusive) they were in. With `--gil` recordings (only the thread holding the GIL is
sampled) the shares say who held the GIL and doing what.

    python bench/pyspy_summary.py pyspy.txt [--rate 200] [--seconds 8] [--top 25]
"""

import argparse
import collections
import re


def frame_name(f: str) -> str:
  m = re.match(r"(.*?) \((.*?)(?::\d+)?\)$", f)
  return f"{m.group(1)} [{m.group(2).split('/')[-1]}]" if m else f


def main():
  p = argparse.ArgumentParser()
  p.add_argument("path")
  p.add_argument("--rate", type=float, default=0, help="samples per second (for the share of time)")
  p.add_argument("--seconds", type=float, default=0)
  p.add_argument("--top", type=int, default=25)
  a = p.parse_args()
  total, inclusive = collections.Counter(), collections.defaultdict(collections.Counter)
  with open(a.path) as f:
    for line in f:
      stack, n = line.rstrip("\n").rsplit(" ", 1)
      frames = stack.split(";")
      thread = frames[0].split(": ")[-1]
      total[thread] += int(n)
      for name in dict.fromkeys(frame_name(x) for x in frames[1:]):
        inclusive[thread][name] += int(n)
  possible = a.rate * a.seconds
  for thread, n in total.most_common():
    share = f", {100 * n / possible:.0f}% of the window" if possible else ""
    print(f"== {thread}: {n} samples{share}")
    for name, m in inclusive[thread].most_common(a.top):
      print(f"   {m:6d} {100 * m / n:5.1f}%  {name}")


if __name__ == "__main__":
  main()
