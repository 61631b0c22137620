"""Batched decoding with the KV cache: greedy, temperature, top-k, top-p, stop tokens.

    python -m lm.generate --checkpoint=DIR --prompt="The capital of France is" \
        [--prompt=...] [--max_new_tokens=32 --temperature=0 --top_k=0 --top_p=1 --stop=...]
    python -m lm.generate --help     (every flag)

Prompts of unequal length are left-padded: padding has segment id 0, so no query attends to it,
and every row's positions start at 0 on its first real token. The cache (model.decode=True) is
shared by the batch and written at one scalar index, so after the prompt every row adds one
token per step at the same slot. Two jitted functions: `prefill` (whole prompt, fills the cache,
samples the first token) and `decode` (a while loop over the remaining tokens that stops early
when every row has hit a stop token).
"""

from __future__ import annotations

import dataclasses
import sys
import time
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import flags

from lm import build, cli
from lm import model as lm_model
from lm import tokenizer as tokenizer_lib
from lm.config import ConfigError
from lm.convert import resolve_checkpoint


@dataclasses.dataclass(frozen=True)
class Sampling:
  """How the next token is chosen. temperature 0 is greedy; top_k 0 and top_p 1 disable those."""
  temperature: float = 0.0
  top_k: int = 0
  top_p: float = 1.0


def sample_logits(logits_BV: jax.Array, rng: jax.Array, sampling: Sampling) -> jax.Array:
  """Next token ids [B] from float32 logits."""
  if sampling.temperature <= 0:
    return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
  logits_BV = logits_BV.astype(jnp.float32) / sampling.temperature
  if sampling.top_k > 0:
    kth_B1 = jax.lax.top_k(logits_BV, min(sampling.top_k, logits_BV.shape[-1]))[0][:, -1:]
    logits_BV = jnp.where(logits_BV < kth_B1, -jnp.inf, logits_BV)
  if sampling.top_p < 1.0:
    sorted_BV = jnp.sort(logits_BV, axis=-1)[:, ::-1]
    probs_BV = jax.nn.softmax(sorted_BV, axis=-1)
    # Keep the smallest prefix whose mass reaches top_p: a token stays if the mass before it is
    # still below top_p, so the most likely token always stays.
    keep_BV = (jnp.cumsum(probs_BV, axis=-1) - probs_BV) < sampling.top_p
    threshold_B1 = jnp.min(jnp.where(keep_BV, sorted_BV, jnp.inf), axis=-1, keepdims=True)
    logits_BV = jnp.where(logits_BV < threshold_B1, -jnp.inf, logits_BV)
  return jax.random.categorical(rng, logits_BV, axis=-1).astype(jnp.int32)


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int = 0) -> tuple[np.ndarray, ...]:
  """(tokens, positions, segment_ids), each [B, P], prompts right-aligned."""
  if not prompts or any(len(p) == 0 for p in prompts):
    raise ValueError('every prompt needs at least one token')
  P = max(len(p) for p in prompts)
  tokens = np.full((len(prompts), P), pad_id, np.int32)
  segments = np.zeros((len(prompts), P), np.int32)
  for i, p in enumerate(prompts):
    tokens[i, P - len(p):] = p
    segments[i, P - len(p):] = 1
  positions = np.maximum(np.cumsum(segments, axis=1) - 1, 0).astype(np.int32)
  return tokens, positions, segments


def init_cache(model: nn.Module, batch: int, max_len: int) -> Any:
  """A zero KV cache for `max_len` tokens; shapes come from an abstract init (no FLOPs)."""
  dummy = jnp.zeros((batch, max_len), jnp.int32)
  shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), dummy))
  return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), nn.meta.unbox(shapes['cache']))


