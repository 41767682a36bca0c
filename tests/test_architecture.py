"""The layout rules of docs/architecture.md, checked on the source with `ast`:
imports only point down the layers, no module imports another's private names,
tests' reference code is not in the package, long files say why, and the tree in
docs/architecture.md is the package's tree."""

import ast
import os
import re

import pytest

from tests.conftest import ROOT

PACKAGE = os.path.join(ROOT, 'cimd_jax')
# Lower numbers are lower layers; a module may import its own part and lower layers.
LAYERS = {
    'utils': 0,
    'diffusion': 1, 'models': 1, 'data': 1, 'evaluation': 1, 'checkpoint': 1,
    'inference': 2,
    'train': 3,
    'settings': 4,
    'apps': 5, 'bench': 5,
    'main': 6,
}
MAX_LINES = 250


def _modules() -> list[str]:
  found = []
  for folder, _, files in os.walk(PACKAGE):
    if '__pycache__' in folder:
      continue
    found += [os.path.relpath(os.path.join(folder, f), ROOT) for f in files
              if f.endswith('.py')]
  return sorted(found)


def _part(path: str) -> str:
  """'cimd_jax/train/loop.py' -> 'train'; 'cimd_jax/settings.py' -> 'settings'."""
  parts = path.split(os.sep)
  return parts[1].removesuffix('.py') if len(parts) > 1 else ''


def _imports(tree: ast.AST) -> list[tuple[str, list[str], int]]:
  """(imported cimd_jax module path, names imported from it, line) of every import."""
  out = []
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      out += [(a.name, [], node.lineno) for a in node.names if a.name.startswith('cimd_jax')]
    elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith('cimd_jax'):
      out.append((node.module, [a.name for a in node.names], node.lineno))
  return out


def _target_part(module: str, names: list[str]) -> list[str]:
  parts = module.split('.')
  if len(parts) > 1:
    return [parts[1]]
  return names   # from cimd_jax import settings, metrics ...


@pytest.mark.parametrize('path', _modules())
def test_imports_point_down_and_no_private_names(path):
  with open(os.path.join(ROOT, path)) as f:
    tree = ast.parse(f.read())
  own = _part(path)
  if own == '__init__':
    return  # the package's lazy API may reach any layer
  assert own in LAYERS, f'{path}: add its part {own!r} to LAYERS and docs/architecture.md'
  aliases = {}
  for module, names, line in _imports(tree):
    for name in names:
      assert not name.startswith('_'), f'{path}:{line} imports private name {name} of {module}'
    for target in _target_part(module, names):
      if target in ('__version__',):
        continue
      assert target in LAYERS, f'{path}:{line}: unknown part {target!r}'
      assert target == own or LAYERS[target] < LAYERS[own], (
          f'{path}:{line} imports {module} ({target}, layer {LAYERS[target]}) from layer '
          f'{LAYERS[own]} ({own}): imports must point down')
  # Attribute access to another module's private names: `module._name`.
  for node in ast.walk(tree):
    if isinstance(node, (ast.Import, ast.ImportFrom)):
      for a in node.names:
        full = a.name if isinstance(node, ast.Import) else f'{node.module}.{a.name}'
        if full.startswith('cimd_jax'):
          aliases[a.asname or a.name.split('.')[0]] = full
  for node in ast.walk(tree):
    if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
        and node.value.id in aliases and node.attr.startswith('_')
        and not node.attr.startswith('__')):
      pytest.fail(f'{path}:{node.lineno} uses private {aliases[node.value.id]}.{node.attr}')


@pytest.mark.parametrize('path', _modules())
def test_long_modules_say_why(path):
  with open(os.path.join(ROOT, path)) as f:
    source = f.read()
  lines = source.count('\n')
  if lines <= MAX_LINES:
    return
  doc = ast.get_docstring(ast.parse(source)) or ''
  assert re.search(r'over\s+250\s+lines', doc, re.IGNORECASE), (
      f'{path} has {lines} lines: split it, or say at its top why it is over 250 lines')


def test_no_test_code_in_the_package():
  for path in _modules():
    with open(os.path.join(ROOT, path)) as f:
      tree = ast.parse(f.read())
    for node in ast.walk(tree):
      if isinstance(node, ast.ImportFrom) and node.module:
        assert not node.module.startswith('tests'), f'{path} imports {node.module}'
      if isinstance(node, ast.Import):
        assert not any(a.name.startswith('tests') for a in node.names), path
  assert not os.path.exists(os.path.join(PACKAGE, 'metrics_reference.py'))


def test_architecture_doc_tree_is_the_package_tree():
  with open(os.path.join(ROOT, 'docs', 'architecture.md')) as f:
    doc = f.read()
  block = re.search(r'```\ncimd_jax/\n(.*?)```', doc, re.DOTALL)
  assert block, 'docs/architecture.md needs a ```cimd_jax/ ...``` tree block'
  listed, folder = set(), ''
  for line in block.group(1).splitlines():
    name = line.strip().split(' ')[0]
    if not name:
      continue
    indent = len(line) - len(line.lstrip(' '))
    if name.endswith('/'):
      folder = name if indent <= 2 else folder
      continue
    if name.endswith('.py'):
      listed.add(os.path.join('cimd_jax', folder if indent > 2 else '', name).replace('//', '/'))
  actual = {p for p in _modules() if not p.endswith('__init__.py')}
  listed = {os.path.normpath(p) for p in listed}
  assert listed == actual, (f'in the doc only: {sorted(listed - actual)}; '
                            f'in the code only: {sorted(actual - listed)}')
