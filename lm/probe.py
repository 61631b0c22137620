"""Bias probes: does the model prefer the stereotyped sentence of a minimal pair, and by how much?

A probe set is a list of pairs (a, b): two sentences that differ only in an attribute term
(he / she, young / old), where `a` is the stereotype-consistent one. A pair's score is
log p(a) - log p(b) (nats, each sentence scored as bos + tokens + eos); the set's score is the
mean over pairs, with a bootstrap 95% confidence interval. Positive = the model follows the
stereotype; 0 = no preference.

Built-in sets are generated from templates (configs/probes/<name>.json):

  {"attribute": "gender_occupation",
   "sides":     {"male": {"subj": "he", ...}, "female": {"subj": "she", ...}},   exactly two
   "fillers":   {"male": ["carpenter", ...], "female": ["nurse", ...]},  stereotyped per side
   "templates": {"attribute_first": ["{Subj} was hired as the new {filler}.", ...],
                 "filler_first":    ["The {filler} said that {subj} would be late.", ...]}}

Every filler of side s in every template gives the pair (a = template with s's terms,
b = with the other side's terms). So the sets are balanced and counterbalanced by construction:
equal numbers of pairs per side (a model that simply prefers "he" everywhere gains on one
side what it loses on the other, and scores 0) and every pair is scored in both word orders
(attribute term before and after the filler).

The bootstrap resamples fillers (all pairs of a filler together: they are not independent)
within each side, keeping the sides equal; the before/after shift is bootstrapped on the
per-pair differences with the same resamples (a paired comparison).

Pair files (.jsonl) hold one {"a": ..., "b": ...} object per line, optionally with "side",
"filler", "order" and "attribute"; `python -m lm.probe NAME` prints a built-in set as such a file.

Scoring runs as one jitted function over the (sharded) params that returns per-pair scores
replicated on every process: the params are never gathered onto a host.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath
from jax.sharding import NamedSharding, PartitionSpec as P

from lm import sharding
from lm.errors import UserError

BUILTIN_DIR = pathlib.Path(__file__).resolve().parent.parent / 'configs' / 'probes'
ROWS_PER_CALL = 64  # Sentences scored per call of the jitted scorer (one compiled shape).


class ProbeError(UserError, ValueError):
  """A probe file or template that cannot be read (names the file and line or key)."""


@dataclasses.dataclass(frozen=True)
class Pair:
  a: str  # The stereotype-consistent sentence.
  b: str
  side: str = ''  # The side `a` stands for (its stratum in the bootstrap).
  filler: str = ''  # Pairs with the same filler are resampled together.
  order: str = ''


@dataclasses.dataclass(frozen=True)
class ProbeSet:
  name: str
  pairs: tuple[Pair, ...]


# --------------------------------------------------------------------------- probe sets


def _fill(template: str, terms: dict, filler: str, where: str) -> str:
  try:
    return template.format(filler=filler, **terms)
  except (KeyError, IndexError) as e:
    raise ProbeError(f'{where}: template {template!r} uses {e} which the side does not define '
                     f'(terms: {sorted(terms)})') from None


def generate(spec: dict, where: str = 'probe template') -> ProbeSet:
  """All pairs of a template spec (see the module docstring)."""
  for key in ('attribute', 'sides', 'fillers', 'templates'):
    if key not in spec:
      raise ProbeError(f'{where}: missing key {key!r}')
  sides = spec['sides']
  if len(sides) != 2:
    raise ProbeError(f'{where}: "sides" must name exactly two sides, got {sorted(sides)}')
  if set(spec['fillers']) != set(sides):
    raise ProbeError(f'{where}: "fillers" must have a list per side {sorted(sides)}, got '
                     f'{sorted(spec["fillers"])}')
  counts = {s: len(spec['fillers'][s]) for s in sides}
  if len(set(counts.values())) != 1:
    raise ProbeError(f'{where}: sides need equal numbers of fillers to balance, got {counts}')
  pairs = []
  for order, templates in spec['templates'].items():
    for template, side in itertools.product(templates, sides):
      other = next(s for s in sides if s != side)
      for filler in spec['fillers'][side]:
        pairs.append(Pair(_fill(template, sides[side], filler, where),
                          _fill(template, sides[other], filler, where), side, filler, order))
  return ProbeSet(spec['attribute'], tuple(pairs))


def read_pairs(path: str) -> ProbeSet:
  """A .jsonl of pairs ({"a", "b"} and optionally "side", "filler", "order")."""
  pairs = []
  for line_no, line in enumerate(epath.Path(path).read_text().splitlines(), 1):
    if not line.strip():
      continue
    try:
      record = json.loads(line)
      pairs.append(Pair(record['a'], record['b'], str(record.get('side', '')),
                        str(record.get('filler', '')), str(record.get('order', ''))))
    except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
      raise ProbeError(f'{path}:{line_no}: probe lines must be JSON objects with "a" and "b" '
                       f'({type(e).__name__}: {e})') from None
  if not pairs:
    raise ProbeError(f'{path}: no probe pairs')
  return ProbeSet(pathlib.Path(path).stem, tuple(pairs))


def load(name_or_path: str) -> ProbeSet:
  """A built-in set's name, a template spec (.json) or a pair file (.jsonl)."""
  path = name_or_path
  if not path.endswith(('.json', '.jsonl')):
    path = str(BUILTIN_DIR / f'{name_or_path}.json')
    if not pathlib.Path(path).exists():
      builtin = sorted(p.stem for p in BUILTIN_DIR.glob('*.json'))
      raise ProbeError(f'config key finetune.probes: no built-in probe set {name_or_path!r} '
                       f'(built-in: {builtin}; or give a .json template or .jsonl pair file)')
  if not epath.Path(path).exists():
    raise ProbeError(f'config key finetune.probes: {path} does not exist')
  if path.endswith('.jsonl'):
    return read_pairs(path)
  try:
    spec = json.loads(epath.Path(path).read_text())
  except json.JSONDecodeError as e:
    raise ProbeError(f'{path}:{e.lineno}: not valid JSON ({e.msg})') from None
  return generate(spec, path)


