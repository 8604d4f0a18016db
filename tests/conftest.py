"""Shared test settings: tests run on the CPU with float32 and never touch the network."""

import atexit
import os
import shutil
import tempfile

os.environ.setdefault("MARFL_OFFLINE", "1")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# One compilation cache for the session, shared with the subprocesses tests start: many tests
# compile the same small iteration, and compiling is most of a tiny run's time.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="marfl_jax_cache_")
    atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], True)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")
