"""Every algorithm at every N until the target or the budget: bytes per iteration against N
(log-log, with N log N and N^2 guides). MAR-FL runs on a perfect Moshpit grid where N = M^d
(the paper's N=125 is 5x5x5), else on the exact mixed-radix schedule.

    python -m launch.compare                     # N in {16,64,125,256,1024}, all five
    python -m launch.compare --num_peers=16,64 --algorithms=marfl,arfl --workdir=runs/small

Writes `scaling.csv` and `bytes_per_iteration.png`.
"""

from __future__ import annotations

import dataclasses

from marfl_jax import plotting
from marfl_jax.scales import peer_configs
from marfl_jax.sweep import Study


def configs(scale, workdir):
    return peer_configs(dataclasses.replace(scale.mnist, workdir=workdir), scale.peer_counts,
                        scale.algorithms)


STUDY = Study(
    name="scaling",
    configs=configs,
    draw=lambda rows, curves, configs, path: plotting.plot_bytes_per_iteration(rows, path),
    figure="bytes_per_iteration.png",
    defaults=dict(peer_counts=(16, 64, 125, 256, 1024),
                  algorithms=("marfl", "fedavg", "arfl", "rdfl", "gossip")))
