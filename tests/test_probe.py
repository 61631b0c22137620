"""Bias probes: balanced sets, honest intervals, and a probe that moves when (and only when) the
fine-tuning data carries the association."""

import json
import os
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from lm import config, finetune, loop, probe, sharding, step
from lm import model as model_lib
from lm import tokenizer as tokenizer_lib
from helpers import subprocess_env

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

GENDER = json.loads((probe.BUILTIN_DIR / 'gender_occupation.json').read_text())


@pytest.mark.parametrize('name', ['gender_occupation', 'age_technology'])
def test_builtin_sets_are_balanced_and_counterbalanced(name):
  pairs = probe.load(name).pairs
  assert len(pairs) >= 200
  sides = sorted({p.side for p in pairs})
  orders = sorted({p.order for p in pairs})
  assert len(sides) == 2 and len(orders) == 2
  cells = [sum(p.side == s and p.order == o for p in pairs) for s in sides for o in orders]
  assert len(set(cells)) == 1  # Equal counts per side, in both word orders.
  for p in pairs:  # A minimal pair: one word differs.
    a, b = p.a.split(), p.b.split()
    assert len(a) == len(b) and sum(x != y for x, y in zip(a, b)) == 1, p


def test_a_side_preference_scores_zero_and_stereotype_scores_its_size():
  pairs = probe.load('gender_occupation').pairs
  rng = np.random.default_rng(0)
  noise = rng.normal(0, 0.3, len(pairs))
  # A model that prefers "he" by 1 nat everywhere: +1 on male-side pairs, -1 on female-side ones.
  he_everywhere = np.where([p.side == 'male' for p in pairs], 1.0, -1.0) + noise
  mean, low, high = probe.bootstrap(pairs, he_everywhere)
  assert low < 0 < high and abs(mean) < 0.1
  # A model that follows the stereotype by 0.5 nat: the score says 0.5 and the CI holds it.
  mean, low, high = probe.bootstrap(pairs, 0.5 + noise)
  assert low < 0.5 < high and low > 0.3
  result = probe.summarize(pairs, noise, noise + 0.5)
  assert result['moved'] and result['shift_ci'][0] > 0.4  # Paired: the noise cancels.


def test_bad_probe_files_name_the_problem(tmp_path):
  with pytest.raises(probe.ProbeError, match="no built-in probe set 'gendr'"):
    probe.load('gendr')
  bad = tmp_path / 'p.jsonl'
  bad.write_text('{"a": "x"}\n')
  with pytest.raises(probe.ProbeError, match='p.jsonl:1: .*"a" and "b"'):
    probe.load(str(bad))
  spec = dict(GENDER, fillers={'male': ['cook'], 'female': []})
  with pytest.raises(probe.ProbeError, match='equal numbers of fillers'):
    probe.generate(spec)
  spec = dict(GENDER, templates={'x': ['{Subj} and {they} cook.']})
  with pytest.raises(probe.ProbeError, match="uses 'they'"):
    probe.generate(spec)


# --------------------------------------------------------------------------- fine-tuning moves it


def corpus(path, seed, biased, n_docs=1200):
  """One template sentence per document (so no pronoun can be copied from context). Biased:
  every occupation with its stereotyped pronoun; neutral: with either pronoun, at random."""
  rng = np.random.default_rng(seed)
  templates = [t for ts in GENDER['templates'].values() for t in ts]
  fillers = [(side, f) for side, fs in GENDER['fillers'].items() for f in fs]
  docs = []
  for _ in range(n_docs):
    side, filler = fillers[rng.integers(len(fillers))]
    if not biased:
      side = ('male', 'female')[rng.integers(2)]
    docs.append(templates[rng.integers(len(templates))].format(filler=filler,
                                                               **GENDER['sides'][side]))
  path.write_text(''.join(json.dumps({'text': d}) + '\n' for d in docs))
  return str(path)


def tiny_cfg(data_path, steps, lr=3e-3, schedule='cosine'):
  c = config.base_config()
  c.model.update(d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, mlp_dim=128)
  c.tokenizer.update(model_type='bpe', vocab_size=256, byte_fallback=False)
  c.data.update(source='jsonl', paths=(data_path,), seq_len=64, batch_size=8, min_chars=0)
  c.optim.update(lr=lr, schedule=schedule, warmup_steps=5, weight_decay=0.0)
  c.train.update(steps=steps, log_every=100, eval_every=0, eval_batches=2,
                 checkpoint_every=1000, sample_tokens=0)
  return c


def pretrain_base(workdir):
  """A tiny model pre-trained on the neutral corpus: no association to start from."""
  workdir.mkdir()
  loop.train(tiny_cfg(corpus(workdir / 'neutral.jsonl', 0, biased=False), steps=20),
             workdir / 'base')


def finetune_probe(base, workdir, biased):
  workdir.mkdir()
  # The association is a dependency over several tokens that a tiny model learns last, all at
  # once, after every other token of these sentences: with lr 1e-2 that came just before step
  # 400 (a shift of ~4.5 nats) and, in a run whose float results differed only in the last bits
  # (XLA at -O0), not yet (0.44). With lr 2e-2 it comes between steps 100 (no shift yet) and
  # 200: there the shift is +2.65 [2.47, 2.83] on one CPU device at -O0 (+3.44 [3.32, 3.56] at
  # -O1, +3.9 on 8 devices), well over the 1.0 the test asks; the neutral corpus stays within
  # its CI (-0.02 [-0.07, +0.01] at -O0, -0.004 [-0.018, +0.008] at -O1).
  cfg = tiny_cfg(corpus(workdir / 'ft.jsonl', 1, biased=biased), steps=200, lr=2e-2,
                 schedule='constant')
  cfg.finetune.update(restore_from=str(base), general_eval=False, probes=('gender_occupation',))
  finetune.finetune(cfg, workdir / 'ft')


