"""Every Hugging Face family lm imports and exports: logits parity with transformers (float32,
a sequence longer than the attention query chunk), lm -> HF -> lm round trips, bf16 streaming
conversion with tokenizer.json, LoRA-merged export, and the errors for what lm cannot express.
"""

import json

import numpy as np
import pytest

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from hf_helpers import (build_llama3_tokenizer, hf_model, lm_logits, random_lm_params,  # noqa: E402
                        random_tokens, torch_logits)
from lm import model as lm_model  # noqa: E402
from lm.convert import ConvertError  # noqa: E402
from lm.convert import hf as chf  # noqa: E402

TOL = 1e-4
CHUNK, T = 16, 40  # The query chunk lm attends in, and a test sequence longer than it.
BASE = dict(vocab_size=320, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5,
            max_position_embeddings=128)
FAMILIES = {
    'llama3': ('llama', dict(BASE, rope_theta=500_000.0, rope_scaling={
        'rope_type': 'llama3', 'factor': 8.0, 'low_freq_factor': 1.0, 'high_freq_factor': 4.0,
        'original_max_position_embeddings': 16})),
    'llama-attention-bias': ('llama', dict(BASE, attention_bias=True, tie_word_embeddings=True)),
    'mistral-window': ('mistral', dict(BASE, sliding_window=12, head_dim=32)),
    'mistral-no-window': ('mistral', dict(BASE, sliding_window=None)),
    'qwen2': ('qwen2', dict(BASE, tie_word_embeddings=True, rope_theta=1_000_000.0)),
    'qwen2-window': ('qwen2', dict(BASE, use_sliding_window=True, sliding_window=12,
                                   max_window_layers=0)),
    'qwen3': ('qwen3', dict(BASE, head_dim=24, tie_word_embeddings=True)),
    'qwen3-attention-bias': ('qwen3', dict(BASE, head_dim=32, attention_bias=True)),
    'gemma3': ('gemma3_text', dict(BASE, head_dim=16, sliding_window=12, sliding_window_pattern=2,
                                   query_pre_attn_scalar=24, final_logit_softcapping=3.0)),
}
# One configuration per family for the slower end-to-end tests.
PER_FAMILY = ['llama-attention-bias', 'mistral-window', 'qwen2', 'qwen3', 'gemma3']


def _chunked(m):
  m.attn_query_chunk = CHUNK
  return m


@pytest.mark.parametrize('name', list(FAMILIES))
def test_logits_match_transformers(tmp_path, name):
  model_type, cfg = FAMILIES[name]
  model = hf_model(model_type, **cfg)
  model.save_pretrained(tmp_path)
  params, m = chf.load_hf_params(tmp_path)
  assert m.hf_model_type == model_type
  tokens = random_tokens(m.vocab_size, (2, T))
  diff = np.abs(lm_logits(params, _chunked(m), tokens) - torch_logits(model, tokens)).max()
  assert diff <= TOL, diff


def test_family_options_map_to_the_one_model():
  cfg = lambda name: json.loads(hf_model(*[FAMILIES[name][0]], **FAMILIES[name][1]).config.to_json_string())
  qwen2 = chf.model_config_from_hf(cfg('qwen2'))
  assert (qwen2.qkv_bias, qwen2.o_bias, qwen2.qk_norm, qwen2.sliding_window) == (True, False, False, 0)
  qwen3 = chf.model_config_from_hf(cfg('qwen3'))
  assert (qwen3.qk_norm, qwen3.head_dim, qwen3.norm_plus_one, qwen3.qkv_bias) == (True, 24, False, False)
  mistral = chf.model_config_from_hf(cfg('mistral-window'))
  assert (mistral.sliding_window, mistral.global_every, mistral.head_dim) == (12, 0, 32)
  llama = chf.model_config_from_hf(cfg('llama-attention-bias'))
  assert (llama.qkv_bias, llama.o_bias) == (True, True)