class Generator:
  """Holds a decode-mode model and its jitted prefill/decode; reusable across prompt batches."""

  def __init__(self, model_cfg: ml_collections.ConfigDict, params: Any,
               finetune: ml_collections.ConfigDict | None = None):
    self.model = lm_model.build_model(model_cfg, finetune, decode=True)
    self.params = params
    self._prefill = jax.jit(self._prefill_fn, static_argnames=('sampling',))
    # The cache is updated in place on accelerators; CPU cannot reuse donated buffers.
    donate = ('cache',) if jax.default_backend() != 'cpu' else ()
    self._decode = jax.jit(self._decode_fn, static_argnames=('sampling', 'steps'),
                           donate_argnames=donate)

  def _apply(self, params, cache, tokens_BT, positions_BT, segments_BT):
    logits_BTV, mutated = self.model.apply({'params': params, 'cache': cache}, tokens_BT,
                                           positions_BT, segments_BT, mutable=['cache'])
    return logits_BTV, mutated['cache']

  def _prefill_fn(self, params, cache, tokens_BP, positions_BP, segments_BP, rng, sampling):
    logits_BPV, cache = self._apply(params, cache, tokens_BP, positions_BP, segments_BP)
    return sample_logits(logits_BPV[:, -1], rng, sampling), cache

  def _decode_fn(self, params, cache, first_B, positions_B, stop_ids, rng, sampling, steps):
    """Tokens [B, steps] after `first_B` (which is out[:, 0]), stopping rows at a stop id."""
    B = first_B.shape[0]
    out_BN = jnp.zeros((B, steps), jnp.int32).at[:, 0].set(first_B)
    done_B = jnp.isin(first_B, stop_ids)

    def cond(state):
      i, _, _, _, done_B, _, _ = state
      return (i < steps) & ~jnp.all(done_B)

    def body(state):
      i, cache, token_B, pos_B, done_B, out_BN, rng = state
      rng, step_rng = jax.random.split(rng)
      logits_B1V, cache = self._apply(params, cache, token_B[:, None], pos_B[:, None],
                                      jnp.ones((B, 1), jnp.int32))
      next_B = sample_logits(logits_B1V[:, 0], step_rng, sampling)
      out_BN = out_BN.at[:, i].set(jnp.where(done_B, 0, next_B))
      done_B = done_B | jnp.isin(next_B, stop_ids)
      return i + 1, cache, next_B, pos_B + 1, done_B, out_BN, rng

    state = (jnp.int32(1), cache, first_B, positions_B, done_B, out_BN, rng)
    i, _, _, _, _, out_BN, _ = jax.lax.while_loop(cond, body, state)
    return out_BN, i

  def generate(self, prompts: Sequence[Sequence[int]], max_new_tokens: int,
               sampling: Sampling = Sampling(), stop_ids: Sequence[int] = (), seed: int = 0,
               pad_id: int = 0) -> tuple[list[list[int]], dict[str, float]]:
    """New tokens per prompt (cut after the first stop id, which is kept) and timings."""
    if max_new_tokens < 1:
      return [[] for _ in prompts], {}
    tokens, positions, segments = left_pad(prompts, pad_id)
    B, P = tokens.shape
    cache = init_cache(self.model, B, P + max_new_tokens)
    stops = jnp.asarray(list(stop_ids) or [-1], jnp.int32)
    rng_prefill, rng_decode = jax.random.split(jax.random.PRNGKey(seed))
    t0 = time.perf_counter()
    first_B, cache = self._prefill(self.params, cache, tokens, positions, segments, rng_prefill,
                                   sampling=sampling)
    first_B.block_until_ready()
    t1 = time.perf_counter()
    out_BN, steps = self._decode(self.params, cache, first_B, jnp.asarray(positions[:, -1] + 1),
                                 stops, rng_decode, sampling=sampling, steps=max_new_tokens)
    out_BN = np.asarray(out_BN)
    t2 = time.perf_counter()
    results = [_cut_at_stop(row[:int(steps)].tolist(), stop_ids) for row in out_BN]
    n_new = sum(len(r) for r in results)
    return results, {'prefill_s': t1 - t0, 'decode_s': t2 - t1, 'new_tokens': n_new,
                     'decode_steps': int(steps), 'prompt_tokens': int(segments.sum())}


def _cut_at_stop(row: list[int], stop_ids: Sequence[int]) -> list[int]:
  for j, t in enumerate(row):
    if t in stop_ids:
      return row[:j + 1]
  return row


def greedy_reference(model_cfg, params, prompts: Sequence[Sequence[int]],
                     max_new_tokens: int) -> list[list[int]]:
  """Greedy decoding by re-running the full sequence each step, without a cache (for tests).

  Each prompt decodes alone, right-padded to one fixed length (causal attention never looks
  right), so the forward pass compiles once for all prompts and steps.
  """
  model = lm_model.build_model(model_cfg)
  total = max(len(p) for p in prompts) + max_new_tokens
  apply = jax.jit(lambda p, t, n: model.apply({'params': p}, t)[0, n - 1])
  results = []
  for prompt in prompts:
    tokens = list(prompt)
    for _ in range(max_new_tokens):
      padded = jnp.asarray([tokens + [0] * (total - len(tokens))], jnp.int32)
      tokens.append(int(jnp.argmax(apply(params, padded, len(tokens)))))
    results.append(tokens[len(prompt):])
  return results


