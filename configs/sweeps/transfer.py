"""The transfer study (v2): what does pre-training buy on a held-out domain, for how much data,
and what does each fine-tuning recipe cost in general ability?

On the built-in corpus's 'email' domain (email/http/urllib/... of the stdlib, never seen in
pre-training) five recipes get the same step budget at 1%, 10% and 100% of the domain's
training documents (data.train_fraction: nested subsets):

  scratch  train.py on the domain only (same architecture and tokenizer as the pre-trained one)
  full     finetune.py from the general pre-trained model, every parameter trains
  frozen   finetune.py with the embeddings and the lower half of the layers frozen
  lora     finetune.py with rank-8 LoRA adapters on attention and MLP (base weights frozen)
  replay   full, with finetune.replay = 0.25 of every batch from the general corpus

The replay frontier has its own scale, 'frontier' (below): full fine-tuning with replay 0, 0.1,
0.25 and 0.5 of every batch, from which lm.transfer_report reads the smallest replay share that
keeps general loss within +0.05 of before and >= 90% of the domain gain.

Every arm uses the same weight decay (0.1). Learning rates: 1e-3 for every arm, plus 3e-3 from
scratch (stage `domain_scratch_lr`) and 1e-4 and 3e-4 for the fine-tuned arms (stage
`domain_finetune_lr`; a first run with 1e-3 and 3e-3 for every arm put full fine-tuning's best
rate at the grid's lower edge, and 3e-3 was never a fine-tuned arm's best). Each (recipe, share)
cell keeps the rate with the lowest mean domain validation loss over 3 seeds (seed and data
order both change). A `scratch_curve` stage adds from-scratch runs at 3% and 30% so the
from-scratch data-scaling curve has 5 sizes: the effective data transferred (Hernandez et al.
2021, lm/transfer.py) of each fine-tuned cell is read from it. 139 trials: ~55 min with
--parallel=2 on 2 cores.

  python -m lm.sweep --sweep=configs/sweeps/transfer.py --workdir=runs/transfer --parallel=2
  python -m lm.transfer_report --workdir=runs/transfer       # best-lr table, mean +/- spread,
                                                              # effective data, frontier plots
  python -m lm.sweep --sweep=configs/sweeps/transfer.py:smoke --workdir=/tmp/transfer_smoke
  python -m lm.sweep --sweep=configs/sweeps/transfer.py:large --workdir=gs://.../transfer

Scales (`--sweep=...transfer.py:<scale>`): 'cpu' (default, ~0.9M-parameter model), 'smoke'
(a few steps, checks the plumbing), 'large' (a ~30M-parameter model for one accelerator) and
'frontier' (the replay frontier alone at 300 domain steps on all the domain data, where full
fine-tuning gains on the domain: 0.14 +/- 0.12; it reuses the cpu scale's pre-trained model).
--config.KEY=VALUE on the lm.sweep command line sets a key for every trial (e.g. the mesh).
"""

from lm.sweep import Plot, Stage, Sweep, Table

SCALES = {
    #         model (d_model, layers, heads, kv heads, mlp), vocab, seq, batch, steps, domain steps
    # Learning rates: `lrs` for every arm, plus `scratch_lrs` from scratch and `finetune_lrs`
    # for the fine-tuned arms (fine-tuning wants lower rates: a first cpu run with 1e-3 and 3e-3
    # for every arm put full fine-tuning's best at the grid's lower edge).
    'smoke': dict(model=(64, 4, 4, 2, 128), vocab=1024, seq_len=32, batch=8, pretrain_steps=20,
                  domain_steps=10, eval_batches=4, fractions=(0.01, 1.0), curve=(0.1, 0.3),
                  lrs=(1e-3,), scratch_lrs=(3e-3,), finetune_lrs=(), seeds=(0, 1)),
    'cpu': dict(model=(128, 4, 4, 2, 384), vocab=1024, seq_len=64, batch=16, pretrain_steps=1000,
                domain_steps=100, eval_batches=16, fractions=(0.01, 0.1, 1.0), curve=(0.03, 0.3),
                lrs=(1e-3,), scratch_lrs=(3e-3,), finetune_lrs=(1e-4, 3e-4), seeds=(0, 1, 2)),
    'large': dict(model=(512, 8, 8, 4, 1536), vocab=8192, seq_len=256, batch=64,
                  pretrain_steps=20_000, domain_steps=500, eval_batches=32,
                  fractions=(0.01, 0.1, 1.0), curve=(0.003, 0.03, 0.3),
                  lrs=(3e-4, 1e-3), scratch_lrs=(3e-3,), finetune_lrs=(3e-5, 1e-4),
                  seeds=(0, 1, 2)),
}
# The replay frontier on its own, with a budget where full fine-tuning gains on the domain: the
# cpu scale's pre-training, then 300 domain steps on all the domain data (at 100 steps the gain
# is within the seeds' spread; see docs/transfer_study.md). Its pretrain trial is the cpu
# scale's: copy runs/transfer/pretrain into its workdir to skip it.
SCALES['frontier'] = dict(SCALES['cpu'], domain_steps=300, frontier_fraction=1.0,
                          frontier_lrs=(3e-4, 1e-3), frontier_replay=(0, 0.1, 0.25, 0.5))
