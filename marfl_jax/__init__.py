"""marfl-jax: a vectorized simulator of peer-to-peer federated learning with Moshpit All-Reduce.

Peers are stacked on a leading, vmapped axis; aggregation is a schedule of group means over that
axis; every byte that would cross the network is counted exactly. Entry point:
`marfl_jax.experiment.run(config, workdir)`.
"""

__version__ = "0.1.0"
