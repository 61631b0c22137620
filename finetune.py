"""Fine-tune a pre-trained model: python finetune.py --config=configs/finetune_domain.py.

Restores params (only) from config.finetune.restore_from, freezes / adds LoRA as configured,
trains with the same loop as train.py, and reports what fine-tuning changed.
"""

from lm import cli

cli.precheck()  # Unknown keys / missing config file: one line, before the flags parse them.

from lm import distributed, finetune  # noqa: E402

_CONFIG, _WORKDIR = cli.define_run_flags('configs/finetune_domain.py')


def main(argv):
  del argv
  distributed.initialize()
  cfg = _CONFIG.value
  finetune.finetune(cfg, _WORKDIR.value or f'runs/{cfg.name}')


if __name__ == '__main__':
  cli.run(main)
