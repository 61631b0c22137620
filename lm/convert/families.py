"""Hugging Face families as lm config options: config.json <-> lm model config, tensor tables.

One lm model expresses every family; a family is a set of options:

| family  | model_type          | options                                                        |
| ------- | ------------------- | -------------------------------------------------------------- |
| llama   | llama               | (Llama 2/3/3.1+); attention_bias -> qkv_bias + o_bias          |
| mistral | mistral             | sliding_window on every layer (optional)                       |
| qwen2   | qwen2 (Qwen2, 2.5)  | qkv_bias; use_sliding_window on every layer (optional)         |
| qwen3   | qwen3               | qk_norm (plain RMSNorm over head_dim), explicit head_dim       |
| gemma3  | gemma3_text, gemma3 | (1+w) norms, post norms, qk_norm, scaled embeddings, 5:1 local |

`model.hf_model_type` records the source's model_type so an export writes the same family back;
when it is empty the family is inferred from the options.
"""

from __future__ import annotations

import math
from typing import Any

import ml_collections

from lm import config as lm_config
from lm import model as lm_model
from lm.convert import ConvertError

CONFIG_JSON = 'config.json'

FAMILY_OF_MODEL_TYPE = {'llama': 'llama', 'mistral': 'mistral', 'qwen2': 'qwen2',
                        'qwen3': 'qwen3', 'gemma3_text': 'gemma3', 'gemma3': 'gemma3'}
ARCHITECTURE = {'llama': ('llama', 'LlamaForCausalLM'),
                'mistral': ('mistral', 'MistralForCausalLM'),
                'qwen2': ('qwen2', 'Qwen2ForCausalLM'),
                'qwen3': ('qwen3', 'Qwen3ForCausalLM'),
                'gemma3': ('gemma3_text', 'Gemma3ForCausalLM')}
LLAMA_LIKE = ('llama', 'mistral', 'qwen2', 'qwen3')

# --------------------------------------------------------------------------- tensor tables
# Per-layer tensor name (after `model.layers.{i}.`) -> (lm path after `layers_{i}/`, layout).

_ATTENTION = {
    'input_layernorm.weight': ('pre_attn_norm/scale', 'same'),
    'self_attn.q_proj.weight': ('attn/q/kernel', 'in_heads'),
    'self_attn.k_proj.weight': ('attn/k/kernel', 'in_heads'),
    'self_attn.v_proj.weight': ('attn/v/kernel', 'in_heads'),
    'self_attn.o_proj.weight': ('attn/o/kernel', 'out_heads'),
    'mlp.gate_proj.weight': ('mlp/wi_0/kernel', 'linear'),
    'mlp.up_proj.weight': ('mlp/wi_1/kernel', 'linear'),
    'mlp.down_proj.weight': ('mlp/wo/kernel', 'linear'),
}
_QKV_BIAS = {f'self_attn.{x}_proj.bias': (f'attn/{x}/bias', 'flat') for x in 'qkv'}
_O_BIAS = {'self_attn.o_proj.bias': ('attn/o/bias', 'same')}
_QK_NORM = {'self_attn.q_norm.weight': ('attn/q_norm/scale', 'same'),
            'self_attn.k_norm.weight': ('attn/k_norm/scale', 'same')}
_LLAMA_MLP_NORM = {'post_attention_layernorm.weight': ('pre_mlp_norm/scale', 'same')}
_GEMMA_NORMS = {
    # Gemma's post_attention_layernorm normalises the attention *output*; Llama's is pre-MLP.
    'post_attention_layernorm.weight': ('post_attn_norm/scale', 'same'),
    'pre_feedforward_layernorm.weight': ('pre_mlp_norm/scale', 'same'),
    'post_feedforward_layernorm.weight': ('post_mlp_norm/scale', 'same'),
}
GLOBAL_TENSORS = {
    'model.embed_tokens.weight': ('embed/embedding', 'same'),
    'model.norm.weight': ('final_norm/scale', 'same'),
    'lm_head.weight': ('lm_head/kernel', 'linear'),
}


def layer_tensors(family: str, m: ml_collections.ConfigDict) -> dict[str, tuple[str, str]]:
  table = {**_ATTENTION, **(_GEMMA_NORMS if family == 'gemma3' else _LLAMA_MLP_NORM)}
  if m.qkv_bias:
    table.update(_QKV_BIAS)
  if m.o_bias:
    table.update(_O_BIAS)
  if m.qk_norm:
    table.update(_QK_NORM)
  return table


def tensor_table(family: str, m: ml_collections.ConfigDict) -> dict[str, tuple[str, str]]:
  """HF tensor name -> (lm parameter path, layout) for every parameter of the model."""
  table = {}
  per_layer = layer_tensors(family, m)
  for i in range(m.n_layers):
    for name, (path, layout) in per_layer.items():
      table[f'model.layers.{i}.{name}'] = (f'layers_{i}/{path}', layout)
  for name, (path, layout) in GLOBAL_TENSORS.items():
    if not (m.tie_embeddings and path.startswith('lm_head')):
      table[name] = (path, layout)
  return table


