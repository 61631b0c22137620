"""Fine-tuning task data built from the built-in corpus, so every task demo runs offline.

  docstring_sft     prompt: a function's signature and the opening quotes of its docstring;
                    completion: the docstring's first paragraph and the closing quotes.
                    (supervised prompt -> completion, loss on the completion only)
  package_classify  text: a docstring; label: the stdlib package it documents, among the
                    four general-subset packages with the most docstrings (balanced).
                    (sequence classification, sentiment-analysis style)

  python -m lm.tasks --task=docstring_sft --out=/tmp/sft.jsonl

The files are JSONL with the fields the data layer reads by default (prompt/completion,
text/label), so any user's own JSONL of the same shape works the same way.
"""

from __future__ import annotations

import ast
import collections
import json
import os
import sys

from absl import flags
from etils import epath

from lm import cli, corpus, files
from lm.config import ConfigError

TASK_DATA = ('docstring_sft', 'package_classify')


def _first_paragraph(docstring: str) -> str:
  return docstring.strip().split('\n\n')[0].strip()


def docstring_sft_examples(max_examples: int = 4000, subset: str = 'general') -> list[dict]:
  """(signature + opening quotes) -> (first docstring paragraph + closing quotes) pairs."""
  root = corpus.stdlib_root()
  examples = []
  for path in sorted(root.rglob('*.py')):
    relative = path.relative_to(root)
    if corpus._is_excluded_path(relative) or corpus.domain_of(relative) != subset:
      continue
    try:
      tree = ast.parse(path.read_text(encoding='utf-8'))
    except (SyntaxError, UnicodeDecodeError, ValueError):
      continue  # A few stdlib files are deliberately invalid; they are not task data.
    for node in ast.walk(tree):
      if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
        continue
      doc = ast.get_docstring(node)
      if not doc or len(doc) < 20 or node.name.startswith('_'):
        continue
      signature = f'def {node.name}({ast.unparse(node.args)}):'
      examples.append({'prompt': f'{signature}\n    """', 'completion': f'{_first_paragraph(doc)}\n    """'})
      if len(examples) >= max_examples:
        return examples
  return examples


def package_classify_examples(num_classes: int = 4, subset: str = 'general') -> list[dict]:
  """Docstrings labelled by top-level package; the num_classes largest packages, balanced."""
  by_package = collections.defaultdict(list)
  for doc in corpus.documents(subset, kinds=('docstrings',)):
    package = doc.name.split(':', 1)[1].split('.')[0]
    by_package[package].append(doc.text)
  largest = sorted(by_package, key=lambda p: (-len(by_package[p]), p))[:num_classes]
  per_class = min(len(by_package[p]) for p in largest)
  return [{'text': text, 'label': package} for package in sorted(largest)
          for text in by_package[package][:per_class]]


def build(task_data: str, out_path: str | os.PathLike) -> epath.Path:
  """Writes the task's JSONL (once; an existing file is reused) and returns its path."""
  out_path = epath.Path(out_path)
  if out_path.exists():
    return out_path
  if task_data == 'docstring_sft':
    examples = docstring_sft_examples()
  elif task_data == 'package_classify':
    examples = package_classify_examples()
  else:
    raise ConfigError(f'config key finetune.task_data: unknown {task_data!r} (choose from {TASK_DATA})')
  # Processes of one run race here; each writes the same examples and renames its own file.
  files.write_bytes(out_path, ''.join(json.dumps(e) + '\n' for e in examples).encode())
  return out_path


def define_flags(flag_values: flags.FlagValues, argv: list[str]) -> None:
  del argv
  flags.DEFINE_enum('task', None, TASK_DATA, 'Which task data to build.', flag_values=flag_values)
  flags.DEFINE_string('out', None, 'The JSONL file to write.', flag_values=flag_values)


def run(args: flags.FlagValues, positional: list[str]) -> int:
  if positional or not args.task or not args.out:
    raise ConfigError('usage: python -m lm.tasks --task=NAME --out=FILE.jsonl (see --help)')
  path = build(args.task, args.out)
  with open(path) as f:
    print(f'{path}: {sum(1 for _ in f)} examples')
  return 0


def main(argv: list[str] | None = None) -> int:
  return cli.run_tool(run, define_flags, argv, prog='python -m lm.tasks', doc=__doc__)


if __name__ == '__main__':
  sys.exit(main())
