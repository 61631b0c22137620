"""No import cycles in lm/: every import of an lm module, at module level or inside a function."""

import ast
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

KNOWN_CYCLES: list[set[str]] = []  # lm has none; a new cycle fails this test.


def lm_modules() -> dict[str, str]:
  """{dotted module name: file path} of every module under lm/."""
  modules = {}
  for folder, _, files in os.walk(os.path.join(ROOT, 'lm')):
    for name in files:
      if name.endswith('.py'):
        path = os.path.join(folder, name)
        parts = os.path.relpath(path, ROOT)[:-3].split(os.sep)
        if parts[-1] == '__init__':
          parts = parts[:-1]
        modules['.'.join(parts)] = path
  return modules


def imported_lm_modules(path: str, name: str, modules) -> set[str]:
  """The lm modules `path` imports anywhere (module level, functions, methods)."""
  package = name if path.endswith('__init__.py') else name.rpartition('.')[0]
  found = set()
  for node in ast.walk(ast.parse(open(path).read(), path)):
    if isinstance(node, ast.Import):
      targets = [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ''
      if node.level:
        base = '.'.join(package.split('.')[:len(package.split('.')) - node.level + 1]
                        + ([base] if base else []))
      targets = [f'{base}.{a.name}' if f'{base}.{a.name}' in modules else base
                 for a in node.names]
    else:
      continue
    for target in targets:
      while target and target not in modules:  # `import lm.x.y` names lm.x.y, else a parent.
        target = target.rpartition('.')[0]
      if target.startswith('lm') and target != 'lm' and target != name:
        found.add(target)
  return found


def unit(module: str) -> str:
  """A package counts as one unit: lm.convert.hf is lm.convert (generate <-> convert/hf.py is a
  cycle between generate and convert even though lm.convert itself never imports hf)."""
  return '.'.join(module.split('.')[:2])


def import_graph() -> dict[str, set[str]]:
  """{unit: units it imports}, over every module of lm/."""
  modules = lm_modules()
  graph: dict[str, set[str]] = {}
  for name, path in modules.items():
    edges = graph.setdefault(unit(name), set())
    edges.update(unit(m) for m in imported_lm_modules(path, name, modules) if unit(m) != unit(name))
  return graph


def cycles(graph: dict[str, set[str]]) -> list[set[str]]:
  """Strongly connected components with more than one module (Tarjan)."""
  index, low, stack, on_stack, out = {}, {}, [], set(), []

  def visit(node):
    index[node] = low[node] = len(index)
    stack.append(node)
    on_stack.add(node)
    for nxt in graph.get(node, ()):
      if nxt not in index:
        visit(nxt)
        low[node] = min(low[node], low[nxt])
      elif nxt in on_stack:
        low[node] = min(low[node], index[nxt])
    if low[node] == index[node]:
      component = set()
      while True:
        member = stack.pop()
        on_stack.discard(member)
        component.add(member)
        if member == node:
          break
      if len(component) > 1:
        out.append(component)

  for node in sorted(graph):
    if node not in index:
      visit(node)
  return out


def test_lm_has_no_import_cycles():
  found = [c for c in cycles(import_graph()) if c not in KNOWN_CYCLES]
  assert not found, f'import cycles in lm/: {[sorted(c) for c in found]}'


def test_the_cycle_finder_finds_a_cycle_through_function_level_imports(tmp_path):
  assert cycles({'a': {'b'}, 'b': {'c'}, 'c': {'a'}, 'd': {'a'}}) == [{'a', 'b', 'c'}]
  assert cycles({'a': {'b'}, 'b': set()}) == []
  graph = import_graph()
  assert 'lm.checkpoint' in graph['lm.loop'] and 'lm.evaluate' in graph['lm.loop']
  assert 'lm.loop' not in graph['lm.evaluate']  # Evaluation takes its run from lm.run.
  source = tmp_path / 'probe.py'
  source.write_text('import os\n\ndef f():\n  from lm import generate\n  from lm.data import stats\n')
  assert imported_lm_modules(str(source), 'lm.probe', lm_modules()) == {'lm.generate',
                                                                          'lm.data.stats'}


def test_no_test_module_imports_another():
  """Shared helpers live in tests/helpers.py or conftest.py fixtures."""
  tests = os.path.join(ROOT, 'tests')
  offenders = []
  for name in sorted(os.listdir(tests)):
    if not name.endswith('.py'):
      continue
    path = os.path.join(tests, name)
    for node in ast.walk(ast.parse(open(path).read(), path)):
      names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
               [node.module or ''] if isinstance(node, ast.ImportFrom) else [])
      offenders += [f'{name}: {n}' for n in names if n.split('.')[0].startswith('test_')]
  assert not offenders, offenders
