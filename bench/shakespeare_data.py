"""Writes tiny Shakespeare as the nanoGPT reference splits it: the first 90% of the 1,115,394
characters (1,003,854) for training, the last 10% for validation.

    python bench/shakespeare_data.py [--out runs/data/tinyshakespeare] [--source input.txt]

Without --source it downloads the corpus (Karpathy's char-rnn copy). On a machine without network,
copy input.txt (or the two split files) there first; the device scripts call this only when the
split files are missing.
"""

import argparse
import os
import sys
import urllib.request

URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
CHARS = 1_115_394


def main() -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--out", default="runs/data/tinyshakespeare", help="directory for the two files")
  p.add_argument("--source", default="", help="a local copy of input.txt (default: download)")
  args = p.parse_args()
  if args.source:
    with open(args.source, encoding="utf-8") as f:
      text = f.read()
  else:
    try:
      with urllib.request.urlopen(URL, timeout=60) as r:
        text = r.read().decode("utf-8")
    except OSError as e:
      print(f"error: cannot download {URL} ({e}); pass --source=input.txt", file=sys.stderr)
      return 1
  if len(text) != CHARS:
    print(f"error: tiny Shakespeare has {CHARS:,} characters, got {len(text):,}", file=sys.stderr)
    return 1
  cut = int(len(text) * 0.9)
  os.makedirs(args.out, exist_ok=True)
  for name, part in (("tinyshakespeare_train.txt", text[:cut]), ("tinyshakespeare_val.txt", text[cut:])):
    with open(os.path.join(args.out, name), "w", encoding="utf-8") as f:
      f.write(part)
  print(f"{args.out}: train {cut:,} characters, val {len(text) - cut:,}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
