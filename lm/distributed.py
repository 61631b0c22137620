"""Multi-process start-up: JAX's multi-controller runtime on TPU pods, GPU clusters and CPUs.

Every process runs the same command. `initialize` starts jax.distributed when the run is
multi-process: from explicit flags (--coordinator, --num_processes, --process_id: any cluster,
and local tests), or from the environment JAX detects itself (Cloud TPU VMs, Slurm, Open MPI).
"""

from __future__ import annotations

import os

import jax
from absl import flags, logging

_COORDINATOR = flags.DEFINE_string('coordinator', '', 'host:port of process 0 (multi-process).')
_NUM_PROCESSES = flags.DEFINE_integer('num_processes', 0, 'Number of processes (multi-process).')
_PROCESS_ID = flags.DEFINE_integer('process_id', -1, 'This process (multi-process).')

# Environment variables by which clusters announce a multi-process job JAX can auto-detect.
_CLUSTER_ENV = ('TPU_WORKER_HOSTNAMES', 'MEGASCALE_COORDINATOR_ADDRESS', 'JAX_COORDINATOR_ADDRESS')


def _slurm_multi_process() -> bool:
  return int(os.environ.get('SLURM_NTASKS', '1')) > 1 and 'SLURM_JOB_ID' in os.environ


def _tpu_multi_host() -> bool:
  hosts = os.environ.get('TPU_WORKER_HOSTNAMES', '')
  return len([h for h in hosts.split(',') if h]) > 1


def initialize() -> None:
  """Starts jax.distributed if this is a multi-process run; a no-op for one process."""
  if _COORDINATOR.value or _NUM_PROCESSES.value > 1:
    if jax.default_backend() == 'cpu' or os.environ.get('JAX_PLATFORMS', '') == 'cpu':
      jax.config.update('jax_cpu_collectives_implementation', 'gloo')
    jax.distributed.initialize(coordinator_address=_COORDINATOR.value,
                               num_processes=_NUM_PROCESSES.value,
                               process_id=_PROCESS_ID.value)
  elif _tpu_multi_host() or _slurm_multi_process() or any(
      k in os.environ for k in _CLUSTER_ENV[1:]):
    jax.distributed.initialize()
  else:
    return
  logging.info('jax.distributed: process %d of %d, %d local / %d global devices',
               jax.process_index(), jax.process_count(), jax.local_device_count(),
               jax.device_count())
