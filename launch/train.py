"""Trains peers with MAR-FL (or a baseline) and writes metrics to a workdir.

    python -m launch.train                                    # the default: embedded MNIST
    python -m launch.train --flagfile=launch/configs/mnist_n64.cfg --workdir=runs/n64

Every flag is a field of `marfl_jax.config.Config`; `--helpfull` lists them. Several processes
(hosts) run one simulation together with `--coordinator_address=HOST:PORT --num_processes=K
--process_id=I` (one command per process; the peer axis is sharded over all their devices).
A bad value stops the launcher with one line naming the flag and the allowed values, before any
work starts (exit status 2, as for a workdir another run holds); a run that diverges stops with
one line naming the iteration and what to try (exit status 3).
"""

from __future__ import annotations

import sys

from absl import app, flags

from launch import logs
from launch.flags import config_from_flags, define_config_flags
from marfl_jax.config import ConfigError
from marfl_jax.watch import DivergenceError

define_config_flags()
flags.DEFINE_string("coordinator_address", "", "Multi-process runs: host:port of process 0 "
                    "(jax.distributed); '' = a single process.")
flags.DEFINE_integer("num_processes", 1, "Multi-process runs: how many processes take part.")
flags.DEFINE_integer("process_id", 0, "Multi-process runs: this process's index (0 writes the "
                     "files).")


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    try:
        config = config_from_flags().validate()  # Starts no backend (tests/test_runtime.py).
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    from marfl_jax import runtime

    runtime.configure(config)  # Before jax.distributed and the backend start.
    if flags.FLAGS.num_processes > 1:
        if not flags.FLAGS.coordinator_address or not (
                0 <= flags.FLAGS.process_id < flags.FLAGS.num_processes):
            print("error: --num_processes > 1 needs --coordinator_address=host:port and "
                  f"--process_id in [0, {flags.FLAGS.num_processes})", file=sys.stderr)
            sys.exit(2)
        from marfl_jax import sharding

        sharding.initialize_distributed(flags.FLAGS.coordinator_address,
                                        flags.FLAGS.num_processes, flags.FLAGS.process_id)
    from marfl_jax import data, runner  # Deferred: imports jax.

    logs.setup()
    try:
        runner.run(config)
    except (ConfigError, data.DataUnavailableError) as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    except DivergenceError as error:  # Its rows, summary and last finite checkpoint are kept.
        print(f"error: {error}", file=sys.stderr)
        sys.exit(3)
    if flags.FLAGS.process_id == 0:
        from marfl_jax import plotting  # Deferred: matplotlib.

        plotting.plot_runs([config.workdir], config.workdir)


if __name__ == "__main__":
    app.run(main)
