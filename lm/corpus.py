"""The built-in corpus: the Python standard library of the running interpreter.

Every machine that runs this code already holds real text in English prose and Python: the
stdlib's source files, the docstrings inside them and the reference documentation shipped
in `pydoc_data`. So a demo run needs no network and no download.

Three kinds of documents (`KINDS`, selected by cfg.data.builtin_kinds):

- 'source'     each `.py` file cut into chunks of whole top-level statements (~4 KB each),
- 'docstrings' each module, class and function docstring, under a `help()`-style header,
- 'topics'     each reference topic of `pydoc_data.topics` (the text of `help('if')` etc.).

Domain subsets (`DOMAINS`) are families of stdlib modules held out from the 'general'
subset, so a model pre-trained on 'general' has never seen them and fine-tuning on a domain
adapts to new text. Tests (`test/`, `tests/`, `idle_test/`), generated tables and the copy
of the topics inside `pydoc_data/topics.py` are left out of every subset.

Every document carries a `group`: the file chunk it came from. A docstring and the source
chunk that contains it share the group, so a train/validation split by group never puts
the same text on both sides.

Extracting takes a few seconds, so the documents are cached in
`$LM_CACHE_DIR/corpus/` (default `~/.cache/lm`), keyed by interpreter version and path.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import hashlib
import inspect
import os
import json
import pathlib
import sys
import sysconfig
import tempfile

# Bump when extraction changes, so stale caches are not reused.
_FORMAT_VERSION = 1
_CHUNK_CHARS = 4000  # Source chunks grow statement by statement until they reach this size.

KINDS = ('docstrings', 'topics', 'source')

DOMAINS = {
    'email': 'Internet data handling and protocols: email, mailbox, MIME, http, urllib, '
             'smtplib/imaplib/poplib/nntplib/ftplib, wsgiref, xmlrpc, cgi, html.',
    'asyncio': 'Asynchronous I/O: the asyncio package and its predecessors asyncore/asynchat.',
}

# Top-level stdlib module or package names of each domain.
DOMAIN_MODULES = {
    'email': ('email', 'mailbox', 'mailcap', 'mimetypes', 'quopri', 'uu', 'smtplib', 'smtpd',
              'imaplib', 'poplib', 'nntplib', 'ftplib', 'http', 'urllib', 'wsgiref', 'xmlrpc',
              'cgi', 'cgitb', 'html'),
    'asyncio': ('asyncio', 'asyncore', 'asynchat'),
}
SUBSETS = ('general',) + tuple(DOMAINS)
DEFAULT_DOMAIN = 'email'  # The domain the fine-tuning demo adapts to.

# Never text worth modelling: tests (full of deliberately broken input), build artefacts,
# the frozen-module demos, the rot13 easter egg, and pydoc_data (its topics are their own kind).
_EXCLUDED_TOP = {'site-packages', 'pydoc_data', '__phello__', '__hello__', 'this'}
_EXCLUDED_DIRS = {'test', 'tests', 'idle_test', '__pycache__'}


@dataclasses.dataclass(frozen=True)
class Document:
  name: str  # e.g. 'source:email/message.py#3', 'docstrings:json.dumps', 'topics:if'.
  text: str
  kind: str  # One of KINDS.
  domain: str  # 'general' or a key of DOMAINS.
  group: str  # Split key: documents of one group always land in the same split.


def stdlib_root() -> pathlib.Path:
  return pathlib.Path(sysconfig.get_paths()['stdlib'])


def domain_of(relative_path: pathlib.PurePath) -> str:
  """'general' or the domain whose module family holds this stdlib file."""
  top = relative_path.parts[0].removesuffix('.py')
  for domain, modules in DOMAIN_MODULES.items():
    if top in modules:
      return domain
  return 'general'


def _is_excluded_path(relative_path: pathlib.PurePath) -> bool:
  top = relative_path.parts[0].removesuffix('.py')
  if top in _EXCLUDED_TOP or top.startswith(('_sysconfigdata', 'config-')):
    return True
  return any(part in _EXCLUDED_DIRS for part in relative_path.parts[:-1])


def _is_generated_table(relative_path: pathlib.PurePath, source: str) -> bool:
  # encodings/cp1252.py and friends are generated character tables, not text.
  return relative_path.parts[0] == 'encodings' and 'decoding_table' in source


def _chunk_start_lines(tree: ast.Module, lines: list[str]) -> list[int]:
  """0-based first line of each top-level statement, pulled up over its leading comments."""
  starts = []
  for node in tree.body:
    first = min([node.lineno] + [d.lineno for d in getattr(node, 'decorator_list', [])]) - 1
    while first > 0 and lines[first - 1].lstrip().startswith('#'):
      first -= 1
    starts.append(first)
  return starts


def _chunk_spans(tree: ast.Module, lines: list[str]) -> list[tuple[int, int, list[ast.stmt]]]:
  """Cuts the file into (first line, end line, statements) spans of about _CHUNK_CHARS."""
  starts = _chunk_start_lines(tree, lines)
  chars_before = [0]  # chars_before[i] = characters in lines[:i].
  for line in lines:
    chars_before.append(chars_before[-1] + len(line))
  spans, begin, stmts = [], 0, []
  for i, node in enumerate(tree.body):
    end = starts[i + 1] if i + 1 < len(starts) else len(lines)
    stmts.append(node)
    if chars_before[end] - chars_before[begin] >= _CHUNK_CHARS:
      spans.append((begin, end, stmts))
      begin, stmts = end, []
  if begin < len(lines):
    spans.append((begin, len(lines), stmts))
  return spans


def _docstrings(nodes: list[ast.stmt], module: str) -> list[tuple[str, str]]:
  """(qualified name, cleaned docstring) of every class and function inside `nodes`."""
  found = []

  def visit(node: ast.AST, prefix: str) -> None:
    for child in ast.iter_child_nodes(node):
      if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        qualname = f'{prefix}{child.name}'
        doc = ast.get_docstring(child, clean=True)
        if doc:
          found.append((qualname, doc))
        visit(child, f'{qualname}.')

  holder = ast.Module(body=nodes, type_ignores=[])
  visit(holder, f'{module}.')
  return found


def _module_name(relative_path: pathlib.PurePath) -> str:
  parts = list(relative_path.with_suffix('').parts)
  if parts[-1] == '__init__':
    parts.pop()
  return '.'.join(parts)


def _file_documents(path: pathlib.Path, root: pathlib.Path) -> list[Document]:
  """Source chunks and docstrings of one stdlib file (nothing if excluded or unreadable)."""
  rel = path.relative_to(root)
  if _is_excluded_path(rel):
    return []
  try:
    source = path.read_text(encoding='utf-8')
    if _is_generated_table(rel, source):
      return []
    tree = ast.parse(source)
  except (UnicodeDecodeError, SyntaxError, ValueError):
    return []  # A handful of stdlib files may not parse on every build; none are needed.
  domain, module = domain_of(rel), _module_name(rel)
  lines = source.splitlines(keepends=True)
  docs = []
  for index, (begin, end, stmts) in enumerate(_chunk_spans(tree, lines)):
    group = f'{rel.as_posix()}#{index}'
    text = ''.join(lines[begin:end])
    if text.strip():
      docs.append(Document(f'source:{group}', text, 'source', domain, group))
    if index == 0 and (module_doc := ast.get_docstring(tree, clean=True)):
      docs.append(Document(f'docstrings:{module}', f'Help on module {module}:\n\n{module_doc}\n',
                           'docstrings', domain, group))
    for qualname, doc in _docstrings(stmts, module):
      docs.append(Document(f'docstrings:{qualname}', f'Help on {qualname}:\n\n{doc}\n',
                           'docstrings', domain, group))
  return docs


def _topic_documents() -> list[Document]:
  try:
    from pydoc_data import topics  # pylint: disable=import-outside-toplevel
  except ImportError:
    return []  # Some distributions strip pydoc_data; the other kinds remain.
  return [Document(f'topics:{name}', inspect.cleandoc(text) + '\n', 'topics', 'general',
                   f'topics:{name}') for name, text in sorted(topics.topics.items())]


def extract_documents(root: pathlib.Path | None = None) -> tuple[Document, ...]:
  """Walks the stdlib (sorted, so the order is the same everywhere) and extracts documents."""
  root = root or stdlib_root()
  docs = []
  for path in sorted(root.rglob('*.py')):
    docs.extend(_file_documents(path, root))
  docs.extend(_topic_documents())
  return tuple(docs)


def cache_dir() -> pathlib.Path:
  return pathlib.Path(os.environ.get('LM_CACHE_DIR', pathlib.Path.home() / '.cache' / 'lm'))


def cache_key(root: pathlib.Path | None = None) -> str:
  """Identifies the corpus text: it changes only with the interpreter or the extraction code."""
  key = f'{sys.version}|{root or stdlib_root()}|{_FORMAT_VERSION}'
  return hashlib.sha256(key.encode()).hexdigest()[:16]


def _cache_path(root: pathlib.Path) -> pathlib.Path:
  version = f'{sys.version_info.major}.{sys.version_info.minor}'
  return cache_dir() / 'corpus' / f'stdlib-{version}-{cache_key(root)}.json'


def _write_atomically(path: pathlib.Path, payload: bytes) -> None:
  # Several processes may build the cache at once; rename makes the last writer win cleanly.
  path.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix='.tmp')
  with os.fdopen(fd, 'wb') as f:
    f.write(payload)
  os.replace(tmp, path)


@functools.lru_cache(maxsize=1)
def all_documents() -> tuple[Document, ...]:
  """Every document of every subset, from the on-disk cache when it is there."""
  root = stdlib_root()
  path = _cache_path(root)
  # Plain JSON (a list of field lists), never pickle: loading the cache must not be able to
  # run code, whoever could write to the cache directory.
  try:
    with open(path, encoding='utf-8') as f:
      return tuple(Document(*fields) for fields in json.load(f))
  except (OSError, ValueError, TypeError):
    pass  # No cache yet, or an unreadable one (a cache, not data): rebuild it.
  docs = extract_documents(root)
  try:
    _write_atomically(path, json.dumps([dataclasses.astuple(d) for d in docs],
                                       ensure_ascii=False).encode('utf-8'))
  except OSError:
    pass  # A read-only home only costs the extraction time again.
  return docs


def documents(subset: str = 'general', kinds=KINDS) -> list[Document]:
  """The documents of one subset ('general' or a DOMAINS key) and kinds, in a fixed order."""
  if subset not in SUBSETS:
    raise ValueError(f"unknown builtin subset {subset!r}; choose one of {list(SUBSETS)}")
  unknown = set(kinds) - set(KINDS)
  if unknown:
    raise ValueError(f'unknown builtin kinds {sorted(unknown)}; choose from {list(KINDS)}')
  return [d for d in all_documents() if d.domain == subset and d.kind in kinds]
