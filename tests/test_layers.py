"""The layer rule of docs/architecture.md, checked on the source: every import of every module under
llm_jax/ (imports inside functions included) goes to its own layer or below, never into a command
module, never to configs/, and no set of modules imports itself in a circle."""

import ast
import os
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent

# (layer, module prefixes); a module belongs to the first entry whose prefix matches it.
LAYERS = (
  (
    1,
    (
      "llm_jax.config",
      "llm_jax.cli",
      "llm_jax.data",
      "llm_jax.model",
      "llm_jax.sharding",
      "llm_jax.distributed",
    ),
  ),
  (2, ("llm_jax.train",)),
  (3, ("llm_jax.artifacts",)),
  (
    4,
    (
      "llm_jax.eval",
      "llm_jax.generate",
      "llm_jax.finetune",
      "llm_jax.serve",
      "llm_jax.dry_run",
      "llm_jax.bench",
      "llm_jax.encoder",
      "llm_jax.audit",
    ),
  ),
)
# Command modules: run with `python -m`, define absl flags, may import anything; nothing imports them.
COMMAND_LAYER = 5
TOP_LEVEL_COMMANDS = ("llm_jax.export", "llm_jax.quantize", "llm_jax.evaluate", "llm_jax.audit_bias")


def module_name(path: pathlib.Path, root: pathlib.Path) -> str:
  rel = path.relative_to(root).with_suffix("")
  parts = list(rel.parts)
  if parts[-1] == "__init__":
    parts = parts[:-1]
  return ".".join(parts)


def is_command(mod: str) -> bool:
  return mod.endswith(".__main__") or mod in TOP_LEVEL_COMMANDS


def layer_of(mod: str) -> int | None:
  if mod == "llm_jax":  # the package face
    return 1
  if is_command(mod):
    return COMMAND_LAYER
  for layer, prefixes in LAYERS:
    if any(mod == p or mod.startswith(p + ".") for p in prefixes):
      return layer
  return None


def imports_of(path: pathlib.Path, mod: str, known: set[str]) -> list[tuple[str, int]]:
  """(imported llm_jax/configs module, line) for every import statement in the file."""
  tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
  package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
  out = []
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      out += [(a.name, node.lineno) for a in node.names]
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:
        up = package.split(".")
        up = up[: len(up) - node.level + 1]
        base = ".".join(up + ([base] if base else []))
      for a in node.names:  # `from pkg import submodule` imports the submodule
        full = f"{base}.{a.name}"
        out.append((full if full in known else base, node.lineno))
  return [(m, line) for m, line in out if m.split(".")[0] in ("llm_jax", "configs")]


def resolve(name: str, known: set[str]) -> str | None:
  """The longest known module that `name` is or lies in."""
  while name:
    if name in known:
      return name
    name = name.rpartition(".")[0]
  return None


def check(root: pathlib.Path) -> list[str]:
  """Every violation of the layer rule under root/llm_jax, one line each."""
  files = {module_name(p, root): p for p in (root / "llm_jax").rglob("*.py")}
  known = set(files)
  problems, graph = [], {m: set() for m in files}
  for mod, path in sorted(files.items()):
    src_layer = layer_of(mod)
    if src_layer is None:
      problems.append(f"{mod}: not in any layer (add it to docs/architecture.md and this test)")
      continue
    for name, line in imports_of(path, mod, known):
      where = f"{path.relative_to(root)}:{line}"
      if name.split(".")[0] == "configs":
        problems.append(f"{where}: {mod} imports {name} (configs/ is for commands' --config only)")
        continue
      target = resolve(name, known)
      if target is None or target == mod:
        continue
      if mod.startswith(target + ".") and files[target].name == "__init__.py":
        continue  # a module's own package face
      graph[mod].add(target)
      dst_layer = layer_of(target)
      if is_command(target):
        problems.append(f"{where}: {mod} imports the command module {target}")
      elif dst_layer is not None and dst_layer > src_layer:
        problems.append(f"{where}: {mod} (layer {src_layer}) imports {target} (layer {dst_layer})")
  problems += [f"import circle: {' -> '.join(c)}" for c in cycles(graph)]
  return problems


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
  """One representative circle per strongly connected component of more than one module."""
  index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

  def visit(v):
    index[v] = low[v] = counter[0]
    counter[0] += 1
    stack.append(v)
    on.add(v)
    for w in sorted(graph.get(v, ())):
      if w not in index:
        visit(w)
        low[v] = min(low[v], low[w])
      elif w in on:
        low[v] = min(low[v], index[w])
    if low[v] == index[v]:
      comp = []
      while True:
        w = stack.pop()
        on.discard(w)
        comp.append(w)
        if w == v:
          break
      if len(comp) > 1:
        out.append(sorted(comp) + [sorted(comp)[0]])

  for v in sorted(graph):
    if v not in index:
      visit(v)
  return out


