"""Test setup: 8 fake CPU devices, set before JAX is imported anywhere."""

import os

os.environ['XLA_FLAGS'] = (
    os.environ.get('XLA_FLAGS', '') + ' --xla_force_host_platform_device_count=8').strip()
os.environ.setdefault('JAX_PLATFORMS', 'cpu')

import jax  # noqa: E402  (must follow the XLA_FLAGS line above)

jax.config.update('jax_threefry_partitionable', True)
# Fake CPU devices run collectives on a small thread pool; with async dispatch two in-flight
# steps can each hold threads the other's rendezvous waits for (a deadlock on 2 cores).
jax.config.update('jax_cpu_enable_async_dispatch', False)


def pytest_configure(config):
  config.addinivalue_line('markers', 'slow: long-running; excluded from the default run')
