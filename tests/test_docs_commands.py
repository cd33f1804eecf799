"""Every `python -m llm_jax.X --flag ...` written in README.md, docs/*.md and configs/ names a command
that exists and flags that command defines (read from its source, so nothing is imported or run)."""

import ast
import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parent.parent
COMMON = {"help", "helpfull", "helpshort", "verbose"}  # llm_jax.cli and absl define these for all
CMD = re.compile(r"python3? -m (llm_jax(?:\.\w+)*)(?![.\w<])((?:[^\n`|;&#]|\\\n)*)")


def command_file(module: str) -> pathlib.Path | None:
  """The file `python -m module` runs, or None."""
  path = ROOT.joinpath(*module.split("."))
  for candidate in (path / "__main__.py", path.with_suffix(".py")):
    if candidate.exists():
      return candidate
  return None


def defined_flags(path: pathlib.Path) -> set[str]:
  """Flag names (and aliases) a command module defines; 'config.' when it takes a config file."""
  names = set()
  for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
    if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)):
      continue
    fn = node.func.attr
    if fn.startswith("DEFINE") and node.args and isinstance(node.args[0], ast.Constant):
      names.add(str(node.args[0].value))
      if fn == "DEFINE_config_file":
        names.add(f"{node.args[0].value}.")
      if fn in ("DEFINE_bool", "DEFINE_boolean"):
        names.add(f"no{node.args[0].value}")
  return names


def documented_commands():
  """(where, module, [flag names]) for every command line in the docs."""
  files = [
    ROOT / "README.md",
    *sorted((ROOT / "docs").glob("*.md")),
    *sorted((ROOT / "configs").glob("*.py")),
  ]
  for f in files:
    text = f.read_text(encoding="utf-8")
    for m in CMD.finditer(text):
      line = text[: m.start()].count("\n") + 1
      args = m.group(2).replace("\\\n", " ")
      flags = [a[2:].split("=", 1)[0] for a in re.findall(r"--[A-Za-z][\w.\-]*(?:=\S*)?", args)]
      yield f"{f.relative_to(ROOT)}:{line}", m.group(1), flags


def test_documented_commands_exist_and_take_their_flags():
  seen, problems = 0, []
  for where, module, flags in documented_commands():
    seen += 1
    path = command_file(module)
    if path is None:
      problems.append(f"{where}: python -m {module}: no such command")
      continue
    known = defined_flags(path) | COMMON
    for flag in flags:
      if flag in known or any(p.endswith(".") and flag.startswith(p) for p in known):
        continue
      problems.append(f"{where}: python -m {module} has no flag --{flag}")
  assert seen > 20, "the docs show fewer commands than expected: is the pattern broken?"
  assert not problems, "\n".join(problems)


def test_the_check_catches_a_wrong_flag_and_a_missing_command(tmp_path):
  path = command_file("llm_jax.export")
  assert path is not None and "out" in defined_flags(path) and "workdir" in defined_flags(path)
  assert "config." in defined_flags(command_file("llm_jax.train"))
  assert command_file("llm_jax.no_such_command") is None
  assert "bogus_flag" not in defined_flags(path)
