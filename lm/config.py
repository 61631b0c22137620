"""The base configuration: every key, its default and its meaning, documented once.

Config files in `configs/` start from `base_config()` and override only what differs
(nanoGPT style). `validate(cfg)` runs once at start-up and turns every user mistake
into one `ConfigError` that names the key.
"""

from __future__ import annotations

import difflib
import math

import ml_collections

from lm.errors import UserError

ConfigDict = ml_collections.ConfigDict


class ConfigError(UserError, ValueError):
  """A user-caused configuration problem; the message names the key."""


# One rules table maps logical axis names to mesh axes. Parameters use the plain names,
# activations the `act_*` names, so a mesh axis can shard a weight's `embed` dim (FSDP)
# without also being asked to shard the activations' embed dim, which holds the batch.
DEFAULT_RULES = (
    ('batch', ('data', 'fsdp')),
    ('vocab', 'tensor'),
    ('embed', 'fsdp'),
    ('mlp', 'tensor'),
    ('heads', 'tensor'),
    ('kv_heads', 'tensor'),
    ('head_dim', None),
    ('layers', None),
    ('norm', None),
    ('classes', None),
    ('lora_rank', None),
    ('act_batch', ('data', 'fsdp')),
    ('act_length', None),
    ('act_embed', None),
    ('act_heads', 'tensor'),
    ('act_kv_heads', 'tensor'),
    ('act_mlp', 'tensor'),
    ('act_vocab', 'tensor'),
)

MESH_AXES = ('data', 'fsdp', 'tensor')


def model_config() -> ConfigDict:
  """Decoder-only Transformer; options express Llama 2/3, Mistral, Qwen2/2.5/3 and Gemma 3 exactly."""
  m = ConfigDict()
  m.vocab_size = 0  # Rows of the embedding table; 0 = the tokenizer's vocabulary size.
  m.d_model = 128  # Width of the residual stream.
  m.n_layers = 2
  m.n_heads = 4  # Query heads.
  m.n_kv_heads = 4  # Key/value heads: = n_heads is MHA, 1 is MQA, in between GQA.
  m.head_dim = 0  # 0 means d_model // n_heads (Gemma sets it explicitly).
  m.mlp_dim = 512  # Hidden width of the gated MLP.
  m.mlp_activation = 'silu'  # 'silu' (SwiGLU, Llama) or 'gelu_tanh' (GeGLU, Gemma).
  m.norm_eps = 1e-6
  m.norm_plus_one = False  # Gemma's RMSNorm scales by (1 + w) with w initialised at 0.
  m.post_attn_norm = False  # Gemma 3: RMSNorm on the attention output before the residual add.
  m.post_mlp_norm = False  # Gemma 3: RMSNorm on the MLP output before the residual add.
  m.qk_norm = False  # Gemma 3, Qwen3: RMSNorm over head_dim on queries and keys (before RoPE).
  m.qkv_bias = False  # Qwen2/2.5 (and Llama attention_bias): biases on the q, k, v projections.
  m.o_bias = False  # Llama / Qwen3 attention_bias: a bias on the attention output projection.
  m.rope_base = 10_000.0  # RoPE base for global layers.
  m.rope_local_base = 0.0  # RoPE base for sliding-window layers; 0 means rope_base.
  m.rope_scaling = 'none'  # 'none', 'linear' (positions / factor) or 'llama3' (Llama 3.1+).
  m.rope_scaling_factor = 1.0
  m.rope_low_freq_factor = 1.0  # 'llama3' scaling only.
  m.rope_high_freq_factor = 4.0  # 'llama3' scaling only.
  m.rope_original_max_len = 8192  # 'llama3' scaling only.
  m.tie_embeddings = True  # Output projection is the transposed input embedding.
  m.scale_embeddings = False  # Gemma: multiply embeddings by sqrt(d_model).
  m.final_logit_softcap = 0.0  # 0 disables; else logits = c * tanh(logits / c).
  m.attn_logit_softcap = 0.0  # 0 disables; same cap applied to attention scores.
  m.sliding_window = 0  # 0 disables; else local layers attend to the last `sliding_window` tokens.
  m.global_every = 0  # With a window: layer i is global iff (i + 1) % global_every == 0; 0 = all local (Mistral).
  m.attn_scale = 0.0  # 0 means 1/sqrt(head_dim); Gemma uses query_pre_attn_scalar ** -0.5.
  m.attn_query_chunk = 128  # Queries attend in blocks of this size, skipping causally masked keys; 0 = one block.
  m.hf_model_type = ''  # Set by lm.convert: the Hugging Face model_type an export writes back ('' = inferred).
  m.attention = 'auto'  # Kernel (lm/attention.py): 'xla' (reference), 'splash' (TPU), 'cudnn' (GPU); 'auto' picks per platform.
  m.logits_chunk = 256  # The loss projects to the vocabulary this many positions at a time (never [B, T, V] at once); 0 = all.
  m.init_std = 0.02
  m.dtype = 'float32'  # Compute dtype of matmuls ('bfloat16' on accelerators).
  m.param_dtype = 'float32'
  m.scan_layers = False  # nn.scan over layers: one compiled layer, stacked params (layers/...).
  m.remat = 'none'  # 'none', 'full' (recompute the block) or 'save_matmuls' (keep dot outputs).
  m.num_classes = 0  # > 0 adds a classification head (fine-tuning task 'classify').
  return m


