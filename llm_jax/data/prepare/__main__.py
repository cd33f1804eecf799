"""Prepares a corpus (or finds it in the cache) and prints what was kept, dropped, scrubbed and removed.

    python -m llm_jax.data.prepare --config=configs/tiny.py --workdir=/tmp/d [--config.data.corpus='a/*.txt']

With --workdir, manifest.json, DATA_CARD.md and tokenizer.model are copied there (never over a trained
run's tokenizer: a workdir whose run.json records another one is refused). Exit codes: 0 done,
1 bad data or a data.* value (the message names the file, line or key), 2 a usage error.
"""

from __future__ import annotations

import os

from absl import flags
from ml_collections import config_flags

from llm_jax import cli
from llm_jax.data import manifest as manifest_lib
from llm_jax.data.prepare import cache_key, cache_root, export_to, prepare, summary_text

_CONFIG = config_flags.DEFINE_config_file(
  "config",
  None,
  "Config file, e.g. configs/tiny.py; override fields with --config.data.x=value.",
  lock_config=True,
)
_WORKDIR = flags.DEFINE_string(
  "workdir", "", "Directory that receives manifest.json, DATA_CARD.md and tokenizer.model."
)
flags.mark_flags_as_required(["config"])


def main(argv) -> int:
  del argv
  config = _CONFIG.value
  found = os.path.join(cache_root(config), cache_key(config))
  cached = os.path.exists(os.path.join(found, manifest_lib.MANIFEST)) and not manifest_lib.damage(found)
  p = prepare(config)
  if _WORKDIR.value:
    export_to(p, _WORKDIR.value)
  print(summary_text(p.manifest, p.dir, cached))
  if _WORKDIR.value:
    print(f"  wrote manifest.json, DATA_CARD.md, tokenizer.model to {_WORKDIR.value}")
  return 0


if __name__ == "__main__":
  cli.run(main)
