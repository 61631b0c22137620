"""Batched decoding with the KV cache: greedy, temperature, top-k, top-p, stop tokens.

    python -m lm.generate --checkpoint=DIR --prompt="The capital of France is" \
        [--prompt=...] [--max_new_tokens=32 --temperature=0 --top_k=0 --top_p=1 --stop=...]

Prompts of unequal length are left-padded: padding has segment id 0, so no query attends to it,
and every row's positions start at 0 on its first real token. The cache (model.decode=True) is
shared by the batch and written at one scalar index, so after the prompt every row adds one
token per step at the same slot. Two jitted functions: `prefill` (whole prompt, fills the cache,
samples the first token) and `decode` (a while loop over the remaining tokens that stops early
when every row has hit a stop token).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from lm import model as lm_model


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
  """(config, params) of an lm checkpoint or lm.convert output directory, with the params
  checked against the model the config builds (LoRA adapters included) and placed on one device."""
  from lm import checkpoint
  from lm.convert import resolve_checkpoint

  ckpt = resolve_checkpoint(path)
  cfg = checkpoint.read_config(ckpt)
  finetune = cfg.finetune if cfg.finetune.lora_rank > 0 else None
  model = lm_model.build_model(cfg.model, finetune)
  shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 1), jnp.int32)))
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  abstract = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=device),
                          nn.meta.unbox(shapes['params']))
  return cfg, checkpoint.load_params(ckpt, abstract)


# --------------------------------------------------------------------------- CLI


def _parse_args(argv):
  p = argparse.ArgumentParser(prog='python -m lm.generate', description=__doc__.split('\n')[0])
  p.add_argument('--checkpoint', required=True,
                 help='an lm checkpoint directory, or an lm.convert output directory')
  p.add_argument('--prompt', action='append', default=[], help='repeat for a batch')
  p.add_argument('--max_new_tokens', type=int, default=32)
  p.add_argument('--temperature', type=float, default=0.0)
  p.add_argument('--top_k', type=int, default=0)
  p.add_argument('--top_p', type=float, default=1.0)
  p.add_argument('--seed', type=int, default=0)
  p.add_argument('--stop', action='append', default=[],
                 help='extra stop token: a piece (e.g. "<end_of_turn>") or an integer id; '
                      'the tokenizer\'s eos is always one')
  p.add_argument('--no_bos', action='store_true', help='do not prepend the tokenizer\'s bos')
  p.add_argument('--repeat', type=int, default=1, help='run N times; later runs are warm')
  return p.parse_args(argv)


def _stop_ids(tok, stops: Sequence[str]) -> list[int]:
  """eos plus each --stop (an id, or a piece of either tokenizer backend)."""
  ids = [tok.eos_id] if tok.eos_id >= 0 else []
  piece_ids = {tok.id_to_piece(i): i for i in range(tok.vocab_size)} if stops else {}
  for s in stops:
    if s.lstrip('-').isdigit():
      ids.append(int(s))
    elif s in piece_ids:
      ids.append(piece_ids[s])
    else:
      raise SystemExit(f'--stop={s!r}: not a piece of the tokenizer')
  return ids


def main(argv=None) -> int:
  from lm import tokenizer as lm_tokenizer

  args = _parse_args(sys.argv[1:] if argv is None else argv)
  if not args.prompt:
    raise SystemExit('give at least one --prompt')
  from lm.checkpoint import CheckpointError
  from lm.convert import ConvertError
  try:
    cfg, params = load_checkpoint(args.checkpoint)
  except (CheckpointError, ConvertError) as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  if not cfg.tokenizer.path:
    raise SystemExit(f'{args.checkpoint}: its config has no tokenizer.path')
  tok = lm_tokenizer.Tokenizer.load(cfg.tokenizer.path)  # SentencePiece or tokenizer.json.
  bos = [] if args.no_bos or tok.bos_id < 0 else [tok.bos_id]
  prompts = [bos + tok.encode(p) for p in args.prompt]
  finetune = cfg.finetune if cfg.finetune.lora_rank > 0 else None
  gen = Generator(cfg.model, params, finetune)
  sampling = Sampling(args.temperature, args.top_k, args.top_p)
  pad = tok.pad_id
  for run in range(args.repeat):
    outs, t = gen.generate(prompts, args.max_new_tokens, sampling, _stop_ids(tok, args.stop),
                           args.seed, pad)
    for prompt, out in zip(args.prompt, outs):
      print(f'--- {prompt!r}\n{prompt}{tok.decode(out)}')
    total = t['prefill_s'] + t['decode_s']
    print(f"[run {run + 1}] prompt {t['prompt_tokens']} tokens in {t['prefill_s']:.2f}s; "
          f"{t['new_tokens']} new tokens in {t['decode_s']:.2f}s "
          f"({t['new_tokens'] / max(t['decode_s'], 1e-9):.1f} tokens/s decode, "
          f"{t['new_tokens'] / max(total, 1e-9):.1f} tokens/s overall"
          + (', includes compilation' if run == 0 else '') + ')')
  return 0


if __name__ == '__main__':
  sys.exit(main())
