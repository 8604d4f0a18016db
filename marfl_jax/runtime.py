"""Process-wide numerics of a run: matmul precision and deterministic GPU ops.

- `--matmul_precision` sets `jax_default_matmul_precision` for what the run traces: 'highest'
  keeps float32 matmuls and convolutions float32 on every backend; on NVIDIA GPUs JAX's default
  ('default', also 'high') runs them in TF32.
- `--deterministic` adds `--xla_gpu_deterministic_ops=true` to `XLA_FLAGS`, which XLA reads once,
  when the backend starts: float scatter-adds (segment sums) are otherwise non-deterministic on
  GPUs, and a resumed run would not be bit-identical. It is added only where a GPU may be used
  (a CPU has nothing to change) and only while no backend has started; later, on a GPU without
  the flag, a warning says so.

The launchers call `configure(config)` (both, for the whole process) right after parsing and
validating their flags (`Config.validate()` starts no backend: tests/test_runtime.py);
`runner.run` sets the deterministic ops too, first thing, when no backend has started yet, and
traces the run inside `matmul_precision(config)`, leaving its caller's precision as it was.
"""

from __future__ import annotations

import glob
import importlib.util
import os
from typing import NamedTuple

from absl import logging

DETERMINISTIC_OPS = "--xla_gpu_deterministic_ops=true"
_GPU_PLATFORMS = ("cuda", "gpu", "rocm")
# jax_default_matmul_precision for each --matmul_precision ('default': JAX's own, None).
_PRECISION = {"highest": "highest", "high": "high", "default": None}


def with_deterministic_ops(xla_flags: str, deterministic: bool) -> str:
    """XLA_FLAGS with the deterministic-ops flag once when `deterministic`, without it otherwise;
    the other flags kept as they are (the config decides over a value already there)."""
    flags = xla_flags.split()
    kept = [flag for flag in flags if flag.split("=", 1)[0] != "--xla_gpu_deterministic_ops"]
    if deterministic and len(kept) == len(flags) - 1 and DETERMINISTIC_OPS in flags:
        return xla_flags  # Already there, once.
    if deterministic:
        kept.append(DETERMINISTIC_OPS)
    return xla_flags if kept == flags else " ".join(kept)


def may_use_gpu(environ=os.environ) -> bool:
    """Whether jax may start a GPU backend in this process (JAX_PLATFORMS, else a GPU device
    node or a GPU plugin of jax)."""
    platforms = environ.get("JAX_PLATFORMS", "") or environ.get("JAX_PLATFORM_NAME", "")
    if platforms:
        return any(p.strip().lower() in _GPU_PLATFORMS for p in platforms.split(","))
    if glob.glob("/dev/nvidia[0-9]*") or os.path.exists("/dev/kfd"):
        return True
    try:
        return any(importlib.util.find_spec(f"jax_plugins.xla_{name}") is not None
                   for name in ("cuda12", "cuda13", "rocm"))
    except (ImportError, ValueError):
        return False


def deterministic_settings(environ, deterministic: bool) -> dict[str, str]:
    """The environment variables to set before the backend starts (empty: nothing to change).
    The flag is added only where a GPU may be used; --deterministic=false removes it."""
    current = environ.get("XLA_FLAGS", "")
    if deterministic and not may_use_gpu(environ):
        return {}
    flags = with_deterministic_ops(current, deterministic)
    return {} if flags == current else {"XLA_FLAGS": flags}


def backends_started() -> bool:
    """Whether jax has started a backend in this process (it then read XLA_FLAGS already).

    No public jax API says so without starting one, so this reads jax internals, guarded:
    `jax._src.xla_bridge.backends_are_initialized()` (jax 0.4 to 0.10 at least), else the
    module's `_backends` dict (non-empty once started, as in older jax), else False. False is the
    safe answer when jax moved them: `prepare_backend` then sets XLA_FLAGS, which does nothing
    once a backend runs, while True would make it ask `jax.default_backend()` and so start the
    backend before the flags are set. Checking never starts a backend itself."""
    try:
        from jax._src import xla_bridge
    except ImportError:
        return False
    started = getattr(xla_bridge, "backends_are_initialized", None)
    if callable(started):
        try:
            return bool(started())
        except Exception:  # noqa: BLE001 (an internal that changed its signature).
            return False
    backends = getattr(xla_bridge, "_backends", None)
    return bool(backends) if isinstance(backends, dict) else False


class Settings(NamedTuple):
    """The flags of the process-wide numerics (`config.settings(runtime.Settings)`; a Config
    has both fields, so one may be passed as it is)."""

    matmul_precision: str = "highest"
    deterministic: bool = True


def prepare_backend(config: Settings) -> None:
    """Before the backend starts: the deterministic GPU ops (`deterministic`) in XLA_FLAGS.
    After: a warning where a GPU backend started without them."""
    if not backends_started():
        os.environ.update(deterministic_settings(os.environ, config.deterministic))
        return
    import jax

    if (config.deterministic and jax.default_backend() in _GPU_PLATFORMS
            and DETERMINISTIC_OPS not in os.environ.get("XLA_FLAGS", "").split()):
        logging.warning("the %s backend started without %s (set it in XLA_FLAGS before jax "
                        "starts, as the launchers do): float scatter-adds may differ from run to "
                        "run, so a resumed run may not be bit-identical", jax.default_backend(),
                        DETERMINISTIC_OPS)


def matmul_precision(config: Settings):
    """A context in which what is traced uses `config.matmul_precision` (runner.run)."""
    import jax

    return jax.default_matmul_precision(_PRECISION[config.matmul_precision])


def configure(config: Settings) -> None:
    """For the whole process (the launchers, right after parsing their flags): the matmul
    precision and `prepare_backend`."""
    import jax

    jax.config.update("jax_default_matmul_precision", _PRECISION[config.matmul_precision])
    prepare_backend(config)


def describe(config: Settings) -> str:
    """One line for the run's log (the backend has started)."""
    import jax

    backend = jax.default_backend()
    if backend not in _GPU_PLATFORMS:
        ops = f"not needed on {backend}"
    elif DETERMINISTIC_OPS in os.environ.get("XLA_FLAGS", "").split():
        ops = "on"
    else:
        ops = ("off (--deterministic=false)" if not config.deterministic
               else "off (the backend started without them)")
    return f"matmul precision {config.matmul_precision}; deterministic GPU ops {ops}"
