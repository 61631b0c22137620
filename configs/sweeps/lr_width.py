"""An ablation example: learning rate x model width (grid), plus a seeded random search.

  python -m lm.sweep --sweep=configs/sweeps/lr_width.py --workdir=runs/lr_width   # 6 min, 2 cores
  python -m lm.sweep --sweep=configs/sweeps/lr_width.py --workdir=runs/lr_width --print-commands

Stage 'grid' runs 3 x 2 trials of configs/tiny.py shrunk to ~0.2-0.6M parameters; stage
'random' draws 4 (lr, warmup) pairs from random.Random(0). Results: runs/lr_width/results.md,
eval_loss_vs_optim.lr_grid.png (one line per width), loss_curves.png. Measured (2 shared cores,
5m52s): best eval loss 4.83 (random lr 2.8e-3, warmup 50); grid best 4.85 (d_model 64, lr 1e-2).
"""

from lm.sweep import Stage, Sweep, Table, log_uniform, randint

SMALL = {'model.n_layers': 2, 'model.n_heads': 4, 'model.n_kv_heads': 2,
         'tokenizer.vocab_size': 1024, 'data.seq_len': 64, 'data.batch_size': 16,
         'train.steps': 150, 'train.eval_every': 50, 'train.eval_batches': 8,
         'train.log_every': 10, 'train.checkpoint_every': 50, 'train.sample_tokens': 0}


def get_sweep() -> Sweep:
  grid = Stage(name='grid', script='train.py', config='configs/tiny.py',
               overrides={**SMALL, 'model.mlp_dim': 256},
               grid={'optim.lr': [1e-3, 3e-3, 1e-2], 'model.d_model': [64, 128]})
  search = Stage(name='random', script='train.py', config='configs/tiny.py',
                 overrides={**SMALL, 'model.d_model': 128, 'model.mlp_dim': 256},
                 random={'optim.lr': log_uniform(3e-4, 3e-2), 'optim.warmup_steps': randint(0, 50)},
                 samples=4, seed=0)
  return Sweep(
      name='lr_width', stages=[grid, search],
      metrics={'eval_loss': 'final.eval/loss', 'train_loss': 'final.train/loss',
               'tokens_per_s': 'final.train/tokens_per_s'},
      tables=[Table(rows='model.d_model', cols='optim.lr', value='eval_loss', stage='grid',
                    title='Validation loss after 150 steps: width x learning rate')])
