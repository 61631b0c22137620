"""The transfer study: how much does pre-training buy on a held-out domain, for how much data?

On the built-in corpus's 'email' domain (email/http/urllib/... of the stdlib, never seen in
pre-training) four recipes get the same step budget at 1%, 10% and 100% of the domain's
training documents (data.train_fraction: nested subsets):

  scratch  train.py on the domain only (same architecture and tokenizer as the pre-trained one)
  full     finetune.py from the general pre-trained model, every parameter trains
  frozen   finetune.py with the embeddings and the lower half of the layers frozen
  lora     finetune.py with rank-8 LoRA adapters on attention and MLP (base weights frozen)

Every trial is measured on the same domain validation batches and the same general-corpus
validation batches (what fine-tuning forgot): fine-tuning trials by finetune.py's before/after
report, from-scratch trials by the sweep's eval helper.

  python -m lm.sweep --sweep=configs/sweeps/transfer.py --workdir=runs/transfer     # < 1 h, 2 CPU cores
  python -m lm.sweep --sweep=configs/sweeps/transfer.py:smoke --workdir=/tmp/transfer_smoke
  python -m lm.sweep --sweep=configs/sweeps/transfer.py:large --workdir=gs://.../transfer

Scales (`--sweep=...transfer.py:<scale>`): 'cpu' (default, ~0.9M-parameter model), 'smoke'
(a few steps, checks the plumbing) and 'large' (a ~30M-parameter model for one accelerator).
--config.KEY=VALUE on the lm.sweep command line sets a key for every trial (e.g. the mesh).
"""

from lm.sweep import Plot, Stage, Sweep, Table

SCALES = {
    #         model (d_model, layers, heads, kv heads, mlp), vocab, seq, batch, steps, domain steps
    'smoke': dict(model=(64, 4, 4, 2, 128), vocab=1024, seq_len=32, batch=8, pretrain_steps=20,
                  domain_steps=10, eval_batches=4, fractions=(0.01, 1.0)),
    'cpu': dict(model=(128, 4, 4, 2, 384), vocab=1024, seq_len=64, batch=16, pretrain_steps=1000,
                domain_steps=200, eval_batches=16, fractions=(0.01, 0.1, 1.0)),
    'large': dict(model=(512, 8, 8, 4, 1536), vocab=8192, seq_len=256, batch=64,
                  pretrain_steps=20_000, domain_steps=500, eval_batches=32,
                  fractions=(0.01, 0.03, 0.1, 0.3, 1.0)),
}


def get_sweep(scale: str = 'cpu') -> Sweep:
  if scale not in SCALES:
    from lm.config import ConfigError
    raise ConfigError(f'transfer.py: unknown scale {scale!r} (choose from {sorted(SCALES)})')
  s = SCALES[scale]
  d_model, n_layers, n_heads, n_kv_heads, mlp_dim = s['model']
  model = {'model.d_model': d_model, 'model.n_layers': n_layers, 'model.n_heads': n_heads,
           'model.n_kv_heads': n_kv_heads, 'model.mlp_dim': mlp_dim}
  if scale == 'large':
    model['model.dtype'] = 'bfloat16'
  common = {'data.seq_len': s['seq_len'], 'data.batch_size': s['batch'],
            'train.eval_batches': s['eval_batches'], 'train.sample_tokens': 0,
            'train.log_every': 10 if scale != 'smoke' else 2}
  pretrain = Stage(
      name='pretrain', script='train.py', config='configs/tiny.py',
      overrides={**model, **common, 'tokenizer.vocab_size': s['vocab'],
                 'data.builtin_subset': 'general', 'optim.lr': 2e-3, 'optim.warmup_steps': 30,
                 'train.steps': s['pretrain_steps'],
                 'train.eval_every': max(s['pretrain_steps'] // 4, 1),
                 'train.checkpoint_every': max(s['pretrain_steps'] // 4, 1)},
      # Its own evaluations are on the general corpus; its domain loss is every fine-tuning
      # trial's domain_loss_before.
      metrics={'general_loss': 'final.eval/loss', 'domain_loss_best': None})
  finetune = {'finetune.restore_from': '{sweep}/pretrain', 'finetune.general_eval': True,
              'optim.warmup_steps': 10, 'optim.weight_decay': 0.0}
  lower_half = '|'.join(str(i) for i in range(n_layers // 2))
  recipes = {
      'scratch': {'script': 'train.py', 'config': 'configs/tiny.py', **model,
                  'tokenizer.path': '{sweep}/pretrain/tokenizer.model',
                  'optim.lr': 2e-3, 'optim.warmup_steps': 20,
                  'evals': {'domain': {}, 'general': {'data.builtin_subset': 'general'}}},
      'full': {**finetune, 'finetune.freeze': (), 'optim.lr': 1e-3},
      'frozen': {**finetune, 'finetune.freeze': ('embed/.*', f'layers_({lower_half})/.*'),
                 'optim.lr': 1e-3},
      'lora': {**finetune, 'finetune.freeze': (), 'finetune.lora_rank': 8,
               'finetune.lora_alpha': 16.0,
               'finetune.lora_targets': ('.*attn/(q|k|v|o)/kernel', '.*mlp/wi_[01]/kernel',
                                         '.*mlp/wo/kernel'),
               'optim.lr': 3e-3},
  }
  domain = Stage(
      name='domain', script='finetune.py', config='configs/finetune_domain.py',
      overrides={**common, 'data.builtin_subset': 'email', 'train.steps': s['domain_steps'],
                 'train.eval_every': max(s['domain_steps'] // 4, 1),
                 'train.checkpoint_every': max(s['domain_steps'] // 2, 1)},
      grid={'recipe': recipes, 'data.train_fraction': list(s['fractions'])})
  return Sweep(
      name=f'transfer_{scale}',
      description=('Domain (email) and general validation loss after an equal step budget on '
                   '1-100% of the domain data; recipes: scratch / full / frozen / lora.'),
      stages=[pretrain, domain],
      metrics={
          'domain_loss': ('report.after.domain_loss', 'evals.domain.loss'),
          'general_loss': ('report.after.general_loss', 'evals.general.loss'),
          'domain_loss_best': 'min.eval/loss',  # Best of the evaluations during the run.
          'domain_loss_before': 'report.before.domain_loss',
          'general_loss_before': 'report.before.general_loss',
          'train_tokens': 'data.train_tokens',
      },
      tables=[
          Table(rows='recipe', cols='data.train_fraction', value='domain_loss', stage='domain',
                title='Domain (email) validation loss, by recipe x share of the domain data'),
          Table(rows='recipe', cols='data.train_fraction', value='domain_loss_best',
                stage='domain', title='Domain validation loss, best of the evaluations during '
                'the run (early stopping)'),
          Table(rows='recipe', cols='data.train_fraction', value='general_loss', stage='domain',
                title='General-corpus validation loss after training on the domain (forgetting)'),
          Table(rows='recipe', cols='data.train_fraction', value='train_tokens', stage='domain',
                title='Domain training tokens'),
      ],
      plot_metrics=('domain_loss', 'general_loss'),
      plots=[Plot(x='train_tokens', y=('domain_loss', 'general_loss'), lines='recipe',
                  stage='domain', file='transfer.png', xlabel='domain training tokens',
                  logx=True, title='',
                  references={'domain_loss': 'domain_loss_before',
                              'general_loss': 'general_loss_before'},
                  labels={'domain_loss': 'domain (email) validation loss',
                          'general_loss': 'general-corpus validation loss',
                          'domain_loss_before': 'pre-trained, no domain data',
                          'general_loss_before': 'pre-trained, before fine-tuning'})],
  )