def _full_config(m):
  from lm import config as lm_config
  cfg = lm_config.base_config()
  cfg.model = m
  return cfg


@pytest.mark.parametrize('name', list(FAMILIES))
def test_lm_to_hf_to_lm_is_exact(tmp_path, name):
  model_type, cfg = FAMILIES[name]
  hf_model(model_type, **cfg).save_pretrained(tmp_path / 'src')
  _, m = chf.load_hf_params(tmp_path / 'src')
  params = random_lm_params(m)
  chf.export_params(params, _full_config(m), tmp_path / 'hf', dtype='float32')
  assert json.loads((tmp_path / 'hf' / 'config.json').read_text())['model_type'] == model_type
  back, m2 = chf.load_hf_params(tmp_path / 'hf')
  assert m2.to_dict() == m.to_dict()
  assert set(back) == set(params)
  for k in params:
    np.testing.assert_array_equal(back[k], params[k], err_msg=k)
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / 'hf',
                                                               attn_implementation='eager').eval()
  tokens = random_tokens(m.vocab_size, (2, T))
  assert np.abs(lm_logits(params, _chunked(m), tokens) - torch_logits(reloaded, tokens)).max() <= TOL


@pytest.mark.parametrize('name', PER_FAMILY)
def test_bf16_convert_and_export_load_in_transformers(tmp_path, name):
  """bf16 in -> bf16 checkpoint -> bf16 export, bit for bit; AutoModel and AutoTokenizer load it."""
  from lm import checkpoint, generate
  from lm.convert.safetensors_io import SafetensorsDir
  model_type, cfg = FAMILIES[name]
  src = tmp_path / 'src'
  # Special ids as build_llama3_tokenizer assigns them (bos first, <|eot_id|> fifth).
  model = hf_model(model_type, **cfg, bos_token_id=0, eos_token_id=4, pad_token_id=None)
  model.to(torch.bfloat16).save_pretrained(src, max_shard_size='40KB')
  assert (src / 'model.safetensors.index.json').exists()
  build_llama3_tokenizer(src)
  lm_cfg = chf.convert_hf(src, tmp_path / 'lm', log=lambda *_: None)
  assert lm_cfg.tokenizer.path == str(tmp_path / 'lm' / 'tokenizer.json')
  assert lm_cfg.model.param_dtype == 'bfloat16'
  assert {d for _, d in checkpoint.params_metadata(tmp_path / 'lm' / 'checkpoint').values()} == {
      np.dtype(jnp.bfloat16)}
  chf.export_checkpoint(tmp_path / 'lm', tmp_path / 'hf', log=lambda *_: None)
  before, after = SafetensorsDir(src), SafetensorsDir(tmp_path / 'hf')
  expected = {n for n in before.names() if not (lm_cfg.model.tie_embeddings and n == 'lm_head.weight')}
  assert set(after.names()) == expected
  for name_ in expected:
    assert after.dtype(name_) == np.dtype(jnp.bfloat16)
    np.testing.assert_array_equal(after.read(name_).view(np.uint16), before.read(name_).view(np.uint16))
  # transformers loads both the model and the tokenizer of the export.
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(
      tmp_path / 'hf', dtype=torch.float32, attn_implementation='eager').eval()
  hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / 'hf')
  _, params = generate.load_checkpoint(tmp_path / 'lm')
  text = 'def add(a, b):\n    return a + b  # 🙂'
  ids = [hf_tok.bos_token_id] + hf_tok(text, add_special_tokens=False)['input_ids']
  assert hf_tok(text)['input_ids'] == ids
  m = _chunked(lm_cfg.model)
  ours = np.asarray(jax.jit(lm_model.build_model(m).apply)({'params': params}, jnp.asarray([ids])))
  assert np.abs(ours - torch_logits(reloaded, [ids])).max() <= TOL
  generation = json.loads((tmp_path / 'hf' / 'generation_config.json').read_text())
  assert generation['bos_token_id'] == hf_tok.bos_token_id
  assert generation['eos_token_id'] == hf_tok.convert_tokens_to_ids('<|eot_id|>')


