"""The one path from a validated config and a mesh to everything a run needs, without allocating.

  built = build(cfg, mesh)   model, abstract params (shapes + shardings), logical specs,
                             trainable selection, optimizer + schedule, train-state shardings
                             and the abstract optimizer state

It is what the loop, the memory planner, the benchmark and fine-tuning each need;
`built.init_state(params)` then makes the sharded train state, `built.abstract_state()` its
shapes and shardings (what a resume restores into). Fine-tuning is "a run with a
finetune section" (`finetune_section`), not a flag; a caller that knows better (finetune.py, a
LoRA checkpoint being decoded) says so with `finetune=`. `mesh` may be a concrete Mesh or an AbstractMesh (the
memory planner plans for devices it does not have).

`load_checkpoint(path)` builds the model a saved checkpoint describes and restores its params
onto one device: what decoding and Hugging Face export need.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from lm import checkpoint, optim, selection, sharding
from lm import model as model_lib
from lm import step as step_lib
from lm.config import MESH_AXES, ConfigError


@dataclasses.dataclass(frozen=True)
class Built:
  """What a config and a mesh determine before any array exists."""
  cfg: ml_collections.ConfigDict
  mesh: Any  # jax.sharding.Mesh or AbstractMesh.
  model_cfg: ml_collections.ConfigDict  # cfg.model with vocab_size resolved.
  finetune: ml_collections.ConfigDict | None  # The finetune section, if this run fine-tunes.
  task: str  # 'lm', 'sft' or 'classify'.
  model: nn.Module
  init_fn: Callable  # rng -> boxed params (for sharded init).
  abstract_params: Any  # ShapeDtypeStructs carrying their shardings.
  params_shardings: Any
  logical_specs: Any
  trainable: selection.Selection  # {path: None (whole leaf) or the trained layers of a stack}.
  tx: optax.GradientTransformation
  schedule: optax.Schedule
  state_shardings: step_lib.TrainState
  abstract_opt_state: Any

  @property
  def is_finetune(self) -> bool:
    return self.finetune is not None

  def init_state(self, params=None) -> step_lib.TrainState:
    """The train state on the (concrete) mesh: fresh params, or `params` placed; laid out as
    state_shardings."""
    return step_lib.init_train_state(self.init_fn, self.tx, self.trainable, self.state_shardings,
                                     self.mesh, self.cfg.mesh.rules, seed=self.cfg.seed,
                                     params=params)

  def abstract_state(self) -> step_lib.TrainState:
    """The train state's shapes, dtypes and shardings, nothing allocated: what a restore reads
    into and what the planner compiles for."""
    shapes = step_lib.TrainState(step=jax.ShapeDtypeStruct((), jnp.int32),
                                 params=self.abstract_params, opt_state=self.abstract_opt_state,
                                 rng=jax.eval_shape(lambda: jax.random.key(0)))
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        shapes, self.state_shardings)

  def trainable_params(self, params) -> dict[str, Any]:
    """{path: leaf or trained slice} of a params tree (concrete or abstract)."""
    return selection.take(model_lib.flatten_params(params), self.trainable)


def finetune_section(cfg: ml_collections.ConfigDict) -> ml_collections.ConfigDict | None:
  """cfg.finetune when the run fine-tunes (restores a model, freezes, selects or adds LoRA)."""
  f = cfg.finetune
  return f if (f.restore_from or f.lora_rank or f.freeze or f.trainable) else None


def model_config(cfg: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """cfg.model with vocab_size 0 ('the tokenizer's') read as tokenizer.vocab_size.

  A run with a real tokenizer fits model.vocab_size to it first (lm.run.fit_vocab); tools that
  build no tokenizer (bench, the memory planner) get the size the config would train.
  """
  m = ml_collections.ConfigDict(cfg.model.to_dict())
  if not m.vocab_size:
    m.vocab_size = cfg.tokenizer.vocab_size
  if m.vocab_size <= 0:
    raise ConfigError('config key model.vocab_size: 0 means "from the tokenizer", but '
                      'tokenizer.vocab_size is 0 too')
  return m


def build(cfg: ml_collections.ConfigDict, mesh, *, finetune: bool | None = None,
          decode: bool = False) -> Built:
  """Model, abstract sharded params, trainable set, optimizer and state shardings of a run.

  finetune: None reads it from the config (`finetune_section`); True/False decides.
  decode: the KV-cache model (lm.generate); its params are the same tree.
  """
  section = finetune_section(cfg) if finetune is None else (cfg.finetune if finetune else None)
  m = model_config(cfg)
  model = model_lib.build_model(m, section, decode=decode)
  init = step_lib.init_fn(model, cfg.data.seq_len, m.num_classes)
  # On a concrete mesh, traced under the mesh and rules as the sharded init traces it: that init
  # then reuses this trace (JAX caches it per function and context) instead of tracing the
  # model again (measured on the tiny test model: 0.2 s -> 0.06 s).
  in_mesh = (sharding.activate(mesh, cfg.mesh.rules) if isinstance(mesh, jax.sharding.Mesh)
             else contextlib.nullcontext())
  with in_mesh:
    boxed = jax.eval_shape(init, jax.random.key(cfg.seed))
  logical_specs = nn.get_partition_spec(boxed)
  params_shardings = sharding.logical_to_shardings(logical_specs, mesh, cfg.mesh.rules)
  abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                          nn.meta.unbox(boxed), params_shardings)
  flat_abstract = model_lib.flatten_params(abstract)
  trainable = optim.trainable_selection(flat_abstract, section, cfg.optim)
  if not trainable:
    raise ConfigError('config keys finetune.freeze/trainable leave no parameter to train')
  tx, schedule = optim.make_optimizer(cfg.optim, cfg.train.steps, trainable)
  flat_shardings = model_lib.flatten_params(params_shardings)
  train_abstract = selection.take(flat_abstract, trainable)
  state_shardings = step_lib.state_shardings(params_shardings, tx, train_abstract,
                                             {p: flat_shardings[p] for p in trainable}, mesh)
  return Built(cfg=cfg, mesh=mesh, model_cfg=m, finetune=section,
               task=section.task if section is not None else 'lm', model=model, init_fn=init,
               abstract_params=abstract, params_shardings=params_shardings,
               logical_specs=logical_specs, trainable=trainable, tx=tx, schedule=schedule,
               state_shardings=state_shardings,
               abstract_opt_state=jax.eval_shape(tx.init, train_abstract))


def single_device_mesh() -> jax.sharding.Mesh:
  """Every mesh axis of size 1 on the first device: a whole model on one chip."""
  return jax.sharding.Mesh(np.array(jax.devices()[:1]).reshape((1,) * len(MESH_AXES)), MESH_AXES)


def load_checkpoint(ckpt) -> tuple[ml_collections.ConfigDict, Any]:
  """(config, params) of an lm checkpoint (a step directory, or a run's workdir: its latest).

  The params are checked against the model the saved config builds (LoRA adapters included)
  and placed on one device. lm.convert's output directories resolve to their checkpoint with
  lm.convert.resolve_checkpoint first (lm.generate.load_checkpoint does both).
  """
  cfg = checkpoint.read_config(ckpt)
  built = build(cfg, single_device_mesh(), finetune=cfg.finetune.lora_rank > 0)
  return cfg, checkpoint.load_params(ckpt, built.abstract_params)