def mesh_config() -> ConfigDict:
  """Device mesh. Product of sizes (times dcn sizes) must equal the device count; -1 fills."""
  c = ConfigDict()
  c.data = 1
  c.fsdp = -1
  c.tensor = 1
  # Multi-slice (several TPU slices joined over the data-centre network): sizes across slices.
  c.dcn_data = 1
  c.dcn_fsdp = 1
  c.dcn_tensor = 1
  c.rules = DEFAULT_RULES  # Logical axis name -> mesh axis (or tuple of axes, or None).
  return c


def tokenizer_config() -> ConfigDict:
  c = ConfigDict()
  c.path = ''  # An existing SentencePiece .model; '' trains one into the workdir.
  c.model_type = 'unigram'  # 'unigram', 'bpe' or 'char'.
  c.vocab_size = 1024
  c.byte_fallback = True
  c.character_coverage = 0.9995
  c.max_train_docs = 20_000  # Documents sampled to train the tokenizer.
  c.max_sentence_length = 8192
  c.normalization = 'identity'  # SentencePiece rule: 'identity' keeps text byte-exact; 'nmt_nfkc' normalises.
  c.split_digits = False  # True splits numbers into single digits.
  return c


def data_config() -> ConfigDict:
  c = ConfigDict()
  c.source = 'builtin'  # 'builtin', 'text', 'jsonl', 'parquet', 'arrayrecord' or 'mixture'.
  c.builtin_subset = 'general'  # 'general' or a domain name from lm.corpus.DOMAINS.
  c.paths = ()  # Files or globs (etils.epath, so gs:// works) for non-builtin sources.
  c.text_field = 'text'  # JSONL/Parquet field holding the text.
  c.prompt_field = 'prompt'  # SFT task.
  c.completion_field = 'completion'  # SFT task.
  c.label_field = 'label'  # Classification task.
  c.messages_field = 'messages'  # Chat task: the [{"role", "content"}, ...] list (or its JSON string).
  c.chat_template = ''  # Chat task: '' the model's own template, else lm.chat.DEFAULT_TEMPLATE; 'required' the model's own or an error; 'default'; or a path (.jinja, tokenizer_config.json, or a directory).
  c.mixture = ()  # For source='mixture': tuple of (name, weight); names are builtin subsets or paths.
  c.train_fraction = 1.0  # Use only this share of the training documents (data-scaling studies).
  c.validation_share = 0.05  # Share of documents (by hash) held out for validation.
  c.validation_paths = ()  # Files or globs (any supported format) used as the validation split instead; then every document of the sources trains.
  c.seq_len = 128
  c.batch_size = 8  # Global batch, in rows of seq_len tokens.
  c.shuffle_seed = 0
  c.num_epochs = 0  # 0 repeats forever.
  c.on_error = 'raise'  # 'raise' or 'skip' (skipped records are counted and reported).
  c.dedup = True  # Exact de-duplication by content hash.
  c.near_dedup = False  # MinHash near-duplicate removal.
  c.near_dedup_threshold = 0.8
  c.min_chars = 32
  c.max_chars = 200_000
  c.max_nontext_fraction = 0.3  # Drop documents with more than this share of non-text characters.
  c.worker_count = 0  # grain worker processes (0 = in-process).
  c.builtin_kinds = ('docstrings', 'topics', 'source')  # Built-in corpus document kinds (lm.corpus.KINDS).
  c.text_unit = 'file'  # Text files: 'file' (one document each) or 'paragraph' (blank-line-separated blocks).
  c.prepared_dir = ''  # Token shards written by `python -m lm.data prepare`; '' tokenizes on the fly.
  c.prepare_shards = 4  # prepare cuts the input into at least this many units, each written as one shard per split.
  c.read_threads = 2  # Threads grain uses in-process to read and tokenize documents.
  c.prefetch_batches = 2  # Batches a background thread prepares ahead of the train step (0 = none).
  c.shard_count = 0  # Logical training-data shards (0 = the process count); any process count dividing it gives the same batches.
  c.read_chunk_bytes = 32 << 20  # Files stream in units of about this size (JSONL byte ranges); a unit is what one shard or prepare worker reads at a time.
  c.shuffle_window = 10_000  # Documents a streamed (unprepared) file source shuffles within; prepared shards shuffle globally.
  c.dedup_buckets = 64  # prepare: exact dedup sorts hashes in this many on-disk buckets (memory ~ 24 bytes x documents / buckets).
  c.near_dedup_max_docs = 2_000_000  # prepare: MinHash near-dedup keeps an in-memory index (~1 KB/document); larger corpora are refused.
  return c


