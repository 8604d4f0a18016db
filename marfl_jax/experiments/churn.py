"""Churn: each aggregating peer drops out with probability p for the whole aggregation; final
accuracy and bytes to the target against p (section 2 of the reproduction).

    python -m launch.compare --study=churn       # N=64, dropout 0 / 0.1 / 0.2 / 0.5
    python -m launch.compare --study=churn --option=dropouts=0,0.5 --option=algorithms=marfl
    python -m launch.reproduce --experiments=churn

Settings (`--option=NAME=V1,V2`, `STUDY.options`): `dropouts` (default 0, 0.1, 0.2, 0.5; alias
`--dropouts`), `algorithms` (marfl, fedavg, rdfl; `--algorithms`); N is `--churn_peers` (64).
Writes `churn.csv` and `churn.png`.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterable, Sequence

from marfl_jax import plotting
from marfl_jax.config import Config
from marfl_jax.report import describe, pct, set_of
from marfl_jax.scales import mnist_config, moshpit_grid
from marfl_jax.sweep import RESULT_COLUMNS, Option, Study


def churn_configs(base: Config, dropouts: Iterable[float],
                  algorithm_names: Sequence[str]) -> list[Config]:
    """Every algorithm at every dropout probability, workdirs `{algorithm}_dropout{p}`."""
    m, d, schedule = moshpit_grid(base.num_peers)
    return [dataclasses.replace(
        base, group_size=m, key_dim=d, schedule=schedule, algorithm=name, dropout=p,
        workdir=os.path.join(base.workdir, f"{name}_dropout{p:g}")).validate()
        for name in algorithm_names for p in dropouts]


OPTIONS = {
    "dropouts": Option((0.0, 0.1, 0.2, 0.5), float, "dropout probabilities p"),
    "algorithms": Option(("marfl", "fedavg", "rdfl"), str, "the algorithms"),
}


def configs(scale, workdir):
    options = STUDY.options_of(scale)
    return churn_configs(mnist_config(scale, scale.study_peers, workdir), options.dropouts,
                         options.algorithms)


def setting(scale, configs):
    options = STUDY.options_of(scale)
    return (f"N = {scale.study_peers}; each aggregating peer drops out with probability "
            f"p in {set_of(options.dropouts)} for the whole "
            f"aggregation; {', '.join(options.algorithms)}; {describe(configs[0])}.")


def summarize(rows) -> str:
    parts = []
    for name in sorted({r["algorithm"] for r in rows}):
        mine = sorted((r for r in rows if r["algorithm"] == name), key=lambda r: r["dropout"])
        first, last = mine[0], mine[-1]
        parts.append(f"{name}: {pct(first['final_accuracy'])} at p = {first['dropout']:g}, "
                     f"{pct(last['final_accuracy'])} at p = {last['dropout']:g} "
                     f"(target {'reached' if last['reached_target'] else 'not reached'} "
                     f"at p = {last['dropout']:g}).")
    return " ".join(parts)


STUDY = Study(
    name="churn",
    configs=configs,
    options=OPTIONS,
    draw=lambda rows, curves, configs, path: plotting.plot_churn(rows, path),
    section=2,
    title="Churn: peers dropping out of the aggregation",
    claim=("MAR-FL is robust to unreliable peers: with peers dropping out of the "
           "aggregation it keeps learning (absent peers keep their models and rejoin), "
           "unlike RDFL, whose relay ring breaks at absent peers."),
    setting=setting,
    columns=(("algorithm", "algorithm"), ("dropout", "dropout p"), *RESULT_COLUMNS),
    summarize=summarize)