# --------------------------------------------------------------------------- config.json -> lm


def family_of(hf: dict[str, Any], where: str) -> str:
  model_type = hf.get('model_type')
  if model_type not in FAMILY_OF_MODEL_TYPE:
    raise ConvertError(
        f"{where}: unsupported architecture model_type={model_type!r} "
        f"(supported: {sorted(FAMILY_OF_MODEL_TYPE)})")
  return FAMILY_OF_MODEL_TYPE[model_type]


def _rope_params(hf: dict[str, Any], family: str) -> tuple[dict, dict | None]:
  """(global, local) RoPE parameter dicts from either transformers 5's `rope_parameters` or the
  older `rope_theta` / `rope_scaling` / `rope_local_base_freq` keys."""
  rp = hf.get('rope_parameters')
  if family == 'gemma3':
    if rp and 'full_attention' in rp:
      return dict(rp['full_attention']), dict(rp.get('sliding_attention') or {})
    glob = {'rope_theta': hf.get('rope_theta', 1_000_000.0), **(hf.get('rope_scaling') or {})}
    return glob, {'rope_theta': hf.get('rope_local_base_freq', 10_000.0)}
  if rp:
    return dict(rp), None
  return {'rope_theta': hf.get('rope_theta', 10_000.0), **(hf.get('rope_scaling') or {})}, None


def _set_rope_scaling(m: ml_collections.ConfigDict, rope: dict, where: str) -> None:
  kind = rope.get('rope_type', rope.get('type', 'default'))
  if kind == 'default':
    return
  if kind == 'linear':
    m.rope_scaling, m.rope_scaling_factor = 'linear', float(rope['factor'])
  elif kind == 'llama3':
    m.rope_scaling = 'llama3'
    m.rope_scaling_factor = float(rope['factor'])
    m.rope_low_freq_factor = float(rope['low_freq_factor'])
    m.rope_high_freq_factor = float(rope['high_freq_factor'])
    m.rope_original_max_len = int(rope['original_max_position_embeddings'])
  else:
    raise ConvertError(f"{where}: unsupported RoPE scaling rope_type={kind!r} "
                       "(supported: default, linear, llama3)")


def global_every_of(layer_types: list[str], where: str) -> int:
  """lm's `global_every` for a layer_types list, which must follow that period (0: all local)."""
  full = [i for i, t in enumerate(layer_types) if t == 'full_attention']
  if not full:
    return 0
  every = full[0] + 1
  want = ['full_attention' if (i + 1) % every == 0 else 'sliding_attention'
          for i in range(len(layer_types))]
  if layer_types != want:
    raise ConvertError(f'{where}: layer_types {layer_types} is not periodic '
                       f'(every {every}th layer global, or all sliding); lm cannot express it')
  return every


def model_config_from_hf(hf: dict[str, Any], where: str = CONFIG_JSON) -> ml_collections.ConfigDict:
  """lm's model config for a Hugging Face config.json dict of a supported family."""
  family = family_of(hf, where)
  m = lm_config.model_config()
  try:
    _common(hf, family, where, m)
    if family == 'gemma3':
      _gemma3(hf, where, m)
    else:
      _llama_like(hf, family, where, m)
  except KeyError as e:
    raise ConvertError(f'{where}: missing key {e.args[0]!r} for model_type '
                       f"{hf.get('model_type')!r}") from None
  m.hf_model_type = ARCHITECTURE[family][0]
  return m