@pytest.mark.parametrize('scan', [False, True], ids=['layers', 'scanned'])
def test_lora_checkpoint_exports_merged(tmp_path, scan):
  """A LoRA fine-tune's checkpoint (adapters beside frozen biased kernels) exports merged."""
  from lm import checkpoint
  model_type, cfg_ = FAMILIES['qwen2']
  hf_model(model_type, **cfg_).save_pretrained(tmp_path / 'src')
  _, m = chf.load_hf_params(tmp_path / 'src')
  cfg = _full_config(m)
  cfg.finetune.lora_rank, cfg.finetune.lora_alpha = 2, 4.0
  cfg.finetune.lora_targets = ('.*attn/(q|k|v|o)/kernel', '.*mlp/wo/kernel')
  params = random_lm_params(m, finetune=cfg.finetune)
  tokens = random_tokens(m.vocab_size, (2, T))
  with_lora = np.asarray(jax.jit(lm_model.build_model(_chunked(m), cfg.finetune).apply)(
      {'params': lm_model.unflatten_params(params)}, jnp.asarray(tokens)))
  tree = lm_model.unflatten_params({k: jnp.asarray(v) for k, v in params.items()})
  if scan:
    cfg.model.scan_layers = True
    tree = lm_model.stack_layers(tree, m.n_layers)
  checkpoint.save_params(tmp_path / 'ckpt', tree, cfg)
  chf.export_checkpoint(tmp_path / 'ckpt', tmp_path / 'hf', dtype='float32', log=lambda *_: None)
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / 'hf',
                                                               attn_implementation='eager').eval()
  assert np.abs(with_lora - torch_logits(reloaded, tokens)).max() <= TOL


# --------------------------------------------------------------------------- bad input


def test_what_lm_cannot_express_is_named():
  qwen2 = json.loads(transformers.Qwen2Config(**FAMILIES['qwen2-window'][1]).to_json_string())
  # Qwen2's first max_window_layers layers are global and the rest local: not periodic.
  with pytest.raises(ConvertError, match='not periodic'):
    chf.model_config_from_hf({**qwen2, 'max_window_layers': 1, 'layer_types': None})
  with pytest.raises(ConvertError, match='mlp_bias'):
    chf.model_config_from_hf({**qwen2, 'model_type': 'llama', 'mlp_bias': True})
  with pytest.raises(ConvertError, match=r"model_type='phi3' \(supported: \['gemma3', "
                     r"'gemma3_text', 'llama', 'mistral', 'qwen2', 'qwen3'\]\)"):
    chf.model_config_from_hf({**qwen2, 'model_type': 'phi3'})


def test_export_names_the_option_a_family_lacks(tmp_path):
  _, m = FAMILIES['qwen2']
  m = chf.model_config_from_hf(json.loads(transformers.Qwen2Config(**m).to_json_string()))
  m.o_bias = True  # Qwen2 has no o_proj bias.
  with pytest.raises(ConvertError, match=r"hf_model_type='qwen2'.*o_bias=True \(needs False\)"):
    chf.export_params(random_lm_params(m), _full_config(m), tmp_path)


def test_tokenizer_json_larger_than_the_embedding_is_one_error(tmp_path):
  hf_model('qwen2', **dict(FAMILIES['qwen2'][1], vocab_size=96)).save_pretrained(tmp_path / 'src')
  pieces = build_llama3_tokenizer(tmp_path / 'src')
  with pytest.raises(ConvertError, match=f'tokenizer has {pieces} pieces but the model has 96 '
                     'embedding rows'):
    chf.convert_hf(tmp_path / 'src', tmp_path / 'out', log=lambda *_: None)


# --------------------------------------------------------------------------- fine-tune end to end


