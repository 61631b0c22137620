"""lm.cli: user errors are one line and exit 2 (nothing after it), everything else keeps its
traceback; every tool's --help lists its flags."""

import json
import os
import subprocess
import sys

import pytest

from lm import cli, config
from lm import tokenizer as tokenizer_lib
from lm.errors import UserError
from helpers import subprocess_env

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def cli_env():
  return subprocess_env(None)


def write_bad_jsonl(path, n_good=300):
  lines = [json.dumps({'text': f'document {i} says hello to the world of words {i * 7}'})
           for i in range(n_good)]
  path.write_text('\n'.join(lines[:n_good // 2] + ['{"text": "cut short'] + lines[n_good // 2:])
                  + '\n')
  return n_good // 2 + 1  # The bad line's number.


@pytest.mark.parametrize('tokenizer_given', [False, True])
def test_bad_jsonl_line_at_start_up_is_exactly_one_line_on_stderr(tmp_path, tokenizer_given):
  """With tokenizer.path given, the data is first read after Orbax's checkpoint manager and
  its threads exist: their shutdown must add nothing after the error line."""
  data = tmp_path / 'bad.jsonl'
  bad_line = write_bad_jsonl(data)
  args = [sys.executable, os.path.join(ROOT, 'train.py'), '--config=configs/tiny.py',
          '--config.data.source=jsonl', f"--config.data.paths=('{data}',)",
          '--config.tokenizer.vocab_size=320', '--config.tokenizer.byte_fallback=False',
          '--config.mesh.data=1', '--config.mesh.fsdp=1', f'--workdir={tmp_path / "run"}']
  if tokenizer_given:
    tok_cfg = config.base_config().tokenizer
    tok_cfg.update(vocab_size=320, byte_fallback=False)
    texts = [f'document {i} says hello to the world of words {i * 7}' for i in range(300)]
    tokenizer_lib.train_tokenizer(texts, tok_cfg, str(tmp_path / 'tok.model'))
    args.append(f'--config.tokenizer.path={tmp_path / "tok.model"}')
  result = subprocess.run(args, capture_output=True, text=True, env=cli_env(), cwd=ROOT,
                          timeout=300)
  assert result.returncode == 2, result.stderr
  lines = result.stderr.splitlines()
  assert len(lines) == 1, result.stderr
  assert lines[0].startswith('error: ') and f'{data}:{bad_line}: not valid JSON' in lines[0]


def test_a_wrong_typed_override_is_one_line_naming_the_key(tmp_path):
  result = subprocess.run(
      [sys.executable, os.path.join(ROOT, 'train.py'), '--config.train.steps=ten',
       f'--workdir={tmp_path}'], capture_output=True, text=True, env=cli_env(), cwd=ROOT,
      timeout=120)
  assert result.returncode == 2
  assert result.stderr.startswith('error: config key train.steps: cannot use') and \
      len(result.stderr.splitlines()) == 1, result.stderr


class _ToolError(UserError):
  """A user-error class no table lists: recognised by its base alone."""


def _define(flag_values, argv):
  del argv
  from absl import flags
  flags.DEFINE_integer('n', 1, 'How many.', flag_values=flag_values)


def test_run_tool_prints_any_user_error_as_one_line_and_keeps_bugs_tracebacks(capsys):
  def fails(error):
    def main(flag_values, positional):
      assert flag_values.n == 3 and positional == ['extra']
      raise error
    return main

  assert cli.run_tool(fails(_ToolError('bad input in x.jsonl:3')), _define,
                      ['--n=3', 'extra'], prog='tool', doc='A tool.') == 2
  assert capsys.readouterr().err == 'error: bad input in x.jsonl:3\n'
  with pytest.raises(_ToolError):  # --verbose: the traceback.
    cli.run_tool(fails(_ToolError('x')), _define, ['--n=3', 'extra', '--verbose'], prog='tool',
                 doc='A tool.')
  with pytest.raises(ZeroDivisionError):  # A bug is not a user error.
    cli.run_tool(fails(ZeroDivisionError('bug')), _define, ['--n=3', 'extra'], prog='tool',
                 doc='A tool.')
  with pytest.raises(SystemExit) as exit_info:
    cli.run_tool(fails(ZeroDivisionError()), _define, ['--n=three'], prog='tool', doc='A tool.')
  assert exit_info.value.code == 2 and "flag --n=three" in capsys.readouterr().err


def test_config_overrides_are_parsed_by_ml_collections_with_the_configs_types():
  from absl import flags
  argv = ['tool', '--config.train.steps=7', "--config.finetune.freeze=('embed/.*',)",
          '--config.optim.lr=0.5']
  flag_values = flags.FlagValues()
  cli.define_config_overrides(flag_values, argv, 'overrides')
  flag_values(argv)
  assert cli.config_overrides(flag_values['config']) == {
      'train.steps': 7, 'finetune.freeze': ('embed/.*',), 'optim.lr': 0.5}


@pytest.mark.parametrize('tool, expected', [
    (['-m', 'lm.sweep'], ['--sweep', '--workdir', '--parallel', '--print_commands', '--aggregate',
                          '--config']),
    (['-m', 'lm.generate'], ['--checkpoint', '--prompt', '--max_new_tokens', '--temperature',
                             '--top_k', '--top_p', '--stop', '--no_bos', '--repeat']),
    (['-m', 'lm.tasks'], ['--task', '--out']),
    (['-m', 'lm.convert'], ['hf', 'gguf', 'export']),
    (['train.py'], ['--config', '--workdir', '--verbose']),
    (['finetune.py'], ['--config', '--workdir', '--verbose']),
    (['-m', 'lm.bench'], ['--config', '--steps', '--dry_run', '--torch']),
])
def test_every_tool_help_lists_its_flags(tool, expected):
  result = subprocess.run([sys.executable, *tool, '--help'], capture_output=True, text=True,
                          env=cli_env(), cwd=ROOT, timeout=120)
  assert result.returncode in (0, 1), result.stderr  # absl's own --help (train.py) exits 1.
  for flag in expected:
    assert flag.lstrip('-') in result.stdout, (flag, result.stdout)  # absl: --[no]verbose.
