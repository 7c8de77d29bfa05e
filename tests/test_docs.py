"""The docs and the package layout cannot drift: config fields, links, imports.

* docs/configs.md is what `python -m jdistill.config.docs` generates from the field
  declarations in jdistill/config/ and the prose in docs/configs.md.in;
* every field of `config.base_config()` (and of `config.teacher_config()`, as
  `teachers.<name>.<field>`) has a row in docs/configs.md, and every row names a real field;
* every relative link in README.md and docs/*.md resolves to a file (and heading) inside
  the repository;
* the `jdistill` modules import each other without a cycle;
* each `jdistill` module imports on its own in a fresh interpreter.

Nothing here compiles JAX code.
"""

from __future__ import annotations

import ast
import html
import json
import os
import pathlib
import re
import subprocess
import sys
import urllib.parse

import ml_collections
import pytest

from jdistill import config as config_lib
from jdistill.config import docs as config_docs

ROOT = pathlib.Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "jdistill"
CONFIGS_MD = ROOT / "docs" / "configs.md"
TEACHER_PREFIX = "teachers.<name>."


def _rel(path: pathlib.Path) -> str:
  return path.relative_to(ROOT).as_posix()


# --------------------------------------------------------------------------- config fields


# Maps filled per run (`rl.verifiers.<domain>`, `pipeline.overrides.<stage>`): the name docs
# give them, from their declarations.
PER_RUN_MAPS = {
  name.rsplit(".<", 1)[0]: name
  for section in config_lib.SECTIONS
  for name, declared in section.rows()
  if declared.per
}


def _leaf_fields(node: ml_collections.ConfigDict, prefix: str = "") -> list[str]:
  out = []
  for key in sorted(node.keys()):
    name = prefix + key
    value = node[key]
    if name == "teachers":  # filled per run; its entries are `teacher_config()` fields
      continue
    if isinstance(value, ml_collections.ConfigDict) and not value.keys():
      out.append(PER_RUN_MAPS.get(name, name + ".<?>"))  # a map filled per run (rl.verifiers)
    elif isinstance(value, ml_collections.ConfigDict):
      out += _leaf_fields(value, name + ".")
    else:
      out.append(name)
  return out


def config_fields() -> set[str]:
  fields = set(_leaf_fields(config_lib.base_config()))
  fields |= {TEACHER_PREFIX + key for key in _leaf_fields(config_lib.teacher_config())}
  return fields


def _table_rows(text: str) -> list[list[str]]:
  """Cells of every markdown table row outside fenced code (header and rule rows too)."""
  rows = []
  for line in _strip_fences(text).splitlines():
    line = line.strip()
    if line.startswith("|"):
      cells = [c.strip() for c in re.split(r"(?<!\\)\|", line.strip("|"))]
      rows.append(cells)
  return rows


def documented_fields(text: str) -> list[str]:
  """Backticked names in the first cell of each table row of docs/configs.md."""
  names = []
  for cells in _table_rows(text):
    names += re.findall(r"`([^`]+)`", cells[0])
  return names


def test_every_config_field_is_documented_and_every_documented_field_exists():
  fields = config_fields()
  documented = documented_fields(CONFIGS_MD.read_text(encoding="utf-8"))
  doc = _rel(CONFIGS_MD)
  missing = sorted(fields - set(documented))
  unknown = sorted(set(documented) - fields)
  duplicated = sorted({n for n in documented if documented.count(n) > 1})
  problems = []
  if missing:
    problems.append(
      f"config fields missing from {doc} (declare each with field(default, description, "
      f"allowed) in its section under jdistill/config/, then run {config_docs.COMMAND}): "
      f"{missing}"
    )
  if unknown:
    problems.append(
      f"{doc} documents fields that the config does not have (regenerate it: "
      f"{config_docs.COMMAND}): {unknown}"
    )
  if duplicated:
    problems.append(f"{doc} documents these fields more than once: {duplicated}")
  assert not problems, "\n".join(problems)


def test_configs_md_is_generated_from_the_field_declarations():
  generated = config_docs.render_docs()
  assert CONFIGS_MD.read_text(encoding="utf-8") == generated, (
    f"{_rel(CONFIGS_MD)} is not what the field declarations in jdistill/config/ and "
    f"docs/configs.md.in generate; edit those (not the .md), then run: {config_docs.COMMAND}"
  )


def test_configs_md_generator_refuses_a_template_missing_a_section():
  template = config_docs.TEMPLATE.read_text(encoding="utf-8")
  with pytest.raises(ValueError, match=r"missing \['loss'\]"):
    config_docs.render_docs(template.replace("{{fields: loss}}", ""))
  with pytest.raises(ValueError, match="no config sections"):
    config_docs.render_docs(template + "{{fields: nosuch}}\n")


