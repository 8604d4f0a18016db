"""Sweeps over configs that share data, model and ledger: the scaling and churn studies.

A study is a list of Configs (each with its own workdir) and one row of results per run.
`run_study` reuses runs already finished in their workdirs (`experiment.run` resumes or returns
them), so an interrupted sweep continues where it stopped.
"""

from __future__ import annotations

import csv
import dataclasses
import math
import os
from collections.abc import Iterable, Sequence

from marfl_jax import algorithms, experiment
from marfl_jax.config import Config

ROW_FIELDS = ("num_peers", "algorithm", "schedule", "group_size", "rounds", "dropout",
              "bytes_per_iteration", "iterations", "reached_target", "iterations_to_target",
              "bytes_to_target", "final_accuracy", "best_accuracy", "wall_seconds")


def moshpit_grid(num_peers: int) -> tuple[int, int, str]:
    """(group size M, key dimension d, schedule) for N peers: a perfect grid N = M^d with the
    smallest M in 4..8 (then 2, 3) and the authors' keys, else M = 4 and the exact mixed-radix
    schedule with d = round(log4 N) axes."""
    for m in (4, 5, 6, 7, 8, 2, 3):
        d = round(math.log(num_peers, m)) if num_peers > 1 else 1
        if d >= 1 and m**d == num_peers:
            return m, d, "authors"
    return 4, max(1, round(math.log(num_peers, 4))), "mixed_radix"


def scaling_configs(base: Config, peer_counts: Iterable[int],
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


def churn_configs(base: Config, dropouts: Iterable[float],
                  algorithm_names: Sequence[str]) -> list[Config]:
    """Every algorithm at every dropout probability, workdirs `{algorithm}_dropout{p}`."""
    m, d, schedule = moshpit_grid(base.num_peers)
    return [dataclasses.replace(
        base, group_size=m, key_dim=d, schedule=schedule, algorithm=name, dropout=p,
        workdir=os.path.join(base.workdir, f"{name}_dropout{p:g}")).validate()
        for name in algorithm_names for p in dropouts]


def result_row(config: Config, result: experiment.RunResult) -> dict:
    summary, metrics = result
    reached = summary["iteration_reached_target"]
    is_marfl = config.algorithm == "marfl"
    return {
        "num_peers": config.num_peers,
        "algorithm": config.algorithm,
        "schedule": config.schedule if is_marfl else "",
        "group_size": config.group_size if is_marfl else "",
        "rounds": algorithms.make_algorithm(config).num_rounds,
        "dropout": config.dropout,
        "bytes_per_iteration": round(summary["cumulative_bytes"] / max(len(metrics), 1)),
        "iterations": summary["iterations"],
        "reached_target": summary["reached_target"],
        "iterations_to_target": "" if reached is None else reached + 1,
        "bytes_to_target": "" if reached is None else summary["bytes_to_target"],
        "final_accuracy": summary["final_accuracy"],
        "best_accuracy": summary["best_accuracy"],
        "wall_seconds": summary["wall_seconds"],
    }


def run_study(configs: Sequence[Config], on_row=None) -> list[dict]:
    """Runs (or reuses) every config; calls on_row(row) as each finishes."""
    rows = []
    for config in configs:
        rows.append(result_row(config, experiment.run(config)))
        if on_row is not None:
            on_row(rows[-1])
    return rows


def write_csv(rows: Sequence[dict], path: str) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=ROW_FIELDS)
        writer.writeheader()
        writer.writerows(rows)
