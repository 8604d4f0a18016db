"""Launcher logging: this project's INFO lines, other libraries' warnings and errors only.

orbax logs several multi-line INFO records per checkpoint and jax one for its TPU probe; they
bury the progress lines. `--library_logs` shows them again.
"""

from __future__ import annotations

import logging as python_logging
import os

from absl import flags, logging

flags.DEFINE_bool("library_logs", False, "Show other libraries' INFO logs (orbax, jax).")

_OWN = tuple(os.sep + name + os.sep for name in ("marfl_jax", "launch", "benchmarks"))


class _OwnInfoOnly(python_logging.Filter):
    def filter(self, record: python_logging.LogRecord) -> bool:
        return record.levelno >= python_logging.WARNING or any(
            part in record.pathname for part in _OWN)


def setup() -> None:
    """INFO verbosity; unless --library_logs, other libraries below WARNING are dropped."""
    logging.set_verbosity(logging.INFO)
    if not flags.FLAGS.library_logs:
        logging.get_absl_handler().addFilter(_OwnInfoOnly())
    logging.info("process: allocator tunables %s; compilation cache %s",
                 "on" if "GLIBC_TUNABLES" in os.environ else "off",
                 os.environ.get("JAX_COMPILATION_CACHE_DIR", "off"))