def _common(hf, family, where, m):
  if hf.get('mlp_bias'):
    raise ConvertError(f'{where}: mlp_bias=true is not supported (lm has no MLP biases)')
  m.vocab_size = int(hf['vocab_size'])
  m.d_model = int(hf['hidden_size'])
  m.n_layers = int(hf['num_hidden_layers'])
  m.n_heads = int(hf['num_attention_heads'])
  m.n_kv_heads = int(hf.get('num_key_value_heads') or m.n_heads)
  m.head_dim = int(hf.get('head_dim') or m.d_model // m.n_heads)
  m.mlp_dim = int(hf['intermediate_size'])
  m.norm_eps = float(hf.get('rms_norm_eps', 1e-6))
  glob, local = _rope_params(hf, family)
  m.rope_base = float(glob.get('rope_theta', 10_000.0))
  _set_rope_scaling(m, glob, where)
  return local


def _layer_types(hf, family, n_layers) -> list[str] | None:
  """The per-layer attention kinds, as transformers derives them for this family."""
  if hf.get('layer_types'):
    return list(hf['layer_types'])
  window = hf.get('sliding_window')
  if family in ('qwen2', 'qwen3'):
    if not (hf.get('use_sliding_window') and window):
      return None
    first = int(hf.get('max_window_layers', 28))
    return ['sliding_attention' if i >= first else 'full_attention' for i in range(n_layers)]
  if family == 'mistral' and window:
    return ['sliding_attention'] * n_layers
  return None


def _set_window(m, window, layer_types, where):
  if layer_types is None or 'sliding_attention' not in layer_types or not window:
    return
  if len(layer_types) != m.n_layers:
    raise ConvertError(f'{where}: layer_types has {len(layer_types)} entries for '
                       f'num_hidden_layers={m.n_layers}')
  m.sliding_window = int(window)
  m.global_every = global_every_of(list(layer_types), where)


def _llama_like(hf, family, where, m):
  act = hf.get('hidden_act', 'silu')
  if act != 'silu':
    raise ConvertError(f"{where}: hidden_act={act!r} is not supported for {family} (only 'silu')")
  m.mlp_activation = 'silu'
  m.tie_embeddings = bool(hf.get('tie_word_embeddings', False))
  bias = bool(hf.get('attention_bias', False))
  m.qkv_bias = bias or family == 'qwen2'  # Qwen2 always has q/k/v biases and no o bias.
  m.o_bias = bias and family != 'qwen2'
  m.qk_norm = family == 'qwen3'
  _set_window(m, hf.get('sliding_window'), _layer_types(hf, family, m.n_layers), where)


def _gemma3(hf, where, m):
  act = hf.get('hidden_activation') or hf.get('hidden_act', 'gelu_pytorch_tanh')
  if act not in ('gelu_pytorch_tanh', 'gelu_tanh'):
    raise ConvertError(f'{where}: hidden_activation={act!r} is not supported for gemma3')
  if hf.get('use_bidirectional_attention'):
    raise ConvertError(f'{where}: use_bidirectional_attention=true is not supported (lm is causal)')
  if hf.get('attention_bias'):
    raise ConvertError(f'{where}: attention_bias=true is not supported for gemma3')
  _, local = _rope_params(hf, 'gemma3')
  m.mlp_activation = 'gelu_tanh'
  m.norm_plus_one = m.post_attn_norm = m.post_mlp_norm = m.qk_norm = True
  m.scale_embeddings = True
  m.tie_embeddings = bool(hf.get('tie_word_embeddings', True))
  m.attn_scale = float(hf.get('query_pre_attn_scalar', 256)) ** -0.5
  m.final_logit_softcap = float(hf.get('final_logit_softcapping') or 0.0)
  if hf.get('_multimodal'):
    # transformers' Gemma3ForConditionalGeneration never soft-caps its logits (releases set
    # the cap null anyway); the reference implementation decides.
    m.final_logit_softcap = 0.0
  # attn_logit_softcapping is a Gemma 2 key: Gemma 3 releases set it null and transformers'
  # Gemma3Attention never applies it, so neither do we (matching the reference implementation).
  m.attn_logit_softcap = 0.0
  layer_types = hf.get('layer_types') or [
      'sliding_attention' if (i + 1) % int(hf.get('sliding_window_pattern', 6)) else 'full_attention'
      for i in range(m.n_layers)]
  _set_window(m, hf.get('sliding_window'), layer_types, where)
  if m.sliding_window:
    m.rope_local_base = float((local or {}).get('rope_theta', 10_000.0))
    if (local or {}).get('rope_type', 'default') != 'default':
      raise ConvertError(f'{where}: RoPE scaling on sliding-window layers is not supported')


# --------------------------------------------------------------------------- lm -> config.json


def head_dim(m) -> int:
  return m.head_dim or m.d_model // m.n_heads


def _problems(m, family: str) -> list[str]:
  """Why model config m is not exactly the HF family (empty: it is)."""
  want = dict(norm_plus_one=False, post_attn_norm=False, post_mlp_norm=False,
              scale_embeddings=False, mlp_activation='silu', final_logit_softcap=0.0,
              attn_logit_softcap=0.0, qk_norm=family == 'qwen3')
  if family == 'gemma3':
    want = dict(norm_plus_one=True, post_attn_norm=True, post_mlp_norm=True, qk_norm=True,
                scale_embeddings=True, mlp_activation='gelu_tanh', attn_logit_softcap=0.0,
                qkv_bias=False, o_bias=False)
  elif family == 'qwen2':
    want.update(qkv_bias=True, o_bias=False)
  elif family == 'mistral':
    want.update(qkv_bias=False, o_bias=False)
  problems = [f'{k}={m[k]!r} (needs {v!r})' for k, v in want.items() if m[k] != v]
  if family in ('llama', 'qwen3') and m.qkv_bias != m.o_bias:
    problems.append(f'qkv_bias={m.qkv_bias} with o_bias={m.o_bias} (attention_bias sets both)')
  if family == 'llama' and m.sliding_window:
    problems.append(f'sliding_window={m.sliding_window} (Llama has none; use mistral)')
  if family in LLAMA_LIKE:
    if m.sliding_window and m.global_every:
      problems.append(f'global_every={m.global_every} (windows on every layer only)')
    if m.attn_scale and not math.isclose(m.attn_scale, head_dim(m) ** -0.5):
      problems.append(f'attn_scale={m.attn_scale} (always 1/sqrt(head_dim))')
  elif m.rope_scaling == 'llama3':
    problems.append("rope_scaling='llama3'")
  return problems


def family_of_lm(m: ml_collections.ConfigDict) -> str:
  """The HF family an lm model config is exactly equivalent to (the recorded one first)."""
  recorded = FAMILY_OF_MODEL_TYPE.get(m.hf_model_type) if m.hf_model_type else None
  if recorded:
    problems = _problems(m, recorded)
    if problems:
      raise ConvertError(f'model.hf_model_type={m.hf_model_type!r}, but the model config is not '
                         f"{recorded}: {'; '.join(problems)}")
    return recorded
  for family in ('gemma3', 'qwen3', 'qwen2', 'mistral', 'llama'):
    if not _problems(m, family):
      return family
  raise ConvertError(
      'model config matches no Hugging Face family lm exports (supported: '
      f"{sorted(ARCHITECTURE)}); as llama it differs in: {'; '.join(_problems(m, 'llama'))}")


def hf_config_from_lm(m: ml_collections.ConfigDict, special_ids: dict | None = None) -> dict[str, Any]:
  """config.json for an lm model config, in transformers 5's keys plus the older rope keys."""
  family = family_of_lm(m)
  model_type, arch = ARCHITECTURE[family]
  hf = {
      'architectures': [arch], 'model_type': model_type, 'vocab_size': m.vocab_size,
      'hidden_size': m.d_model, 'intermediate_size': m.mlp_dim, 'num_hidden_layers': m.n_layers,
      'num_attention_heads': m.n_heads, 'num_key_value_heads': m.n_kv_heads,
      'head_dim': head_dim(m), 'rms_norm_eps': m.norm_eps, 'tie_word_embeddings': m.tie_embeddings,
      'torch_dtype': 'float32', 'dtype': 'float32',
  }
  hf.update(special_ids or {})
  glob = {'rope_type': 'default', 'rope_theta': m.rope_base}
  if m.rope_scaling == 'linear':
    glob.update(rope_type='linear', factor=m.rope_scaling_factor)
  elif m.rope_scaling == 'llama3':
    glob.update(rope_type='llama3', factor=m.rope_scaling_factor,
                low_freq_factor=m.rope_low_freq_factor, high_freq_factor=m.rope_high_freq_factor,
                original_max_position_embeddings=m.rope_original_max_len)
  legacy_scaling = ({k: v for k, v in glob.items() if k != 'rope_theta'}
                    if glob['rope_type'] != 'default' else None)
  if family in LLAMA_LIKE:
    hf.update(hidden_act='silu', rope_parameters=glob, rope_theta=m.rope_base,
              rope_scaling=legacy_scaling)
    window = m.sliding_window or None
    if family == 'llama':
      hf.update(attention_bias=m.o_bias, mlp_bias=False)
    elif family == 'mistral':
      hf.update(sliding_window=window)
    else:
      hf.update(use_sliding_window=bool(window), sliding_window=window, max_window_layers=0,
                layer_types=['sliding_attention' if window else 'full_attention'] * m.n_layers)
      if family == 'qwen3':
        hf.update(attention_bias=m.o_bias)
    return hf
  local_base = m.rope_local_base or m.rope_base
  layer_types = [('full_attention' if lm_model.layer_is_global(m, i) else 'sliding_attention')
                 for i in range(m.n_layers)]
  hf.update(
      hidden_activation='gelu_pytorch_tanh', query_pre_attn_scalar=_query_pre_attn_scalar(m),
      final_logit_softcapping=m.final_logit_softcap or None, attention_bias=False,
      sliding_window=m.sliding_window or None, layer_types=layer_types,
      sliding_window_pattern=m.global_every or m.n_layers + 1,
      rope_parameters={'full_attention': glob,
                       'sliding_attention': {'rope_type': 'default', 'rope_theta': local_base}},
      rope_theta=m.rope_base, rope_local_base_freq=local_base, rope_scaling=legacy_scaling)
  return hf


def _query_pre_attn_scalar(m) -> float:
  scale = m.attn_scale or head_dim(m) ** -0.5
  scalar = scale ** -2
  return int(round(scalar)) if math.isclose(scalar, round(scalar), rel_tol=1e-6) else scalar