def test_lora_finetune_of_a_converted_model_exports_to_transformers(tmp_path):
  """Qwen2 (bf16, tokenizer.json) -> lm -> LoRA fine-tune with configs/finetune_hf.py -> merged
  export that transformers loads with lm's logits."""
  import importlib.util
  import pathlib
  from lm import finetune, generate
  from lm import model as lm_model_
  spec = importlib.util.spec_from_file_location(
      'finetune_hf', pathlib.Path(__file__).parents[1] / 'configs' / 'finetune_hf.py')
  config_file = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(config_file)
  model_type, hf_cfg = FAMILIES['qwen2']
  src = tmp_path / 'src'
  hf_model(model_type, **hf_cfg, bos_token_id=0, eos_token_id=4).to(torch.bfloat16).save_pretrained(src)
  build_llama3_tokenizer(src)
  chf.convert_hf(src, tmp_path / 'lm', log=lambda *_: None)
  cfg = config_file.get_config()
  cfg.finetune.restore_from = str(tmp_path / 'lm')
  cfg.data.update(seq_len=32, batch_size=8)
  cfg.optim.lr = 1e-2
  cfg.train.update(steps=2, eval_every=2, eval_batches=1, log_every=1, checkpoint_every=2,
                   sample_tokens=0)
  summary = finetune.finetune(cfg, tmp_path / 'ft')
  merged = summary['report']['merged_checkpoint']
  chf.export_checkpoint(merged, tmp_path / 'hf', dtype='float32', log=lambda *_: None)
  merged_cfg, params = generate.load_checkpoint(merged)
  _, base = generate.load_checkpoint(tmp_path / 'lm')
  flat, base_flat = lm_model_.flatten_params(params), lm_model_.flatten_params(base)
  assert not np.allclose(np.asarray(flat['layers_0/attn/q/kernel'], np.float32),
                         np.asarray(base_flat['layers_0/attn/q/kernel'], np.float32))
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / 'hf',
                                                               attn_implementation='eager').eval()
  assert transformers.AutoTokenizer.from_pretrained(tmp_path / 'hf').eos_token == '<|eot_id|>'
  tokens = random_tokens(merged_cfg.model.vocab_size, (2, T))
  ours = np.asarray(jax.jit(lm_model_.build_model(_chunked(merged_cfg.model)).apply)(
      {'params': params}, jnp.asarray(tokens)))
  assert np.abs(ours - torch_logits(reloaded, tokens)).max() <= TOL


def test_generate_runs_a_converted_tokenizer_json_model(tmp_path, capsys):
  from lm import generate
  model_type, cfg = FAMILIES['qwen3']
  hf_model(model_type, **cfg, bos_token_id=0, eos_token_id=4).save_pretrained(tmp_path / 'src')
  build_llama3_tokenizer(tmp_path / 'src')
  chf.convert_hf(tmp_path / 'src', tmp_path / 'lm', log=lambda *_: None)
  assert generate.main(['--checkpoint', str(tmp_path / 'lm'), '--prompt', 'def add(a, b):',
                        '--max_new_tokens', '4', '--stop', '<|eot_id|>']) == 0
  assert "--- 'def add(a, b):'" in capsys.readouterr().out


def test_dtype_is_kept_unless_asked(tmp_path):
  hf_model('mistral', **FAMILIES['mistral-window'][1]).to(torch.bfloat16).save_pretrained(tmp_path)
  kept, m = chf.plan_hf_params(tmp_path)
  assert m.param_dtype == 'bfloat16' and {t.dtype for t in kept.values()} == {np.dtype(jnp.bfloat16)}
  asked, m = chf.plan_hf_params(tmp_path, dtype='float32')
  assert m.param_dtype == 'float32'
  x = asked['layers_0/attn/q/kernel'].load()
  assert x.dtype == np.float32
  np.testing.assert_array_equal(x, kept['layers_0/attn/q/kernel'].load().astype(np.float32))
  with pytest.raises(ConvertError, match="--dtype='int8'"):
    chf.plan_hf_params(tmp_path, dtype='int8')
