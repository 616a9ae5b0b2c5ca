"""Eight fake CPU devices for every test, set before JAX initialises."""

import atexit
import os
import shutil
import tempfile

os.environ["JAX_NUM_CPU_DEVICES"] = "8"
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# One persistent compilation cache for the session (and the processes tests start): the
# tests build the same tiny programs again and again, and compiling dominates their time.
# A cached executable is the same binary, so bitwise comparisons still hold.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _cache = tempfile.mkdtemp(prefix="jaxalign-tests-xla-")
    atexit.register(shutil.rmtree, _cache, ignore_errors=True)
    os.environ.update(JAX_COMPILATION_CACHE_DIR=_cache,
                      JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                      JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")

# The tests' programs are tiny: XLA's backend optimisation costs more compile time than it
# saves in run time. Every run of the suite (and every process a test starts, which
# inherits this) compiles alike, so comparisons between runs still hold.
if "--xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + " --xla_backend_optimization_level=0").strip()

import jax  # noqa: E402

assert jax.device_count() == 8, "tests need 8 fake CPU devices; import jax after conftest"
