"""Sweeps over configs that share data, model and ledger: the scaling, churn, MKD, DP and
network studies.

A study is a list of Configs (each with its own workdir) and one row of results per run.
`run_study` reuses runs already finished in their workdirs (`runner.run` resumes or returns
them), so an interrupted sweep continues where it stopped.
"""

from __future__ import annotations

import csv
import dataclasses
import math
import os
from collections.abc import Iterable, Sequence

from marfl_jax import algorithms, runner
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


# The network study's peer profiles (`--network` and its flags; docs/running.md, "Simulated time"):
# everyone on the default links, log-normal links and speeds around them, and the same with a
# round deadline that turns the slowest peers into absentees.
NETWORK_PROFILES = {
    "uniform": dict(network="uniform"),
    "lognormal": dict(network="lognormal"),
    "deadline": dict(network="lognormal", round_timeout_s=30.0),
}
NETWORK_FIELDS = ("profile", *ROW_FIELDS[:2], "iterations_to_target", "sim_seconds_to_target",
                  "sim_seconds_per_iteration", "comm_share", "stragglers_per_iteration",
                  "bytes_to_target", "final_accuracy", "wall_seconds")


def network_configs(base: Config, peer_counts: Iterable[int], algorithm_names: Sequence[str],
                    profiles: Sequence[str]) -> list[Config]:
    """Every algorithm at every N under every profile of NETWORK_PROFILES, workdirs
    `{profile}/n{N}_{algorithm}`."""
    unknown = [p for p in profiles if p not in NETWORK_PROFILES]
    if unknown:
        raise ValueError(f"--profiles: unknown {', '.join(unknown)}; allowed: "
                         f"{', '.join(NETWORK_PROFILES)}")
    configs = []
    for profile in profiles:
        nested = dataclasses.replace(base, workdir=os.path.join(base.workdir, profile),
                                     **NETWORK_PROFILES[profile])
        configs += scaling_configs(nested, peer_counts, algorithm_names)
    return configs


def network_row(config: Config, result: runner.RunResult) -> dict:
    """Simulated time to the target and per iteration, the communication's share of it, the
    stragglers cut off per iteration, and bytes."""
    summary, metrics = result.summary, result.metrics
    reached = summary["iteration_reached_target"]
    total = sum(r["sim_seconds"] for r in metrics)
    profile = os.path.basename(os.path.dirname(os.path.normpath(config.workdir)))
    return {
        "profile": profile,
        "num_peers": config.num_peers,
        "algorithm": config.algorithm,
        "iterations_to_target": "" if reached is None else reached + 1,
        "sim_seconds_to_target": ("" if reached is None
                                  else round(summary["sim_seconds_to_target"], 1)),
        "sim_seconds_per_iteration": round(total / max(len(metrics), 1), 2),
        "comm_share": round(sum(r["sim_comm_seconds"] for r in metrics) / max(total, 1e-9), 3),
        "stragglers_per_iteration": round(sum(r["stragglers"] for r in metrics)
                                          / max(len(metrics), 1), 2),
        "bytes_to_target": "" if reached is None else summary["bytes_to_target"],
        "final_accuracy": summary["final_accuracy"],
        "wall_seconds": summary["wall_seconds"],
    }


CODEC_FIELDS = ("run", "algorithm", "codec", "share_momentum", "payloads_per_message",
                "bytes_per_iteration", "iterations", "iterations_to_target", "bytes_to_target",
                "final_accuracy", "best_accuracy", "wall_seconds")


def codec_configs(base: Config, codecs: Sequence[str], algorithm_names: Sequence[str] = ("marfl",),
                  share_momentum: Sequence[bool] = (True, False)) -> list[Config]:
    """Every algorithm with every codec, with and without momentum in the messages. Workdirs
    `{codec}_{momentum|weights}`, prefixed `{algorithm}_` when there are several algorithms."""
    def name(algorithm, codec, share):
        run = f"{codec}_{'momentum' if share else 'weights'}"
        return run if len(algorithm_names) == 1 else f"{algorithm}_{run}"

    return [dataclasses.replace(
        base, algorithm=algorithm, codec=codec, share_momentum=share,
        workdir=os.path.join(base.workdir, name(algorithm, codec, share))).validate()
        for algorithm in algorithm_names for share in share_momentum for codec in codecs]


def codec_row(config: Config, result: runner.RunResult) -> dict:
    summary, metrics = result.summary, result.metrics
    target = first_reaching(metrics, config.target_accuracy)
    return {
        "run": os.path.basename(config.workdir),
        "algorithm": config.algorithm,
        "codec": config.codec,
        "share_momentum": config.share_momentum,
        "payloads_per_message": 2 if config.share_momentum else 1,
        "bytes_per_iteration": round(summary["cumulative_bytes"] / max(len(metrics), 1)),
        "iterations": summary["iterations"],
        "iterations_to_target": "" if target is None else target["iteration"] + 1,
        "bytes_to_target": "" if target is None else target["cumulative_bytes"],
        "final_accuracy": summary["final_accuracy"],
        "best_accuracy": summary["best_accuracy"],
        "wall_seconds": summary["wall_seconds"],
    }


