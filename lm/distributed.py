"""Multi-process start-up: JAX's multi-controller runtime on TPU pods, GPU clusters and CPUs.

Every process runs the same command; `initialize()` (called first thing by train.py and
finetune.py) starts jax.distributed when the run is multi-process:

  explicit flags    --coordinator=HOST:PORT --num_processes=N --process_id=I  (any cluster, and
                    local tests; a flag left out is taken from the environment if JAX finds it);
  Cloud TPU VM      TPU chips attached (or TPU_WORKER_HOSTNAMES / MEGASCALE_* set, as on GKE):
                    JAX reads the slice's hosts from the TPU metadata;
  Slurm             srun with more than one task (SLURM_NTASKS > 1): coordinator = first node of
                    the step, process id = SLURM_PROCID, local GPUs from SLURM_LOCALID;
  Open MPI          mpirun with more than one rank (OMPI_COMM_WORLD_SIZE > 1);
  anything else     JAX_COORDINATOR_ADDRESS (+ --num_processes / --process_id) in the environment.

Elsewhere one process (a single host, or srun with one task driving all local GPUs) does
nothing.

After start-up, process 0 alone writes the console progress, metrics.jsonl and TensorBoard
(lm.metrics), and other processes log warnings only. Every process takes part in each
checkpoint save and restore (Orbax writes each process's array shards; process 0 writes the
metadata), and every process writes its own data-iterator file.
"""

from __future__ import annotations

import os

import jax
from absl import flags, logging

from lm.config import ConfigError

_COORDINATOR = flags.DEFINE_string('coordinator', '', 'host:port of process 0 (multi-process).')
_NUM_PROCESSES = flags.DEFINE_integer('num_processes', 0, 'Number of processes (multi-process).')
_PROCESS_ID = flags.DEFINE_integer('process_id', -1, 'This process (multi-process).')


def _tpu_chips_attached() -> bool:
  """Whether this host has Cloud TPU chips (read from PCI ids; the backend stays untouched)."""
  platforms = os.environ.get('JAX_PLATFORMS', '')
  if platforms and 'tpu' not in platforms:
    return False
  try:
    from jax._src import hardware_utils  # pylint: disable=import-outside-toplevel
    return hardware_utils.num_available_tpu_chips_and_device_id()[0] > 0
  except (ImportError, AttributeError, OSError):
    return False


def detected_cluster() -> str | None:
  """The multi-process environment JAX can configure itself from, or None.

  On a Cloud TPU VM this is always 'tpu': jax.distributed.initialize() reads the slice's
  hosts from the TPU metadata (one host is a job of one process), as recommended for TPU VMs.
  """
  env = os.environ
  hosts = [h for h in env.get('TPU_WORKER_HOSTNAMES', '').split(',') if h]
  if len(hosts) > 1 or 'MEGASCALE_COORDINATOR_ADDRESS' in env or _tpu_chips_attached():
    return 'tpu'
  if 'SLURM_JOB_ID' in env and int(env.get('SLURM_NTASKS', '1') or 1) > 1:
    return 'slurm'
  if int(env.get('OMPI_COMM_WORLD_SIZE', '1') or 1) > 1:
    return 'ompi'
  if env.get('JAX_COORDINATOR_ADDRESS'):
    return 'env'
  return None


def initialize(coordinator: str | None = None, num_processes: int | None = None,
               process_id: int | None = None) -> bool:
  """Starts jax.distributed if this is a multi-process run; False (a no-op) for one process.

  Arguments default to the --coordinator / --num_processes / --process_id flags. Must run
  before anything touches a JAX device.
  """
  coordinator = _COORDINATOR.value if coordinator is None else coordinator
  num_processes = _NUM_PROCESSES.value if num_processes is None else num_processes
  process_id = _PROCESS_ID.value if process_id is None else process_id
  explicit = bool(coordinator) or num_processes > 1 or process_id >= 0
  cluster = detected_cluster()
  if not explicit and cluster is None:
    return False
  if explicit and num_processes == 1:
    return False
  # CPU devices need a collectives backend across processes (the default on jax 0.10, set
  # explicitly for older versions); it concerns only the CPU client, so TPU/GPU runs are unaffected.
  jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  try:
    jax.distributed.initialize(coordinator_address=coordinator or None,
                               num_processes=num_processes if num_processes > 0 else None,
                               process_id=process_id if process_id >= 0 else None)
  except ValueError as e:
    raise ConfigError(f'--coordinator/--num_processes/--process_id: {e} (give all three, or '
                      f'run under a cluster JAX detects: Cloud TPU, Slurm, Open MPI)') from e
  logging.info('jax.distributed (%s): process %d of %d, %d local / %d global devices',
               'flags' if explicit else cluster, jax.process_index(), jax.process_count(),
               jax.local_device_count(), jax.device_count())
  if jax.process_index() != 0:
    logging.set_verbosity(logging.WARNING)  # Process 0 speaks for the run.
  return True
