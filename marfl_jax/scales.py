"""How large a sweep is: a `Scale` (the shared MNIST setting, the size, and the study settings
it gives), the named `SCALES` of the paper reproduction, and the settings they share: the
paper's flagfiles, the Moshpit grid of N peers and one run per algorithm at each N.

A study's own settings (churn's dropouts, DP's noise multipliers, ...) and their defaults are
its module's (`STUDY.options`); a scale only names the ones it changes, per study.
`launch.compare` builds its Scale from `SCALES["small"]`'s shared setting and size (not its
study settings), the study's `defaults` and its flags; `launch.reproduce --scale=NAME` takes
`SCALES[NAME]`.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from marfl_jax.config import Config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG_DIR = os.path.join(ROOT, "launch", "configs")


@dataclasses.dataclass(frozen=True)
class Scale:
    """How large each study is.

    `mnist` is the shared MNIST setting (model, data, B, b, target, budget); with
    `paper_flagfiles` the MNIST runs at N take their setting from launch/configs/mnist_n{N}.cfg
    instead (dataset and data_dir still from `mnist`). `options` maps a study's name to the
    settings of that study this scale gives ({option name: value}); the rest keep the study's
    defaults (`STUDY.options`, read with `STUDY.options_of(scale)`).
    """

    name: str
    mnist: Config
    peer_counts: tuple[int, ...] = (16, 64, 125)
    algorithms: tuple[str, ...] = ("marfl", "fedavg", "arfl", "rdfl")
    paper_flagfiles: bool = False
    study_peers: int = 64  # N of the studies at one N (churn, MKD, DP, codec, byzantine).
    options: Mapping[str, Mapping[str, Any]] = dataclasses.field(default_factory=dict)


# The settings the reproduction gives to the studies, on top of their defaults: MKD evaluates
# every iteration (bytes to 50 %), DP takes its whole budget.
_REPRODUCTION = {"mkd": {"eval_every": 1}, "dp": {"target_accuracy": 1.0}}

SCALES = {
    "small": Scale(
        name="small",
        mnist=Config(model="mlp", dataset="mnist10k", local_batches=2, batch_size=16,
                     target_accuracy=0.9, max_iterations=60, eval_every=2, eval_peers="8",
                     checkpoint_every=0),
        options={**_REPRODUCTION,
                 "churn": {"dropouts": (0.0, 0.2, 0.5)},
                 "dp": {**_REPRODUCTION["dp"], "iterations": 40},
                 "byzantine": {"iterations": 30, "fractions": (0.0, 0.1, 0.2),
                               "attacks": ("sign_flip",), "algorithms": ("marfl", "fedavg")},
                 "asynchrony": {"setups": ("mlp@64",)}}),
    "full": Scale(
        name="full",
        mnist=Config(model="cnn", dataset="mnist", target_accuracy=0.95, max_iterations=500,
                     eval_every=5, eval_peers="8", checkpoint_every=25),
        paper_flagfiles=True,
        options={**_REPRODUCTION,
                 "dp": {**_REPRODUCTION["dp"], "iterations": 100},
                 "text": {"bbc_iterations": 500, "newsgroups_peers": (16, 64, 125),
                          "newsgroups_iterations": 1000},
                 "byzantine": {"iterations": 100, "fractions": (0.0, 0.1, 0.2)}}),
}


def with_defaults(scale: Scale, defaults: dict) -> Scale:
    """`scale` with `defaults` (Scale fields; "mnist": a dict of Config fields) replaced."""
    mnist = dataclasses.replace(scale.mnist, **defaults.get("mnist", {}))
    return dataclasses.replace(scale, mnist=mnist,
                               **{k: v for k, v in defaults.items() if k != "mnist"})


def with_options(scale: Scale, study: str, values: Mapping[str, Any]) -> Scale:
    """`scale` with the settings `values` of the study `study` given on top of its own."""
    options = {**scale.options, study: {**scale.options.get(study, {}), **values}}
    return dataclasses.replace(scale, options=options)


def config_from_flagfile(path: str, **overrides) -> Config:
    """The Config a launch flagfile (`--name=value` lines, `#` comments) describes, with
    `overrides` applied on top. Unknown flags raise ValueError naming the file."""
    fields = {f.name: f for f in dataclasses.fields(Config)}
    values = {}
    with open(path) as f:
        for line in f:
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            name, _, value = line.removeprefix("--").partition("=")
            if name not in fields:
                raise ValueError(f"{path}: --{name} is not a flag of launch.train")
            default = fields[name].default
            values[name] = (value.lower() in ("1", "true") if isinstance(default, bool) else
                            type(default)(value))
    return Config(**{**values, **overrides})


def moshpit_grid(num_peers: int) -> tuple[int, int, str]:
    """(group size M, key dimension d, schedule) for N peers: a perfect grid N = M^d with the
    smallest M in 4..8 (then 2, 3) and the authors' keys, else M = 4 and the exact mixed-radix
    schedule with d = round(log4 N) axes."""
    for m in (4, 5, 6, 7, 8, 2, 3):
        d = round(math.log(num_peers, m)) if num_peers > 1 else 1
        if d >= 1 and m**d == num_peers:
            return m, d, "authors"
    return 4, max(1, round(math.log(num_peers, 4))), "mixed_radix"


def mnist_config(scale: Scale, num_peers: int, workdir: str) -> Config:
    """The MNIST setting at N peers: the paper's flagfile for N, or the scale's shared setting
    on `moshpit_grid(N)`."""
    if scale.paper_flagfiles:
        return config_from_flagfile(
            os.path.join(CONFIG_DIR, f"mnist_n{num_peers}.cfg"), dataset=scale.mnist.dataset,
            data_dir=scale.mnist.data_dir, eval_peers=scale.mnist.eval_peers,
            checkpoint_every=scale.mnist.checkpoint_every, replicas=scale.mnist.replicas,
            workdir=workdir)
    m, d, schedule = moshpit_grid(num_peers)
    return dataclasses.replace(scale.mnist, num_peers=num_peers, group_size=m, key_dim=d,
                               schedule=schedule, workdir=workdir)


def peer_configs(base: Config, peer_counts: Iterable[int],
                 algorithm_names: Sequence[str]) -> list[Config]:
    """Every algorithm at every N (MAR-FL on `moshpit_grid(N)`), workdirs `n{N}_{algorithm}`."""
    configs = []
    for n in peer_counts:
        m, d, schedule = moshpit_grid(n)
        for name in algorithm_names:
            configs.append(dataclasses.replace(
                base, num_peers=n, group_size=m, key_dim=d, schedule=schedule, algorithm=name,
                workdir=os.path.join(base.workdir, f"n{n}_{name}")).validate())
    return configs
