"""Run a command module (`python -m llm_jax.X ...`) inside the test process.

A fresh process per call would recompile everything on 2 cores; in process, jitted functions are
reused. The module is executed as __main__ exactly as `python -m` does; the absl flags it defines are
removed afterwards, so the next command can define flags of the same names.
"""

import runpy
import sys
import types

from absl import app, flags

from llm_jax import cli

del app, cli  # imported for their own flags (--run_with_pdb, --verbose, ...), which stay defined


def run_command(module: str, *args: str) -> int:
  """Exit code of `python -m module args...` run in this process."""
  before = set(flags.FLAGS)
  saved_argv = sys.argv
  sys.argv = [module, *args]
  code = 0
  try:
    runpy.run_module(module, run_name="__main__", alter_sys=False)
  except SystemExit as e:
    code = 0 if e.code is None else int(e.code)
  finally:
    sys.argv = saved_argv
    for name in set(flags.FLAGS) - before:
      delattr(flags.FLAGS, name)
  return code


def run_captured(capsys, module: str, *args: str):
  """`run_command` with its output read from pytest's `capsys`: an object with returncode, stdout and
  stderr, as subprocess.run gives (the command's compiled programs stay for the next call)."""
  capsys.readouterr()
  code = run_command(module, *args)
  out = capsys.readouterr()
  return types.SimpleNamespace(returncode=code, stdout=out.out, stderr=out.err)
