"""Fine-tune a pre-trained model: python finetune.py --config=configs/finetune_domain.py.

Restores params (only) from config.finetune.restore_from, freezes / adds LoRA as configured,
trains with the same loop as train.py, and reports what fine-tuning changed.
"""

from lm import cli

cli.precheck()  # Unknown keys / missing config file: one line, before the flags parse them.

from absl import flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from lm import distributed  # noqa: E402
from lm import finetune  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file('config', 'configs/finetune_domain.py',
                                          'Config file (configs/finetune_*.py).')
_WORKDIR = flags.DEFINE_string('workdir', '', 'Run directory (default: runs/<config name>).')
flags.DEFINE_bool('verbose', False, 'Show tracebacks for user errors.')


def main(argv):
  del argv
  distributed.initialize()
  cfg = _CONFIG.value
  finetune.finetune(cfg, _WORKDIR.value or f'runs/{cfg.name}')


if __name__ == '__main__':
  cli.run(main)