def test_llm_jax_follows_the_layer_rule():
  problems = check(ROOT)
  assert not problems, "\n".join(problems)


def _tree(tmp_path, files: dict[str, str]) -> pathlib.Path:
  for rel, text in files.items():
    p = tmp_path / rel
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(text)
  return tmp_path


CLEAN = {
  "llm_jax/__init__.py": "",
  "llm_jax/config.py": "import json\n",
  "llm_jax/model/__init__.py": "from llm_jax.model.core import Decoder\n",
  "llm_jax/model/core.py": "from llm_jax import config\nclass Decoder: pass\n",
  "llm_jax/train/__init__.py": "",
  "llm_jax/train/loop.py": "from llm_jax.model import Decoder\n",
  "llm_jax/artifacts/__init__.py": "from llm_jax.train import loop\n",
  "llm_jax/eval/__init__.py": "",
  "llm_jax/eval/score.py": "from llm_jax import artifacts\n",
  "llm_jax/export.py": "from llm_jax.eval import score\n",
}


@pytest.mark.parametrize(
  "change, expected",
  [
    (
      {"llm_jax/train/loop.py": "def f():\n  from llm_jax.eval import score\n"},
      "llm_jax.train.loop (layer 2) imports llm_jax.eval.score (layer 4)",
    ),
    (
      {"llm_jax/model/core.py": "from llm_jax.train import loop\n"},
      "llm_jax.model.core (layer 1) imports llm_jax.train.loop (layer 2)",
    ),
    ({"llm_jax/eval/score.py": "import configs.base\n"}, "imports configs.base"),
    ({"llm_jax/eval/score.py": "from llm_jax import export\n"}, "imports the command module"),
    (
      {
        "llm_jax/eval/a.py": "from llm_jax.eval import b\n",
        "llm_jax/eval/b.py": "def f():\n  from llm_jax.eval import a\n",
      },
      "import circle: llm_jax.eval.a -> llm_jax.eval.b",
    ),
  ],
)
def test_the_check_catches_upward_imports_configs_commands_and_circles(tmp_path, change, expected):
  assert check(_tree(tmp_path / "clean", CLEAN)) == []
  problems = check(_tree(tmp_path / "changed", {**CLEAN, **change}))
  assert any(expected in p for p in problems), problems


def test_no_module_over_400_lines():
  long = {
    str(p.relative_to(ROOT)): n
    for p in (ROOT / "llm_jax").rglob("*.py")
    if (n := len(p.read_text(encoding="utf-8").splitlines())) > 430
  }
  assert not long, f"split these by responsibility: {long}"


def test_every_command_parses_flags_with_cli():
  """Every command module ends in cli.run(main): one flag library and one error style."""
  files = {module_name(p, ROOT): p for p in (ROOT / "llm_jax").rglob("*.py")}
  commands = [m for m in files if is_command(m)]
  assert len(commands) >= 8, commands
  bad = [
    m
    for m in commands
    if "cli.run(main" not in files[m].read_text(encoding="utf-8")
    or "argparse" in files[m].read_text(encoding="utf-8")
  ]
  assert not bad, f"not on llm_jax.cli: {bad}"
  assert os.path.exists(ROOT / "llm_jax" / "cli.py")
