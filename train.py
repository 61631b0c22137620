"""Pre-train a language model: python train.py --config=configs/tiny.py [--config.key=value]."""

from lm import cli

cli.precheck()  # Unknown keys / missing config file: one line, before the flags parse them.

from lm import distributed, loop  # noqa: E402

_CONFIG, _WORKDIR = cli.define_run_flags('configs/tiny.py')


def main(argv):
  del argv
  distributed.initialize()
  cfg = _CONFIG.value
  loop.train(cfg, _WORKDIR.value or f'runs/{cfg.name}')


if __name__ == '__main__':
  cli.run(main)
