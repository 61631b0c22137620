"""lm.generate: KV-cache decoding equals decoding without a cache; sampling; stops; padding."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lm import config as lm_config
from lm import generate
from lm import model as lm_model
from helpers import random_params


def tiny_model_cfg(**overrides):
  m = lm_config.model_config()
  m.update(vocab_size=64, d_model=32, n_layers=3, n_heads=4, n_kv_heads=2, mlp_dim=64)
  m.update(overrides)
  return m


# Gemma-like: sliding window shorter than prompt + generation, qk-norm, soft-capping, GQA.
GEMMA_LIKE = dict(norm_plus_one=True, post_attn_norm=True, post_mlp_norm=True, qk_norm=True,
                  scale_embeddings=True, mlp_activation='gelu_tanh', sliding_window=5,
                  global_every=2, rope_local_base=1000.0, final_logit_softcap=5.0, head_dim=16)


def random_weights(m, seed=0):
  """Random weights larger than the init, so every layer matters to the argmax."""
  return random_params(lm_model.build_model(m), std=0.3, seed=seed)


PROMPTS = [[5, 9, 2, 33, 7, 1, 12], [40], [3, 3, 8]]
NEW = 10  # Every test decodes this many tokens for PROMPTS, so they share compiled functions.


@pytest.fixture(scope='module')
def llama_like():
  m = tiny_model_cfg()
  params = random_weights(m)
  return m, params, generate.Generator(m, params)


@pytest.mark.parametrize('overrides', [None, GEMMA_LIKE, dict(GEMMA_LIKE, scan_layers=True)],
                         ids=['llama-like', 'gemma-like', 'gemma-like-scan'])
def test_greedy_with_cache_equals_without(overrides, llama_like):
  if overrides is None:
    m, params, gen = llama_like
  else:
    m = tiny_model_cfg(**overrides)
    params = random_weights(tiny_model_cfg(**{**overrides, 'scan_layers': False}))
    gen = generate.Generator(m, lm_model.stack_layers(params, m.n_layers) if m.scan_layers else params)
  # Unequal lengths in one batch; each row must equal its own unpadded, uncached decoding.
  batched, _ = gen.generate(PROMPTS, NEW)
  ref_cfg = m.copy_and_resolve_references()
  ref_cfg.scan_layers = False
  assert batched == generate.greedy_reference(ref_cfg, params, PROMPTS, NEW)


def test_stop_tokens_cut_each_row(llama_like):
  _, _, gen = llama_like
  full, _ = gen.generate(PROMPTS, NEW)
  stop = full[0][3]
  cut, timing = gen.generate(PROMPTS, NEW, stop_ids=[stop])
  for f, c in zip(full, cut):
    want = f[:f.index(stop) + 1] if stop in f else f
    assert c == want
  assert timing['new_tokens'] == sum(len(c) for c in cut)


def test_sampling_filters():
  logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]]))
  rngs = jax.random.split(jax.random.PRNGKey(0), 200)
  draw = lambda s: np.asarray(jax.vmap(lambda r: generate.sample_logits(logits, r, s)[0])(rngs))
  assert int(generate.sample_logits(logits, rngs[0], generate.Sampling())[0]) == 0
  assert set(draw(generate.Sampling(temperature=1.0, top_k=1))) == {0}
  assert set(draw(generate.Sampling(temperature=1.0, top_k=2))) == {0, 1}
  # top_p=0.7: 0.5 alone is short of 0.7, so token 1 joins; 0.8 >= 0.7 stops there.
  assert set(draw(generate.Sampling(temperature=1.0, top_p=0.7))) == {0, 1}
  assert set(draw(generate.Sampling(temperature=1.0))) == {0, 1, 2, 3}
  assert set(draw(generate.Sampling(temperature=0.05))) == {0}


def test_sampled_generation_is_seeded(llama_like):
  _, _, gen = llama_like
  s = generate.Sampling(temperature=1.0, top_k=10, top_p=0.9)
  a, _ = gen.generate(PROMPTS, NEW, s, seed=1)
  b, _ = gen.generate(PROMPTS, NEW, s, seed=1)
  c, _ = gen.generate(PROMPTS, NEW, s, seed=2)
  assert a == b and a != c


def test_left_pad():
  tokens, positions, segments = generate.left_pad([[7, 8, 9], [5]], pad_id=0)
  np.testing.assert_array_equal(tokens, [[7, 8, 9], [0, 0, 5]])
  np.testing.assert_array_equal(positions, [[0, 1, 2], [0, 0, 0]])
  np.testing.assert_array_equal(segments, [[1, 1, 1], [0, 0, 1]])


def test_cli_decodes_prompts_and_prints_tokens_per_second(tmp_path, capsys):
  checkpoint = pytest.importorskip('lm.checkpoint')
  from lm.convert import spm
  pieces = ['<pad>', '<eos>', '<bos>', '<unk>'] + [f'<0x{i:02X}>' for i in range(256)]
  pieces += ['\u2581', 'a', 'b', '\u2581a', 'ab']
  types = [3, 3, 3, 2] + [6] * 256 + [1] * 5
  proto = spm.build_model_proto(pieces, [0.0] * len(pieces), types, unk_id=3, bos_id=2, eos_id=1,
                                pad_id=0, add_space_prefix=False)
  (tmp_path / 'tokenizer.model').write_bytes(proto)
  cfg = lm_config.base_config()
  cfg.model = tiny_model_cfg(vocab_size=len(pieces))
  cfg.tokenizer.path = str(tmp_path / 'tokenizer.model')
  checkpoint.save_params(tmp_path / 'ckpt', random_weights(cfg.model), cfg)
  assert generate.main([f'--checkpoint={tmp_path / "ckpt"}', '--prompt=ab a', '--prompt=b',
                        '--max_new_tokens=4', '--temperature=0.7', '--top_k=5']) == 0
  out = capsys.readouterr().out
  assert "--- 'ab a'" in out and "--- 'b'" in out and 'tokens/s decode' in out
