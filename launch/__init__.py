"""absl-flag entry points: `python -m launch.train | compare | reproduce | plot`.

Run as `python -m launch.X`, a launcher first sets two process settings that only take effect at
process start, and re-executes itself once with them (set MARFL_PROCESS_SETTINGS=0 to skip):
- on a Linux CPU (glibc, no GPU), glibc malloc tunables that keep XLA:CPU's per-step temporary
  arena mapped instead of unmapping and zero-filling it again every step
  (`benchmarks/RESULTS.md`, "Allocator and chunking");
- a persistent XLA compilation cache (`$JAX_COMPILATION_CACHE_DIR`, default
  `~/.cache/marfl_jax/xla`), so a rerun or a resumed run does not compile again.
A third setting depends on a flag, so each launcher applies it right after parsing its flags
(`marfl_jax.runtime.configure`, no re-execution needed: XLA reads `XLA_FLAGS` when the backend
starts): where a GPU may be used, `--xla_gpu_deterministic_ops=true` unless `--deterministic=false`.
"""

import os
import platform
import sys

ALLOCATOR_TUNABLES = ("glibc.malloc.hugetlb=1:glibc.malloc.arena_max=1:glibc.malloc.mmap_max=0:"
                      "glibc.malloc.trim_threshold=100000000000")


def _process_settings(environ) -> dict[str, str]:
    """The environment variables to add (none already set is overridden)."""
    settings = {}
    if "JAX_COMPILATION_CACHE_DIR" not in environ:
        settings["JAX_COMPILATION_CACHE_DIR"] = os.path.join(
            os.path.expanduser("~"), ".cache", "marfl_jax", "xla")
    cpu_only = environ.get("JAX_PLATFORMS", "") in ("", "cpu") and not os.path.exists(
        "/dev/nvidia0")
    if ("GLIBC_TUNABLES" not in environ and cpu_only and sys.platform == "linux"
            and platform.libc_ver()[0] == "glibc"):
        settings["GLIBC_TUNABLES"] = ALLOCATOR_TUNABLES
    return settings


def _run_as_launcher() -> bool:
    """True while `python -m launch.X` imports this package (sys.argv[0] is '-m' then)."""
    argv = getattr(sys, "orig_argv", [])
    return (sys.argv[:1] == ["-m"] and "-m" in argv
            and argv[argv.index("-m") + 1:][:1] != [] and argv[argv.index("-m") + 1]
            .startswith("launch."))


if _run_as_launcher() and os.environ.get("MARFL_PROCESS_SETTINGS", "1") != "0":
    _settings = _process_settings(os.environ)
    if _settings:
        os.environ.update(_settings)
        os.environ["MARFL_PROCESS_SETTINGS"] = "0"  # Once.
        sys.stdout.flush()
        sys.stderr.flush()
        os.execv(sys.executable, [sys.executable, *sys.orig_argv[1:]])