def load_checkpoint(path) -> tuple[ml_collections.ConfigDict, Any]:
  """(config, params) of an lm checkpoint or lm.convert output directory, on one device."""
  return build.load_checkpoint(resolve_checkpoint(path))


# --------------------------------------------------------------------------- CLI


def define_flags(flag_values: flags.FlagValues, argv: list[str]) -> None:
  del argv
  def define(kind, name, default, help_text):
    getattr(flags, f'DEFINE_{kind}')(name, default, help_text, flag_values=flag_values)

  define('string', 'checkpoint', None,
         'An lm checkpoint directory (or run workdir), or an lm.convert output directory.')
  define('multi_string', 'prompt', [], 'A prompt; repeat for a batch.')
  define('integer', 'max_new_tokens', 32, 'Tokens to generate per prompt.')
  define('float', 'temperature', 0.0, 'Sampling temperature; 0 is greedy.')
  define('integer', 'top_k', 0, 'Keep the k most likely tokens (0: all).')
  define('float', 'top_p', 1.0, 'Keep the smallest set of tokens with this mass (1: all).')
  define('integer', 'seed', 0, 'Sampling seed.')
  define('multi_string', 'stop', [], "Extra stop token: a piece (e.g. '<end_of_turn>') or an "
         "integer id; the tokenizer's eos is always one.")
  define('bool', 'no_bos', False, "Do not prepend the tokenizer's bos.")
  define('integer', 'repeat', 1, 'Run N times; later runs are warm.')


def stop_ids(tok, stops: Sequence[str]) -> list[int]:
  """The tokenizer's eos plus each --stop (an id, or a piece of the vocabulary)."""
  ids = [tok.eos_id] if tok.eos_id >= 0 else []
  pieces = None
  for s in stops:
    if s.lstrip('-').isdigit():
      ids.append(int(s))
      continue
    if pieces is None:
      pieces = {tok.id_to_piece(i): i for i in range(tok.vocab_size)}
    if s not in pieces:
      raise ConfigError(f'--stop={s!r}: not a piece of the tokenizer')
    ids.append(pieces[s])
  return ids


def run(args: flags.FlagValues, positional: list[str]) -> int:
  if positional:
    raise ConfigError(f'unexpected arguments {positional}')
  if not args.checkpoint:
    raise ConfigError('--checkpoint is required (see --help)')
  if not args.prompt:
    raise ConfigError('give at least one --prompt')
  cfg, params = load_checkpoint(args.checkpoint)
  if not cfg.tokenizer.path:
    raise ConfigError(f'{args.checkpoint}: its config has no tokenizer.path')
  tok = tokenizer_lib.Tokenizer.load(cfg.tokenizer.path)
  bos = [] if args.no_bos or tok.bos_id < 0 else [tok.bos_id]
  prompts = [bos + tok.encode(p) for p in args.prompt]
  finetune = cfg.finetune if cfg.finetune.lora_rank > 0 else None
  gen = Generator(cfg.model, params, finetune)
  sampling = Sampling(args.temperature, args.top_k, args.top_p)
  stops = stop_ids(tok, args.stop)
  for run_index in range(args.repeat):
    outs, t = gen.generate(prompts, args.max_new_tokens, sampling, stops, args.seed, tok.pad_id)
    for prompt, out in zip(args.prompt, outs):
      print(f'--- {prompt!r}\n{prompt}{tok.decode(out)}')
    total = t['prefill_s'] + t['decode_s']
    print(f"[run {run_index + 1}] prompt {t['prompt_tokens']} tokens in {t['prefill_s']:.2f}s; "
          f"{t['new_tokens']} new tokens in {t['decode_s']:.2f}s "
          f"({t['new_tokens'] / max(t['decode_s'], 1e-9):.1f} tokens/s decode, "
          f"{t['new_tokens'] / max(total, 1e-9):.1f} tokens/s overall"
          + (', includes compilation' if run_index == 0 else '') + ')')
  return 0


def main(argv: list[str] | None = None) -> int:
  return cli.run_tool(run, define_flags, argv, prog='python -m lm.generate', doc=__doc__)


if __name__ == '__main__':
  sys.exit(main())
