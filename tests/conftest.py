"""Test setup: 8 fake CPU devices, set before JAX is imported anywhere, and one compilation
cache for the whole test run."""

import os
import shutil
import tempfile

# LLVM at -O0: XLA:CPU compiles a tiny model's programs 3-7x faster (a sharded random init:
# 11 s -> 1.7 s), and compiling is most of this suite's time; tiny models run within ~10%.
# Results can differ from -O3's in the last bit (instruction selection, e.g. fused multiply-add),
# so every process that a test compares bitwise with this one gets the same flags
# (helpers.xla_flags). The benchmark tests check what bench reports, not its speed: they run
# at -O0 too.
# XLA:CPU's older loop emitters instead of its fusion emitters: a tiny train step compiles in
# ~2.9 s, not ~4.2 s, and its random init ~30% faster, for ~30% more time per step (measured,
# 1 and 8 devices). Two different programs may round the last bit differently under them
# (test_reliability's NaN-stop resume).
TEST_XLA_FLAGS = '--xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false'
os.environ['XLA_FLAGS'] = ' '.join([os.environ.get('XLA_FLAGS', ''), TEST_XLA_FLAGS,
                                    '--xla_force_host_platform_device_count=8']).strip()
os.environ.setdefault('JAX_PLATFORMS', 'cpu')

# One JAX compilation cache for this run, new and empty at its start (never kept between runs,
# so a fresh clone measures the same): the pytest process, its xdist workers (which inherit the
# variable from the controller that made the directory) and every train.py / finetune.py /
# sweep subprocess they launch compile a program once and load it after that. Compiling is most
# of the suite's time on a small CPU; a cached program is the same XLA executable, so nothing a
# test checks (losses, bitwise resume) changes.
_CACHE_VAR = 'LM_TEST_COMPILATION_CACHE'
_OWN_CACHE = _CACHE_VAR not in os.environ
if _OWN_CACHE:
  os.environ[_CACHE_VAR] = tempfile.mkdtemp(prefix='lm-test-jax-cache-')
os.environ['JAX_COMPILATION_CACHE_DIR'] = os.environ[_CACHE_VAR]
os.environ['JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS'] = '0'
os.environ['JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES'] = '0'

import jax  # noqa: E402  (must follow the XLA_FLAGS line above)

jax.config.update('jax_threefry_partitionable', True)
# Fake CPU devices run collectives on a small thread pool; with async dispatch two in-flight
# steps can each hold threads the other's rendezvous waits for (a deadlock on 2 cores).
jax.config.update('jax_cpu_enable_async_dispatch', False)
jax.config.update('jax_compilation_cache_dir', os.environ['JAX_COMPILATION_CACHE_DIR'])
jax.config.update('jax_persistent_cache_min_compile_time_secs', 0)
jax.config.update('jax_persistent_cache_min_entry_size_bytes', 0)


# The longest test files, longest first (measured): pytest.ini's xdist workers take whole files
# in collection order, so starting these first keeps one long file from running alone at the end.
LONGEST_FIRST = ('test_multihost.py', 'test_reliability.py', 'test_model.py', 'test_finetune.py',
                 'test_loop.py', 'test_convert_families.py', 'test_sweep.py', 'test_probe.py',
                 'test_replay.py', 'test_train.py', 'test_bench.py', 'test_cli.py')


def pytest_configure(config):
  config.addinivalue_line('markers', 'slow: long-running; excluded from the default run')


def pytest_collection_modifyitems(items):
  rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
  items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # Stable: files keep their order.


def pytest_unconfigure(config):
  if _OWN_CACHE:  # The process that made the cache (the xdist controller, or plain pytest).
    shutil.rmtree(os.environ[_CACHE_VAR], ignore_errors=True)