def test_documented_field_parser_sees_both_directions():
  """The check above would catch an added field and a stale row (guards the parser)."""
  text = "| field | x |\n|---|---|\n| `loss.chunk_size` | 1 |\n| `teachers.<name>.path` | 2 |\n"
  assert documented_fields(text) == ["loss.chunk_size", "teachers.<name>.path"]
  fields = config_fields()
  assert {"seed", "loss.chunk_size", "mesh.data", "overlap.topks"} <= fields
  assert TEACHER_PREFIX + "path" in fields and "teachers" not in fields


# --------------------------------------------------------------------------- links


def _strip_fences(text: str) -> str:
  """Text with fenced code blocks blanked out (line numbers kept)."""
  out, fence = [], None
  for line in text.splitlines():
    marker = re.match(r"\s*(`{3,}|~{3,})", line)
    if fence is None and marker:
      fence = marker.group(1)[0] * 3
      out.append("")
    elif fence is not None:
      if line.strip().startswith(fence):
        fence = None
      out.append("")
    else:
      out.append(line)
  return "\n".join(out)


def _slug(heading: str) -> str:
  """GitHub's anchor for a heading text."""
  text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)
  text = html.unescape(text).replace("`", "").strip().lower()
  return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def _anchors(path: pathlib.Path) -> set[str]:
  anchors, seen = set(), {}
  for line in _strip_fences(path.read_text(encoding="utf-8")).splitlines():
    m = re.match(r"#{1,6}\s+(.*?)\s*#*\s*$", line)
    if m:
      slug = _slug(m.group(1))
      n = seen.get(slug, 0)
      seen[slug] = n + 1
      anchors.add(slug if n == 0 else f"{slug}-{n}")
  return anchors


def markdown_files() -> list[pathlib.Path]:
  return sorted(ROOT.glob("*.md")) + sorted((ROOT / "docs").rglob("*.md"))


LINK = re.compile(r"\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")


def broken_links(path: pathlib.Path) -> list[str]:
  text = _strip_fences(path.read_text(encoding="utf-8"))
  problems = []
  for lineno, line in enumerate(text.splitlines(), 1):
    line = re.sub(r"(`+)(.+?)\1", "code", line)  # links inside code spans are not links
    for target in LINK.findall(line):
      where = f"{_rel(path)}:{lineno}: link {target!r}"
      if re.match(r"[A-Za-z][A-Za-z0-9+.-]*:", target):  # http(s), mailto, ...
        continue
      file_part, _, anchor = target.partition("#")
      file_part = urllib.parse.unquote(file_part)
      if not file_part:
        dest = path
      elif file_part.startswith("/"):
        dest = (ROOT / file_part.lstrip("/")).resolve()
      else:
        dest = (path.parent / file_part).resolve()
      if not dest.is_relative_to(ROOT):
        problems.append(f"{where} leaves the repository")
        continue
      if not dest.exists():
        problems.append(f"{where}: {_rel(dest)} does not exist")
        continue
      if anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
        problems.append(f"{where}: {_rel(dest)} has no heading with anchor #{anchor}")
  return problems


def test_relative_links_resolve_inside_the_repository():
  files = markdown_files()
  assert ROOT / "README.md" in files and CONFIGS_MD in files
  problems = [p for f in files for p in broken_links(f)]
  assert not problems, "broken links:\n" + "\n".join(problems)


def test_link_checker_catches_bad_links(tmp_path, monkeypatch):
  doc = ROOT / "docs" / "design.md"
  assert "package-layout" in _anchors(doc) and "the-losses" in _anchors(doc)
  fake = tmp_path / "repo"
  (fake / "docs").mkdir(parents=True)
  (fake / "docs" / "a.md").write_text(
    "# A\n[ok](b.md#b-c) [ok](https://x.y/z) [ok](#a) `[code](nowhere.md)`\n"
    "[gone](missing.md) [out](../../outside.md) [anchor](b.md#nope)\n"
    "```\n[fenced](nowhere.md)\n```\n",
    encoding="utf-8",
  )
  (fake / "docs" / "b.md").write_text("## B: `c`\n", encoding="utf-8")
  monkeypatch.setattr(sys.modules[__name__], "ROOT", fake)
  problems = broken_links(fake / "docs" / "a.md")
  assert len(problems) == 3, problems
  assert "does not exist" in problems[0] and "leaves the repository" in problems[1]
  assert "#nope" in problems[2]


# --------------------------------------------------------------------------- imports


def module_files() -> dict[str, pathlib.Path]:
  """`jdistill...` module name -> file, for every module of the package."""
  out = {}
  for path in sorted(PACKAGE.rglob("*.py")):
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
      parts = parts[:-1]
    out[".".join(parts)] = path
  return out