def optim_config() -> ConfigDict:
  c = ConfigDict()
  c.lr = 3e-3
  c.schedule = 'cosine'  # 'cosine', 'linear' or 'constant' after warmup.
  c.warmup_steps = 50
  c.min_lr_ratio = 0.1  # End of cosine/linear decay, as a share of lr.
  c.b1 = 0.9
  c.b2 = 0.95
  c.eps = 1e-8
  c.weight_decay = 0.1
  c.no_decay = ('.*norm.*', '.*bias.*', '.*scale')  # Path regexes exempt from weight decay.
  c.grad_clip = 1.0  # Global-norm clip over trainable leaves; 0 disables.
  c.grad_accum = 1  # Micro-batches per optimizer step.
  c.lr_multipliers = ()  # Tuple of (path regex, multiplier); first match wins.
  return c


def train_config() -> ConfigDict:
  c = ConfigDict()
  c.steps = 200
  c.eval_every = 50
  c.eval_batches = 4
  c.log_every = 10
  c.checkpoint_every = 100
  c.keep = 3  # Keep the last K checkpoints...
  c.keep_period = 0  # ...and every M-th step forever (0 = none).
  c.async_checkpoint = True
  c.init_from = ''  # Checkpoint (dir or step dir) to warm-start params from.
  c.z_loss = 0.0  # Weight of log(Z)^2 to keep logits' normaliser near 1.
  c.nan_policy = 'skip'  # 'skip' (count and skip the update) or 'stop'.
  c.max_consecutive_nan = 5  # Under 'skip': stop after this many non-finite steps in a row.
  c.debug_nan_steps = ()  # Fault injection (tests): steps whose loss and gradients become NaN.
  c.sample_prompts = ('def ', 'The ', 'import ')
  c.sample_tokens = 48
  c.blocking_loop = False  # Wait for each step and read its metrics before the next (the old loop; for comparisons).
  c.stop_check_every = 10  # Several processes agree on a SIGTERM stop every this many steps (1 = every step, slower).
  c.peak_flops = 0.0  # Per-device peak FLOP/s for MFU; 0 = measure (CPU) or look up.
  return c


def finetune_config() -> ConfigDict:
  c = ConfigDict()
  c.restore_from = ''  # Workdir or checkpoint whose params are restored (params only).
  c.allow_new_params = ()  # Path regexes that may be missing from the checkpoint (e.g. a head).
  c.task = 'lm'  # 'lm' (domain adaptation), 'sft' (prompt->completion), 'classify' or 'chat' (messages; loss on assistant turns).
  c.freeze = ()  # Path regexes of frozen parameters.
  c.trainable = ()  # If set, only matching paths train (applied before `freeze`).
  c.lora_rank = 0  # > 0 enables LoRA on `lora_targets`; then only adapters train.
  c.lora_alpha = 16.0
  c.lora_dropout = 0.0
  c.lora_targets = ('.*attn/(q|k|v|o)/kernel',)
  c.task_data = ''  # Build task data from the built-in corpus: 'docstring_sft' or 'package_classify'.
  # Bias probes measured before/after (lm.probe): built-in set names (configs/probes/<name>.json,
  # e.g. 'gender_occupation', 'age_technology'), template specs (.json) or pair files (.jsonl).
  c.probes = ()
  c.probe_bootstrap = 2000  # Bootstrap resamples for the probes' 95% confidence intervals.
  c.replay = 0.0  # Share of each training batch drawn from replay_data (lm.replay), in [0, 1).
  c.replay_data = data_config()  # The replay source, a data section; source '' = the built-in
  c.replay_data.source = ''  # general corpus, split as the general-loss evaluation splits it.
  c.general_eval = True  # Also evaluate on the general corpus (what was kept).
  return c


