"""marfl-jax: a vectorized simulator of peer-to-peer federated learning with Moshpit All-Reduce.

Peers are stacked on a leading, vmapped axis; aggregation is a schedule of group means over that
axis; every byte that would cross the network is counted exactly.

    from marfl_jax import Config, run
    result = run(Config(num_peers=16, group_size=4, key_dim=2), workdir="runs/n16")

Extension points (each a registry: register a name, then use it as the flag's value):
`ALGORITHMS` (group schedule + wire), `WIRE_MODELS`, `RULES` (group rules), `ATTACKS`,
`CODECS`, `MODELS`, `DATASETS`, `PARTITIONS`. The simulation itself is `marfl_jax.core`: the
iteration as a chain of stages; `marfl_jax.assemble` builds a run's pieces from a Config.
"""

from marfl_jax.algorithms import ALGORITHMS, Algorithm, make_algorithm
from marfl_jax.attacks import ATTACKS, Attack
from marfl_jax.codec import CODECS, Codec
from marfl_jax.comm import WIRE_MODELS, Ledger, Wire, WireCost
from marfl_jax.config import Config, ConfigError
from marfl_jax.core import Context, FLState, Simulation, Stage, Step, build_chain, make_iteration
from marfl_jax.data import DATASETS, PARTITIONS, Dataset, DataUnavailableError, PeerIndex
from marfl_jax.models import MODELS
from marfl_jax.registry import Registry
from marfl_jax.rules import RULES, Rule
from marfl_jax.runner import RunResult, run
from marfl_jax.watch import DivergenceError

__version__ = "0.1.0"

__all__ = [
    "ALGORITHMS",
    "ATTACKS",
    "Algorithm",
    "Attack",
    "CODECS",
    "Codec",
    "Config",
    "ConfigError",
    "Context",
    "DATASETS",
    "Dataset",
    "DataUnavailableError",
    "DivergenceError",
    "FLState",
    "Ledger",
    "MODELS",
    "PARTITIONS",
    "PeerIndex",
    "RULES",
    "Registry",
    "Rule",
    "RunResult",
    "Simulation",
    "Stage",
    "Step",
    "WIRE_MODELS",
    "Wire",
    "WireCost",
    "build_chain",
    "make_algorithm",
    "make_iteration",
    "run",
]