MKD_FIELDS = ("run", "mkd", "mkd_teacher_fraction", "mkd_iterations", "iterations",
              "iterations_to_50", "bytes_to_50", "iterations_to_target", "bytes_to_target",
              "mkd_bytes", "final_accuracy", "best_accuracy", "wall_seconds")


def mkd_configs(base: Config, teacher_fractions: Iterable[float],
                mkd_iterations: int) -> list[Config]:
    """MAR-FL without MKD (workdir `no_mkd`) and with MKD at each teacher fraction rho
    (`mkd_rho{rho}`), everything else as in `base`."""
    configs = [dataclasses.replace(base, algorithm="marfl", mkd=False,
                                   workdir=os.path.join(base.workdir, "no_mkd"))]
    for rho in teacher_fractions:
        configs.append(dataclasses.replace(
            base, algorithm="marfl", mkd=True, mkd_teacher_fraction=rho,
            mkd_iterations=mkd_iterations, workdir=os.path.join(base.workdir, f"mkd_rho{rho:g}")))
    return [c.validate() for c in configs]


DP_FIELDS = ("run", "dp", "noise_multiplier", "iterations", "final_accuracy", "best_accuracy",
             "dp_delta", "epsilon_rdp", "epsilon_pld", "epsilon_authors", "epsilon_authors_sweep",
             "final_clip", "cumulative_bytes", "wall_seconds")


def dp_configs(base: Config, noise_multipliers: Iterable[float]) -> list[Config]:
    """MAR-FL without DP (workdir `no_dp`) and with DP at each noise multiplier z (`dp_z{z}`)."""
    configs = [dataclasses.replace(base, dp=False, workdir=os.path.join(base.workdir, "no_dp"))]
    configs += [dataclasses.replace(base, dp=True, dp_noise_multiplier=z,
                                    workdir=os.path.join(base.workdir, f"dp_z{z:g}"))
                for z in noise_multipliers]
    return [c.validate() for c in configs]


def dp_row(config: Config, result: runner.RunResult) -> dict:
    """Final accuracy and epsilon (both accountants and the authors' formula) of one run."""
    summary, metrics = result.summary, result.metrics
    clips = [r["dp_clip"] for r in metrics if "dp_clip" in r]
    return {
        "run": os.path.basename(config.workdir),
        "dp": config.dp,
        "noise_multiplier": config.dp_noise_multiplier if config.dp else "",
        "iterations": summary["iterations"],
        "final_accuracy": summary["final_accuracy"],
        "best_accuracy": summary["best_accuracy"],
        **{name: summary.get(name, "") for name in (
            "dp_delta", "epsilon_rdp", "epsilon_pld", "epsilon_authors",
            "epsilon_authors_sweep")},
        "final_clip": clips[-1] if clips else "",
        "cumulative_bytes": summary["cumulative_bytes"],
        "wall_seconds": summary["wall_seconds"],
    }


def first_reaching(metrics: Sequence[dict], accuracy: float) -> dict | None:
    """The first evaluated row with accuracy >= `accuracy`, or None."""
    return next((r for r in metrics if r.get("accuracy", -1.0) >= accuracy), None)


def mkd_row(config: Config, result: runner.RunResult) -> dict:
    """Bytes and iterations to 50 % and to the target accuracy (iterations counted as done)."""
    summary, metrics = result.summary, result.metrics
    half, target = first_reaching(metrics, 0.5), first_reaching(metrics, config.target_accuracy)
    return {
        "run": os.path.basename(config.workdir),
        "mkd": config.mkd,
        "mkd_teacher_fraction": config.mkd_teacher_fraction if config.mkd else "",
        "mkd_iterations": config.mkd_iterations if config.mkd else "",
        "iterations": summary["iterations"],
        "iterations_to_50": "" if half is None else half["iteration"] + 1,
        "bytes_to_50": "" if half is None else half["cumulative_bytes"],
        "iterations_to_target": "" if target is None else target["iteration"] + 1,
        "bytes_to_target": "" if target is None else target["cumulative_bytes"],
        "mkd_bytes": sum(r.get("mkd_bytes", 0) for r in metrics),
        "final_accuracy": summary["final_accuracy"],
        "best_accuracy": summary["best_accuracy"],
        "wall_seconds": summary["wall_seconds"],
    }


def result_row(config: Config, result: runner.RunResult) -> dict:
    summary, metrics = result.summary, result.metrics
    reached = summary["iteration_reached_target"]
    algorithm = algorithms.make_algorithm(config)
    keyed = algorithm.group_keys
    return {
        "num_peers": config.num_peers,
        "algorithm": config.algorithm,
        "schedule": config.schedule if keyed else "",
        "group_size": config.group_size if keyed else "",
        "rounds": algorithm.num_rounds,
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


def run_study(configs: Sequence[Config], on_row=None, make_row=result_row,
              on_result=None) -> list[dict]:
    """Runs (or reuses) every config; `make_row(config, result)` makes its row, and
    on_row(row) / on_result(config, result) are called as each finishes."""
    rows = []
    for config in configs:
        result = runner.run(config)
        rows.append(make_row(config, result))
        if on_result is not None:
            on_result(config, result)
        if on_row is not None:
            on_row(rows[-1])
    return rows


def write_csv(rows: Sequence[dict], path: str, fields: Sequence[str] = ROW_FIELDS) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
