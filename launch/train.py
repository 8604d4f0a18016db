"""Trains peers with MAR-FL (or a baseline) and writes metrics to a workdir.

    python -m launch.train                                    # the default: embedded MNIST
    python -m launch.train --flagfile=launch/configs/mnist_n64.cfg --workdir=runs/n64

Every flag is a field of `marfl_jax.config.Config`; `--helpfull` lists them. A bad value stops
the launcher with one line naming the flag and the allowed values, before any work starts.
"""

from __future__ import annotations

import sys

from absl import app, logging

from launch.flags import config_from_flags, define_config_flags
from marfl_jax.config import ConfigError

define_config_flags()


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    try:
        config = config_from_flags().validate()
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    from marfl_jax import data, experiment  # Deferred: imports jax.

    logging.set_verbosity(logging.INFO)
    try:
        experiment.run(config)
    except (ConfigError, data.DataUnavailableError) as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    app.run(main)