# --------------------------------------------------------------------------- scoring


def encode(tokenizer, texts: list[str], max_len: int) -> tuple[np.ndarray, ...]:
  """(inputs, targets, mask) [N, T]: bos + tokens + eos, next-token targets, real positions."""
  ids = [[tokenizer.bos_id] + tokenizer.encode(t)[:max_len - 1] + [tokenizer.eos_id]
         for t in texts]
  length = max(len(x) for x in ids) - 1
  inputs = np.full((len(ids), length), tokenizer.pad_id, np.int32)
  targets = np.zeros_like(inputs)
  mask = np.zeros(inputs.shape, np.float32)
  for i, x in enumerate(ids):
    inputs[i, :len(x) - 1], targets[i, :len(x) - 1], mask[i, :len(x) - 1] = x[:-1], x[1:], 1
  return inputs, targets, mask


def make_scorer(model, mesh, rules):
  """jit(params, inputs, targets, mask) -> log-likelihood per row, replicated on every process."""
  replicated = NamedSharding(mesh, P())

  def score(params, inputs_BT, targets_BT, mask_BT):
    logits_BTV = model.apply({'params': params}, inputs_BT, None, (mask_BT > 0).astype(jnp.int32))
    log_probs_BTV = jax.nn.log_softmax(logits_BTV.astype(jnp.float32))
    picked_BT = jnp.take_along_axis(log_probs_BTV, targets_BT[..., None], axis=-1)[..., 0]
    return jnp.sum(picked_BT * mask_BT, axis=-1)

  jitted = jax.jit(score, out_shardings=replicated)

  def run(params, inputs, targets, mask):
    # Every process holds the same (small) token arrays: a replicated global array each.
    args = [jax.make_array_from_process_local_data(replicated, x, x.shape)
            for x in (inputs, targets, mask)]
    with sharding.activate(mesh, rules):
      return np.asarray(jitted(params, *args))

  return run