def base_config() -> ConfigDict:
  c = ConfigDict()
  c.name = 'base'
  c.seed = 0
  c.model = model_config()
  c.mesh = mesh_config()
  c.tokenizer = tokenizer_config()
  c.data = data_config()
  c.optim = optim_config()
  c.train = train_config()
  c.finetune = finetune_config()
  return c


# --------------------------------------------------------------------------- validation


def _closest(name: str, options) -> str:
  match = difflib.get_close_matches(name, list(options), n=1)
  return f" (did you mean '{match[0]}'?)" if match else ''


def check_keys(cfg: ConfigDict, reference: ConfigDict | None = None, prefix: str = '') -> None:
  """Every key of cfg must exist in the base config (with the closest valid name if not)."""
  reference = reference if reference is not None else base_config()
  for key, value in cfg.items():
    path = f'{prefix}{key}'
    if key not in reference:
      raise ConfigError(f"unknown config key '{path}'{_closest(key, reference.keys())}")
    if isinstance(reference[key], ConfigDict):
      if not isinstance(value, ConfigDict):
        raise ConfigError(f"config key '{path}' must be a section, got {type(value).__name__}")
      check_keys(value, reference[key], prefix=f'{path}.')


def _require(cond: bool, key: str, msg: str) -> None:
  if not cond:
    raise ConfigError(f'config key {key}: {msg}')


def validate_model(m: ConfigDict, prefix: str = 'model.') -> None:
  _require(m.vocab_size >= 0, f'{prefix}vocab_size', f'must be >= 0 (0 = from the tokenizer), got {m.vocab_size}')
  _require(m.n_layers > 0, f'{prefix}n_layers', f'must be > 0, got {m.n_layers}')
  _require(m.n_heads > 0, f'{prefix}n_heads', f'must be > 0, got {m.n_heads}')
  if not m.head_dim:
    _require(
        m.d_model % m.n_heads == 0, f'{prefix}n_heads',
        f'n_heads={m.n_heads} does not divide d_model={m.d_model} (or set model.head_dim)')
  _require(
      m.n_kv_heads > 0 and m.n_heads % m.n_kv_heads == 0, f'{prefix}n_kv_heads',
      f'n_kv_heads={m.n_kv_heads} must divide n_heads={m.n_heads}')
  _require(m.mlp_activation in ('silu', 'gelu_tanh', 'gelu'), f'{prefix}mlp_activation',
           f"must be 'silu', 'gelu_tanh' or 'gelu', got {m.mlp_activation!r}")
  _require(m.remat in ('none', 'full', 'save_matmuls'), f'{prefix}remat',
           f"must be 'none', 'full' or 'save_matmuls', got {m.remat!r}")
  _require(m.rope_scaling in ('none', 'linear', 'llama3'), f'{prefix}rope_scaling',
           f"must be 'none', 'linear' or 'llama3', got {m.rope_scaling!r}")
  for key in ('dtype', 'param_dtype'):
    _require(m[key] in ('float32', 'bfloat16', 'float16'), f'{prefix}{key}',
             f"must be 'float32', 'bfloat16' or 'float16', got {m[key]!r}")
  _require(m.sliding_window >= 0, f'{prefix}sliding_window', 'must be >= 0')
  _require(m.attn_query_chunk >= 0, f'{prefix}attn_query_chunk', 'must be >= 0 (0 = one block)')
  _require(m.attention in ('auto', 'xla', 'cudnn', 'splash'), f'{prefix}attention',
           f"must be 'auto', 'xla', 'cudnn' or 'splash', got {m.attention!r}")
  _require(m.logits_chunk >= 0, f'{prefix}logits_chunk', 'must be >= 0 (0 = all positions at once)')


def validate_mesh(mesh: ConfigDict, num_devices: int | None = None) -> None:
  sizes = {a: mesh[a] for a in MESH_AXES}
  dcn = {a: mesh[f'dcn_{a}'] for a in MESH_AXES}
  for axis, size in {**sizes, **{f'dcn_{a}': s for a, s in dcn.items()}}.items():
    _require(size == -1 or size > 0, f'mesh.{axis}', f'must be -1 or > 0, got {size}')
  _require(sum(s == -1 for s in sizes.values()) <= 1, 'mesh',
           f'at most one of data/fsdp/tensor may be -1, got {sizes}')
  _require(all(s > 0 for s in dcn.values()), 'mesh.dcn_*', f'dcn sizes must be > 0, got {dcn}')
  for name, axes in mesh.rules:
    for axis in (axes if isinstance(axes, (tuple, list)) else (axes,)):
      _require(axis is None or axis in MESH_AXES, 'mesh.rules',
               f"logical axis '{name}' maps to unknown mesh axis '{axis}' (valid: {MESH_AXES})")
  if num_devices is not None:
    fixed = math.prod(s for s in sizes.values() if s != -1) * math.prod(dcn.values())
    if -1 in sizes.values():
      _require(num_devices % fixed == 0, 'mesh',
               f'sizes {sizes} x dcn {dcn} cannot fill {num_devices} devices')
    else:
      _require(fixed == num_devices, 'mesh',
               f'product of sizes {sizes} x dcn {dcn} = {fixed} != {num_devices} devices')