WEIGHT_DECAY = 0.1  # Every arm, from scratch and fine-tuned alike.
REPLAY = 0.25


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
      metrics={'general_loss': 'final.eval/loss', 'domain_loss': None, 'domain_loss_best': None})
  finetune = {'finetune.restore_from': '{sweep}/pretrain', 'finetune.general_eval': True,
              'finetune.probes': ()}
  lower_half = '|'.join(str(i) for i in range(n_layers // 2))
  # From scratch, the domain loss is the run's own final evaluation (the same validation
  # batches finetune.py's report uses); its general loss is not part of the study.
  scratch = {'script': 'train.py', 'config': 'configs/tiny.py', **model,
             'tokenizer.path': '{sweep}/pretrain/tokenizer.model'}
  recipes = {
      'scratch': scratch,
      'full': {**finetune, 'finetune.freeze': ()},
      'frozen': {**finetune, 'finetune.freeze': ('embed/.*', f'layers_({lower_half})/.*')},
      'lora': {**finetune, 'finetune.freeze': (), 'finetune.lora_rank': 8,
               'finetune.lora_alpha': 16.0,
               'finetune.lora_targets': ('.*attn/(q|k|v|o)/kernel', '.*mlp/wi_[01]/kernel',
                                         '.*mlp/wo/kernel')},
      'replay': {**finetune, 'finetune.freeze': (), 'finetune.replay': REPLAY},
  }
  # A seed changes the initialisation (scratch, LoRA adapters) and the data order (every arm);
  # the nested data subsets stay the same.
  seeds = {seed: {'seed': seed, 'data.shuffle_seed': seed} for seed in s['seeds']}
  domain_overrides = {**common, 'data.builtin_subset': 'email', 'train.steps': s['domain_steps'],
                      'optim.weight_decay': WEIGHT_DECAY, 'optim.warmup_steps': 10,
                      'train.eval_every': max(s['domain_steps'] // 2, 1),  # 0, 1/2, end.
                      'train.checkpoint_every': max(s['domain_steps'] // 2, 1)}

  def domain_stage(name, recipes_, fractions, lrs):
    return Stage(name=name, script='finetune.py', config='configs/finetune_domain.py',
                 overrides=domain_overrides,
                 grid={'recipe': recipes_, 'data.train_fraction': list(fractions),
                       'optim.lr': list(lrs), 'seed': seeds})

  if scale == 'frontier':
    # How much general data in each batch buys how much less forgetting, and what it costs in
    # domain gain ('full' = replay 0), at one domain share.
    stages = [pretrain, domain_stage(
        'replay_frontier',
        {('full' if share == 0 else f'replay{share:g}'):
         {**recipes['full'], **({'finetune.replay': share} if share else {})}
         for share in s['frontier_replay']},
        [s['frontier_fraction']], s['frontier_lrs'])]
  else:
    finetuned = {k: v for k, v in recipes.items() if k != 'scratch'}
    stages = [pretrain, domain_stage('domain', recipes, s['fractions'], s['lrs']),
              domain_stage('domain_scratch_lr', {'scratch': scratch}, s['fractions'],
                           s['scratch_lrs'])]
    if s['finetune_lrs']:
      stages.append(domain_stage('domain_finetune_lr', finetuned, s['fractions'],
                                 s['finetune_lrs']))
    # From scratch at more data sizes, for the effective-data curve.
    stages.append(domain_stage('scratch_curve', {'scratch': scratch}, s['curve'],
                               s['lrs'] + s['scratch_lrs']))
  return Sweep(
      name=f'transfer_{scale}',
      description=('Domain (email) and general validation loss after an equal step budget on '
                   '1-100% of the domain data; recipes: scratch / full / frozen / lora / '
                   f'replay {REPLAY}; lr grid {list(s["lrs"])} (from scratch also '
                   f'{list(s["scratch_lrs"])}, fine-tuned arms also {list(s["finetune_lrs"])}) '
                   f'x seeds {list(s["seeds"])} per cell (python -m lm.transfer_report picks '
                   'the best lr per cell).'),
      stages=stages,
      metrics={
          'domain_loss': ('report.after.domain_loss', 'final.eval/loss'),
          'general_loss': 'report.after.general_loss',
          'domain_loss_best': 'min.eval/loss',  # Best of the evaluations during the run.
          'domain_loss_before': 'report.before.domain_loss',
          'general_loss_before': 'report.before.general_loss',
          'train_tokens': 'data.train_tokens',
          'replay': 'report.tradeoff.replay',  # The replay frontier's x (0 for 'full').
      },
      # Per (recipe, share) the trials differ in lr and seed: lm.transfer_report makes the
      # study's tables (best lr, mean +/- sd); results.md's pivot would show one trial a cell.
      tables=[Table(rows='recipe', cols='data.train_fraction', value='train_tokens',
                    stage='domain', title='Domain training tokens')],
      plot_metrics=('domain_loss', 'general_loss'),
      plots=[Plot(x='train_tokens', y=('domain_loss', 'general_loss'), lines='recipe',
                  stage='domain', file='transfer.png', xlabel='domain training tokens',
                  logx=True, title='', scatter=True,
                  references={'domain_loss': 'domain_loss_before',
                              'general_loss': 'general_loss_before'},
                  labels={'domain_loss': 'domain (email) validation loss',
                          'general_loss': 'general-corpus validation loss',
                          'domain_loss_before': 'pre-trained, no domain data',
                          'general_loss_before': 'pre-trained, before fine-tuning'})],
  )