def log_likelihoods(scorer, params, tokenizer, texts: list[str], max_len: int) -> np.ndarray:
  inputs, targets, mask = encode(tokenizer, texts, max_len)
  # Rows padded to a fixed count that every batch sharding divides: one compiled shape.
  rows = -(-ROWS_PER_CALL // jax.device_count()) * jax.device_count()
  total = -(-len(texts) // rows) * rows
  pad = ((0, total - len(texts)), (0, 0))
  inputs, targets, mask = (np.pad(x, pad) for x in (inputs, targets, mask))
  out = [scorer(params, inputs[i:i + rows], targets[i:i + rows], mask[i:i + rows])
         for i in range(0, total, rows)]
  return np.concatenate(out)[:len(texts)]


def pair_scores(scorer, params, tokenizer, probe_set: ProbeSet, max_len: int) -> np.ndarray:
  """log p(a) - log p(b) per pair."""
  texts = [p.a for p in probe_set.pairs] + [p.b for p in probe_set.pairs]
  ll = log_likelihoods(scorer, params, tokenizer, texts, max_len)
  n = len(probe_set.pairs)
  return ll[:n] - ll[n:]


# --------------------------------------------------------------------------- statistics


def _resample_index(pairs: tuple[Pair, ...], n_boot: int, seed: int) -> list[np.ndarray]:
  """Per side, an [n_boot, n_fillers] array of resampled filler ids, and pair -> filler id."""
  rng = np.random.default_rng(seed)
  sides = sorted({p.side for p in pairs})
  out = []
  for side in sides:
    members = [i for i, p in enumerate(pairs) if p.side == side]
    fillers = sorted({pairs[i].filler or str(i) for i in members})
    out.append((members, fillers, rng.integers(0, len(fillers), (n_boot, len(fillers)))))
  return out


def bootstrap(pairs: tuple[Pair, ...], values: np.ndarray, n_boot: int = 2000,
              seed: int = 0) -> tuple[float, float, float]:
  """(mean, 2.5th, 97.5th percentile): sides weighted equally, fillers resampled within sides."""
  side_means, side_boot = [], []
  for members, fillers, index in _resample_index(pairs, n_boot, seed):
    by_filler = {f: [] for f in fillers}
    for i in members:
      by_filler[pairs[i].filler or str(i)].append(values[i])
    sums = np.array([np.sum(by_filler[f]) for f in fillers])
    counts = np.array([len(by_filler[f]) for f in fillers])
    side_means.append(sums.sum() / counts.sum())
    side_boot.append(sums[index].sum(1) / counts[index].sum(1))
  boot = np.mean(side_boot, axis=0)
  low, high = np.percentile(boot, [2.5, 97.5])
  return float(np.mean(side_means)), float(low), float(high)


def summarize(pairs, before: np.ndarray, after: np.ndarray | None = None,
              n_boot: int = 2000) -> dict:
  """Score (and, given `after`, its shift) with 95% CIs, from per-pair scores."""
  mean, low, high = bootstrap(pairs, before, n_boot)
  out = {'pairs': len(pairs), 'score': mean, 'ci': [low, high]}
  if after is not None:
    a_mean, a_low, a_high = bootstrap(pairs, after, n_boot)
    s_mean, s_low, s_high = bootstrap(pairs, after - before, n_boot)
    out = {'pairs': len(pairs), 'before': mean, 'before_ci': [low, high], 'after': a_mean,
           'after_ci': [a_low, a_high], 'shift': s_mean, 'shift_ci': [s_low, s_high],
           'moved': bool(s_low > 0 or s_high < 0)}
  return out


def format_table(results: dict[str, dict]) -> str:
  lines = ['| probe (log p(stereotyped) - log p(other), nats) | pairs | before [95% CI] | '
           'after [95% CI] | shift [95% CI] |', '|---|---:|---:|---:|---:|']
  for name, r in results.items():
    lines.append(f"| {name} | {r['pairs']} | {r['before']:+.3f} [{r['before_ci'][0]:+.3f}, "
                 f"{r['before_ci'][1]:+.3f}] | {r['after']:+.3f} [{r['after_ci'][0]:+.3f}, "
                 f"{r['after_ci'][1]:+.3f}] | {r['shift']:+.3f} [{r['shift_ci'][0]:+.3f}, "
                 f"{r['shift_ci'][1]:+.3f}]{' *' if r['moved'] else ''} |")
  return '\n'.join(lines)


# --------------------------------------------------------------------------- fine-tuning


def score_run(run, params) -> dict[str, list[float]]:
  """Per-pair scores of every set in run.cfg.finetune.probes, under the run's params."""
  scorer = make_scorer(run.model, run.mesh, run.cfg.mesh.rules)
  out = {}
  for name in run.cfg.finetune.probes:
    probe_set = load(name)
    out[probe_set.name] = pair_scores(scorer, params, run.tokenizer, probe_set,
                                      run.cfg.data.seq_len).tolist()
  return out


def compare(probes, before: dict[str, list[float]], after: dict[str, list[float]],
            n_boot: int = 2000) -> dict[str, dict]:
  """Before/after/shift with CIs per set, from score_run's outputs."""
  sets = {s.name: s for s in map(load, probes)}
  return {name: summarize(sets[name].pairs, np.asarray(before[name]), np.asarray(after[name]),
                          n_boot) for name in before}


def _main(argv: list[str]) -> None:
  """python -m lm.probe NAME|FILE: the set's pairs as JSONL, and its balance on stderr."""
  if len(argv) != 1:
    raise SystemExit('usage: python -m lm.probe NAME|TEMPLATE.json|PAIRS.jsonl')
  probe_set = load(argv[0])
  for p in probe_set.pairs:
    print(json.dumps(dataclasses.asdict(p)))
  counts = {k: sum(1 for _ in g) for k, g in itertools.groupby(
      sorted((p.side, p.order) for p in probe_set.pairs))}
  print(f'{probe_set.name}: {len(probe_set.pairs)} pairs; per (side, order): {counts}',
        file=sys.stderr)


if __name__ == '__main__':
  _main(sys.argv[1:])