def import_edges(modules: dict[str, pathlib.Path]) -> dict[str, dict[str, str]]:
  """module -> {imported jdistill module: 'file:line'}, function-level imports included."""
  edges: dict[str, dict[str, str]] = {name: {} for name in modules}

  def add(src: str, dst: str, where: str) -> None:
    if dst != src and dst in modules:
      edges[src].setdefault(dst, where)

  for name, path in modules.items():
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    for node in ast.walk(tree):
      where = f"{_rel(path)}:{getattr(node, 'lineno', 0)}"
      if isinstance(node, ast.Import):
        for alias in node.names:
          target = alias.name
          while target and target not in modules:  # `import jdistill.a.b` -> deepest module
            target = target.rpartition(".")[0]
          if alias.name.split(".")[0] == "jdistill" and target:
            add(name, target, where)
      elif isinstance(node, ast.ImportFrom):
        if node.level:
          base_parts = package.split(".")
          base_parts = base_parts[: len(base_parts) - (node.level - 1)]
          base = ".".join(base_parts + ([node.module] if node.module else []))
        else:
          base = node.module or ""
        if base.split(".")[0] != "jdistill":
          continue
        for alias in node.names:
          submodule = f"{base}.{alias.name}"
          add(name, submodule if submodule in modules else base, where)
  return edges


def import_cycles(edges: dict[str, dict[str, str]]) -> list[list[str]]:
  """One cycle (as a closed path) per strongly connected component with a cycle."""
  index: dict[str, int] = {}
  low: dict[str, int] = {}
  stack: list[str] = []
  on_stack: set[str] = set()
  components: list[list[str]] = []

  def visit(v: str) -> None:
    index[v] = low[v] = len(index)
    stack.append(v)
    on_stack.add(v)
    for w in sorted(edges[v]):
      if w not in index:
        visit(w)
        low[v] = min(low[v], low[w])
      elif w in on_stack:
        low[v] = min(low[v], index[w])
    if low[v] == index[v]:
      component = []
      while True:
        w = stack.pop()
        on_stack.discard(w)
        component.append(w)
        if w == v:
          break
      if len(component) > 1:
        components.append(sorted(component))

  for v in sorted(edges):
    if v not in index:
      visit(v)

  cycles = []
  for component in components:  # shortest cycle through the component's first module
    start, members = component[0], set(component)
    paths = {start: [start]}
    frontier = [start]
    cycle = None
    while frontier and cycle is None:
      nxt = []
      for v in frontier:
        for w in sorted(edges[v]):
          if w == start:
            cycle = paths[v] + [start]
            break
          if w in members and w not in paths:
            paths[w] = paths[v] + [w]
            nxt.append(w)
        if cycle:
          break
      frontier = nxt
    cycles.append(cycle)
  return cycles


def _describe(cycle: list[str], edges: dict[str, dict[str, str]]) -> str:
  steps = [cycle[0]] + [f"-> {b} ({edges[a][b]})" for a, b in zip(cycle, cycle[1:])]
  return " ".join(steps)


def test_import_graph_helpers():
  edges = {"a": {"b": "a.py:1"}, "b": {"c": "b.py:2"}, "c": {"a": "c.py:3"}, "d": {"a": "d:1"}}
  assert import_cycles(edges) == [["a", "b", "c", "a"]]
  assert _describe(["a", "b", "a"], {"a": {"b": "a.py:1"}, "b": {"a": "b.py:2"}}) == (
    "a -> b (a.py:1) -> a (b.py:2)"
  )
  assert import_cycles({"a": {"b": "x"}, "b": {}}) == []
  found = import_edges(module_files())
  assert "jdistill.losses" in found["jdistill.config.training"]  # `from jdistill import losses`
  assert "jdistill.models.config" in found["jdistill.models.hf"]  # `from jdistill.models.x`
  assert (
    "jdistill.models" in found["jdistill.runtime.checkpoint"]
  )  # `from jdistill.models import X`


def test_no_import_cycle_among_jdistill_modules():
  edges = import_edges(module_files())
  cycles = import_cycles(edges)
  assert not cycles, (
    "import cycles among jdistill modules (data flows one way: config -> build -> loop -> "
    "stage step -> kernels; see docs/design.md#package-layout):\n"
    + "\n".join(_describe(c, edges) for c in cycles)
  )


# Imports each named module with no jdistill module loaded before it (the third-party
# libraries stay loaded: re-importing jax, flax and transformers per module costs minutes and
# checks nothing of jdistill's) → the failures as JSON on stdout.
IMPORT_EACH_ALONE = """
import importlib, json, sys, traceback
failures = []
for name in sys.argv[1:]:
  for loaded in [m for m in sys.modules if m == "jdistill" or m.startswith("jdistill.")]:
    del sys.modules[loaded]
  try:
    importlib.import_module(name)
  except BaseException:
    failures.append(name + ":\\n" + "".join(traceback.format_exc().splitlines(True)[-8:]))
print(json.dumps(failures))
"""


