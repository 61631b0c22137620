"""Pre-train a language model: python train.py --config=configs/tiny.py [--config.key=value]."""

from lm import cli

cli.precheck()  # Unknown keys / missing config file: one line, before the flags parse them.

from absl import flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from lm import distributed, loop  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file('config', 'configs/tiny.py', 'Config file (configs/*.py).')
_WORKDIR = flags.DEFINE_string('workdir', '', 'Run directory (default: runs/<config name>).')
flags.DEFINE_bool('verbose', False, 'Show tracebacks for user errors.')


def main(argv):
  del argv
  distributed.initialize()
  cfg = _CONFIG.value
  loop.train(cfg, _WORKDIR.value or f'runs/{cfg.name}')


if __name__ == '__main__':
  cli.run(main)