def validate(cfg: ConfigDict, num_devices: int | None = None) -> ConfigDict:
  """Checks the whole config once; raises ConfigError naming the first bad key."""
  check_keys(cfg)
  validate_model(cfg.model)
  validate_mesh(cfg.mesh, num_devices)
  d, o, t = cfg.data, cfg.optim, cfg.train
  _require(d.seq_len > 0, 'data.seq_len', f'must be > 0, got {d.seq_len}')
  _require(d.batch_size > 0, 'data.batch_size', f'must be > 0, got {d.batch_size}')
  _require(0.0 < d.train_fraction <= 1.0, 'data.train_fraction', 'must be in (0, 1]')
  _require(d.on_error in ('raise', 'skip'), 'data.on_error', "must be 'raise' or 'skip'")
  _require(o.schedule in ('cosine', 'linear', 'constant'), 'optim.schedule',
           f"must be 'cosine', 'linear' or 'constant', got {o.schedule!r}")
  _require(o.grad_accum >= 1, 'optim.grad_accum', 'must be >= 1')
  _require(d.batch_size % o.grad_accum == 0, 'optim.grad_accum',
           f'must divide data.batch_size={d.batch_size}, got {o.grad_accum}')
  _require(o.lr > 0, 'optim.lr', 'must be > 0')
  _require(t.steps > 0, 'train.steps', 'must be > 0')
  _require(t.nan_policy in ('skip', 'stop'), 'train.nan_policy', "must be 'skip' or 'stop'")
  f = cfg.finetune
  _require(f.task in ('lm', 'sft', 'classify', 'chat'), 'finetune.task',
           f"must be 'lm', 'sft', 'classify' or 'chat', got {f.task!r}")
  _require(f.task != 'classify' or cfg.model.num_classes > 1, 'model.num_classes',
           "task 'classify' needs model.num_classes >= 2")
  _require(0.0 <= f.replay < 1.0, 'finetune.replay', f'must be in [0, 1), got {f.replay}')
  _require(f.replay == 0.0 or f.task in ('lm', 'sft', 'chat'), 'finetune.replay',
           f"replay mixes next-token rows into the batch; task {f.task!r} has none")
  _require(f.probe_bootstrap >= 100, 'finetune.probe_bootstrap', 'must be >= 100')
  return cfg


# --------------------------------------------------------------------------- dotted keys


def tuples(value):
  """Lists (from JSON or a sweep file) as the tuples config fields hold."""
  if isinstance(value, (list, tuple)):
    return tuple(tuples(v) for v in value)
  return value


def check_key(key: str, reference: ConfigDict | None = None, *, leaf: bool = False):
  """The value at dotted `key` ('optim.lr') of reference (the base config by default).

  The one walk over dotted keys (command-line overrides, sweeps, evaluations); an unknown key
  is a ConfigError naming it and the closest real key; with leaf=True a section is refused too.
  """
  node = reference if reference is not None else base_config()
  parts = key.split('.')
  for depth, part in enumerate(parts):
    if not isinstance(node, ConfigDict) or part not in node:
      options = list(node.keys()) if isinstance(node, ConfigDict) else []
      raise ConfigError(f"unknown config key '{'.'.join(parts[:depth + 1])}'"
                        f'{_closest(part, options)}')
    node = node[part]
  if leaf and isinstance(node, ConfigDict):
    raise ConfigError(f"config key '{key}' is a section; set one of its keys")
  return node


def override(cfg: ConfigDict, overrides: dict) -> ConfigDict:
  """Sets each dotted key of `overrides` in cfg (in place, type-checked by ml_collections)."""
  for key, value in overrides.items():
    check_key(key, cfg, leaf=True)
    section, _, name = key.rpartition('.')
    node = check_key(section, cfg) if section else cfg
    try:
      node[name] = tuples(value)
    except (TypeError, ValueError, KeyError) as e:
      raise ConfigError(f'config key {key}: cannot use {value!r} ({e})') from None
  return cfg