def import_each_alone(names: list[str]) -> list[str]:
  proc = subprocess.run(
    [sys.executable, "-c", IMPORT_EACH_ALONE, *names],
    cwd=ROOT,
    env=dict(os.environ, JAX_PLATFORMS="cpu"),
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert proc.returncode == 0, proc.stderr[-2000:]
  return json.loads(proc.stdout.strip().splitlines()[-1])


def test_import_each_alone_finds_a_module_that_needs_another_imported_first(tmp_path):
  """The check itself: a module that works only after another was imported fails alone."""
  package = tmp_path / "jdistill_probe_pkg"
  package.mkdir()
  (package / "__init__.py").write_text("")
  code = "import sys\nassert 'jdistill.losses' in sys.modules, 'needs losses first'\n"
  (package / "needs_losses.py").write_text(code)
  env_path = os.environ.get("PYTHONPATH", "")
  os.environ["PYTHONPATH"] = f"{tmp_path}{os.pathsep}{env_path}"
  try:
    ok = import_each_alone(["jdistill.losses"])
    bad = import_each_alone(["jdistill.losses", "jdistill_probe_pkg.needs_losses"])
  finally:
    os.environ["PYTHONPATH"] = env_path
  assert ok == []
  assert len(bad) == 1 and "needs losses first" in bad[0]


def test_each_module_imports_alone():
  failures = import_each_alone(sorted(module_files()))
  assert not failures, "modules that fail to import on their own:\n" + "\n\n".join(failures)


KERNELS = ("jdistill.losses", "jdistill.overlap.metrics", "jdistill.models", "jdistill.sampling")
ABOVE_KERNELS = ("jdistill.stages", "jdistill.runtime.loop", "jdistill.cli")
LIBRARY_ONLY_BELOW = ("jdistill.experiments", "jdistill.testing")


def _within(name: str, prefixes) -> bool:
  return any(name == p or name.startswith(p + ".") for p in prefixes)


def reachable(edges: dict[str, dict[str, str]], start: str) -> dict[str, list[str]]:
  """Every module `start` imports, directly or through others → the chain of 'file:line'."""
  chains = {start: []}
  frontier = [start]
  while frontier:
    nxt = []
    for v in frontier:
      for w, where in sorted(edges[v].items()):
        if w not in chains:
          chains[w] = chains[v] + [f"{w} ({where})"]
          nxt.append(w)
    frontier = nxt
  del chains[start]
  return chains


def layering_violations(edges, lower, upper) -> list[str]:
  """'module -> ... -> forbidden' for each module under `lower` that reaches one under `upper`."""
  out = []
  for name in sorted(edges):
    if not _within(name, lower):
      continue
    for target, chain in reachable(edges, name).items():
      if _within(target, upper):
        out.append(f"{name} -> " + " -> ".join(chain))
  return out


def test_layering_helpers_find_an_indirect_violation():
  edges = {
    "jdistill.losses.k": {"jdistill.util": "k.py:1"},
    "jdistill.util": {"jdistill.stages.opd": "util.py:2"},
    "jdistill.stages.opd": {},
  }
  found = layering_violations(edges, KERNELS, ABOVE_KERNELS)
  assert found == ["jdistill.losses.k -> jdistill.util (k.py:1) -> jdistill.stages.opd (util.py:2)"]
  assert layering_violations(edges, ("jdistill.util",), ("jdistill.losses",)) == []


def test_kernels_models_and_sampling_never_import_a_stage_the_loop_or_the_cli():
  """Losses, overlap metrics, models and sampling are functions of arrays: nothing they import
  (directly or through another module) is a stage, the loop or the command line; and no
  module of the library imports the experiments or the test fixtures."""
  edges = import_edges(module_files())
  assert any(_within(m, ("jdistill.losses",)) for m in edges)  # the names still exist
  assert "jdistill.overlap.metrics" in edges and "jdistill.runtime.loop" in edges
  problems = layering_violations(edges, KERNELS, ABOVE_KERNELS)
  library = tuple(
    m
    for m in edges
    if not _within(m, LIBRARY_ONLY_BELOW + ("jdistill.cli", "jdistill.__main__"))
    and m.count(".") >= 1
    and m
    not in ("jdistill.train", "jdistill.evaluate", "jdistill.experiment", "jdistill.task_world")
  )
  problems += layering_violations(edges, library, LIBRARY_ONLY_BELOW)
  assert not problems, "imports against the layering (docs/design.md):\n" + "\n".join(problems)
