"""The shell every command shares: absl flags, one error style, the same exit codes.

A command module defines its flags with absl (`flags.DEFINE_*`, and `config_flags.DEFINE_config_file`
for `--config` / `--config.a.b=value`), a `main(argv) -> int`, and ends with

    if __name__ == "__main__":
      cli.run(main)

Exit codes: 0 done; 1 the work failed (one line on stderr naming the key, file or step); 2 usage error
(an unknown or malformed flag, a missing required flag, a misspelled config key, an unexpected
argument). `--verbose` prints the traceback as well. `--help` prints the module docstring and the flags.
"""

from __future__ import annotations

import logging
import os
import sys
import traceback
from collections.abc import Callable

import jax
from absl import app, flags

from llm_jax import config as config_lib

EXIT_FAILURE = 1
EXIT_USAGE = 2

_VERBOSE = flags.DEFINE_bool(
  "verbose", False, "On an error, print the traceback as well as the one-line message."
)


class UsageError(app.UsageError):
  """The command line is wrong (exit 2); the message says which flag and what is expected."""

  def __init__(self, message: str):
    super().__init__(message, exitcode=EXIT_USAGE)


def verbose() -> bool:
  """True when --verbose was given (tracebacks wanted)."""
  return bool(_VERBOSE.value)


def _error_line(e: BaseException) -> str:
  return f"error ({type(e).__name__}): {e}"


def read_text(path: str, flag: str) -> str:
  """The UTF-8 text of a file a flag names; ValueError naming the flag, the file and the first bad
  byte when it is not UTF-8 (UnicodeDecodeError named neither)."""
  with open(path, "rb") as f:
    raw = f.read()
  try:
    return raw.decode("utf-8")
  except UnicodeDecodeError as e:
    raise ValueError(f"{flag}={path}: invalid UTF-8 at byte {e.start}; convert the file to UTF-8") from None


def config_override_error(argv: list[str]) -> str | None:
  """The message for a misspelled or mistyped `--config.a.b=v` (named, with a hint), or None.

  absl would report such a key as an unknown flag without saying which config keys exist, so the
  overrides are checked against the config file before flags are parsed.
  """
  path, overrides = None, []
  i = 0
  while i < len(argv):
    arg = argv[i]
    if arg.startswith("--config="):
      path = arg.split("=", 1)[1]
    elif arg == "--config" and i + 1 < len(argv):
      path = argv[i + 1]
      i += 1
    elif arg.startswith("--config."):
      if "=" in arg:
        overrides.append(arg[2:])
      elif i + 1 < len(argv) and not argv[i + 1].startswith("--"):
        overrides.append(f"{arg[2:]}={argv[i + 1]}")
        i += 1
    i += 1
  if path is None:
    return None
  try:
    config_lib.load(path, overrides)
  except config_lib.ConfigError as e:
    return str(e)
  except Exception as e:  # the config file itself failed to import
    return f"config file {path}: {type(e).__name__}: {e}"
  return None


def compile_cache_dir(flag: str = "") -> str | None:
  """JAX's persistent compilation cache directory: `flag` ('off': none), else $JAX_COMPILATION_CACHE_DIR,
  else $LLM_JAX_CACHE/jax_compile, else ~/.cache/llm_jax/jax_compile (safe to share between runs)."""
  if flag == "off":
    return None
  if flag:
    return os.path.abspath(os.path.expanduser(flag))
  if os.environ.get("JAX_COMPILATION_CACHE_DIR"):
    return os.environ["JAX_COMPILATION_CACHE_DIR"]
  root = os.environ.get("LLM_JAX_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "llm_jax")
  return os.path.join(root, "jax_compile")


def use_compile_cache(path: str | None, min_compile_secs: float | None = None) -> None:
  """Compiled programs go to (and are read from) `path` (None: the cache is off)."""
  if path is None:
    jax.config.update("jax_enable_compilation_cache", False)
    return
  try:
    os.makedirs(path, exist_ok=True)
  except OSError as e:
    raise UsageError(f"compilation cache {path}: cannot create the directory: {e}") from e
  jax.config.update("jax_compilation_cache_dir", path)
  if min_compile_secs is not None:
    jax.config.update("jax_persistent_cache_min_compile_time_secs", float(min_compile_secs))


def parse_step(text: str | None) -> int | str | None:
  """A --step flag's value: None (the latest checkpoint), 'best', or a step number (else exit 2)."""
  if text is None or text == "" or text == "latest":
    return None
  if text == "best":
    return "best"
  try:
    return int(text)
  except ValueError:
    raise UsageError(f"--step={text!r} is not a step number, 'latest' or 'best'") from None


_HELP = ("--help", "-h", "-?", "--helpshort", "--helpfull", "--helpxml")


def _parse_flags(argv: list[str]) -> list[str]:
  try:
    return flags.FLAGS(argv)
  except SystemExit:  # absl exits 1 after printing --help; asking for help is not a failure
    if any(a in _HELP for a in argv[1:]):
      sys.exit(0)
    raise
  except flags.Error as e:
    print(f"usage error: {e}\nRun with --help for the flags.", file=sys.stderr)
    sys.exit(EXIT_USAGE)


def run(main: Callable[[list[str]], int | None], *, argv: list[str] | None = None) -> None:
  """Parses flags, runs `main(argv)` and exits with 0, 1 or 2 (never returns)."""
  argv = list(sys.argv if argv is None else argv)
  if any(a == "--config" or a.startswith("--config=") for a in argv[1:]):
    problem = config_override_error(argv[1:])
    if problem:
      print(f"usage error (ConfigError): {problem}", file=sys.stderr)
      sys.exit(EXIT_USAGE)

  def guarded(args: list[str]) -> int:
    try:
      if len(args) > 1:
        raise UsageError(f"unexpected arguments: {' '.join(args[1:])} (every option is a --flag)")
      code = main(args)
      return 0 if code is None else int(code)
    except app.UsageError as e:
      print(f"usage error: {e}\nRun with --help for the flags.", file=sys.stderr)
      if _VERBOSE.value:
        traceback.print_exc()
      return EXIT_USAGE
    except KeyboardInterrupt:
      print("interrupted", file=sys.stderr)
      return 130
    except SystemExit:
      raise
    except Exception as e:  # every failure becomes one line; --verbose shows where
      logging.getLogger("llm_jax").debug("command failed", exc_info=True)
      print(_error_line(e), file=sys.stderr)
      if _VERBOSE.value:
        traceback.print_exc()
      return EXIT_FAILURE

  app.run(guarded, argv=argv, flags_parser=_parse_flags)