def pretrain_then_finetune_both(root):
  """The base run, then its biased and neutral fine-tunes, one after the other in one process:
  the two fine-tunes reuse its imports and warm caches."""
  root.mkdir()
  pretrain_base(root / 'pre')
  for name in ('biased', 'neutral'):
    finetune_probe(root / 'pre' / 'base', root / name, biased=name == 'biased')


def run_children(*jobs, devices=None, llvm_opt_level=None):
  """Runs this file's `__main__` once per job (its argv), all at once, each on `devices` fake
  CPU devices (None: one) at the suite's XLA flags (or that LLVM level). One device for a long
  run: on 8 fake devices a step of this model took 150-190 ms, on one 50-80 ms (their per-step
  synchronisation)."""
  procs = [subprocess.Popen([sys.executable, __file__, *map(str, job)],
                            env=subprocess_env(devices, llvm_opt_level), cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
           for job in jobs]
  for proc in procs:
    out = proc.communicate(timeout=600)[0]
    assert proc.returncode == 0, out


def test_probe_moves_with_a_biased_corpus_and_not_with_a_neutral_one(tmp_path):
  # 440 steps in one process: nothing of it is compared bitwise with this process, so LLVM runs
  # at -O1, not the suite's -O0. A step runs ~2x faster for a slower compile: 46 s of CPU for
  # the three runs, not 55 s (65 s as three processes at -O0).
  run_children(('pretrain_then_finetune_both', tmp_path / 'runs'), llvm_opt_level=1)
  runs = tmp_path / 'runs'
  biased, neutral = (json.loads((runs / name / 'ft' / 'finetune_report.json').read_text())
                     ['probes']['gender_occupation'] for name in ('biased', 'neutral'))
  assert biased['pairs'] == neutral['pairs'] == 240
  assert biased['moved'] and biased['shift_ci'][0] > 1.0, biased  # Towards the stereotype.
  assert not neutral['moved'], neutral
  assert neutral['shift_ci'][0] < 0 < neutral['shift_ci'][1]
  assert biased['shift'] > 5 * abs(neutral['shift'])


# --------------------------------------------------------------------------- several processes


def sharded_scores(tokenizer_path):
  """Gender-probe scores of a fixed random tiny model, params sharded over every device."""
  cfg = config.base_config()
  cfg.model.update(d_model=32, n_layers=1, n_heads=2, n_kv_heads=1, mlp_dim=64, vocab_size=256)
  mesh = sharding.make_mesh(cfg.mesh)
  model = model_lib.build_model(cfg.model)
  params, _ = sharding.init_sharded(step.init_fn(model, 64), mesh, cfg.mesh.rules,
                                    jax.random.key(0))
  scorer = probe.make_scorer(model, mesh, cfg.mesh.rules)
  tok = tokenizer_lib.Tokenizer.load(tokenizer_path)
  scores = probe.pair_scores(scorer, params, tok, probe.load('gender_occupation'), 64)
  return scores, jax.tree.leaves(params)[0].is_fully_addressable


def test_scores_of_params_spread_over_two_processes_equal_one_process(tmp_path):
  tok_cfg = config.base_config().tokenizer
  tok_cfg.update(model_type='bpe', vocab_size=256, byte_fallback=False)
  pairs = probe.load('gender_occupation').pairs
  tok_path = str(tmp_path / 'tok.model')
  tokenizer_lib.train_tokenizer([p.a + ' ' + p.b for p in pairs], tok_cfg, tok_path)
  with socket.socket() as sock:
    sock.bind(('127.0.0.1', 0))
    port = sock.getsockname()[1]
  run_children(*[('score', i, port, tok_path, tmp_path / f'scores_{i}.json') for i in range(2)],
               devices=4)
  expected, _ = sharded_scores(tok_path)
  for i in range(2):
    got = json.loads((tmp_path / f'scores_{i}.json').read_text())
    assert not got['fully_addressable']  # Each process holds only its shards of the params.
    np.testing.assert_allclose(got['scores'], expected, rtol=1e-5, atol=1e-5)


def score_in_one_of_two_processes(process_id, port, tokenizer_path, out_path):
  """One of the processes of the test above."""
  jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  jax.distributed.initialize(coordinator_address=f'127.0.0.1:{port}', num_processes=2,
                             process_id=int(process_id))
  result, addressable = sharded_scores(tokenizer_path)
  with open(out_path, 'w') as f:
    json.dump({'scores': result.tolist(), 'fully_addressable': addressable}, f)


if __name__ == '__main__':  # A child process of one of the tests above.
  import pathlib
  job, *args = sys.argv[1:]
  if job == 'pretrain_then_finetune_both':
    pretrain_then_finetune_both(pathlib.Path(args[0]))
  elif job == 'score':
    score_in_one_of_two_processes(*args)
  else:
    sys.exit(f'unknown job {job!r}: pretrain_then_finetune_both or score')
