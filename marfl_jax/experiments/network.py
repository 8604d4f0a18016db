"""Simulated time: every algorithm at every N under peer link profiles (uniform links,
log-normal links and speeds, log-normal with a 30 s round deadline); simulated time and bytes to
the target, time per iteration, the communication's share, stragglers (section 6 of the
reproduction; the paper reports bytes, not time: this study is ours).

    python -m launch.compare --study=network     # N in {16,64,125,1024}: marfl, fedavg, arfl, rdfl
    python -m launch.reproduce --experiments=network

Settings (`--option=NAME=V1,V2`, `STUDY.options`): `profiles` (default uniform, lognormal,
deadline, of NETWORK_PROFILES; alias `--profiles`); N and the algorithms are `--num_peers` and
`--algorithms`. Writes `network.csv` and `time_to_target.png`.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterable, Sequence

from marfl_jax import plotting
from marfl_jax.config import Config
from marfl_jax.report import describe, set_of
from marfl_jax.scales import mnist_config, peer_configs
from marfl_jax.sweep import ROW_FIELDS, Option, Study

REFERENCE = "marfl"  # The algorithm whose time the others' is divided by.
# The peer profiles (`--network` and its flags; docs/running.md, "Simulated time"): everyone on
# the default links, log-normal links and speeds around them, and the same with a round
# deadline that turns the slowest peers into absentees.
NETWORK_PROFILES = {
    "uniform": dict(network="uniform"),
    "lognormal": dict(network="lognormal"),
    "deadline": dict(network="lognormal", round_timeout_s=30.0),
}
FIELDS = ("profile", *ROW_FIELDS[:2], "iterations_to_target", "sim_seconds_to_target",
          "sim_seconds_per_iteration", "comm_share", "stragglers_per_iteration",
          "bytes_to_target", "final_accuracy", "wall_seconds")


def network_configs(base: Config, peer_counts: Iterable[int], algorithm_names: Sequence[str],
                    profiles: Sequence[str]) -> list[Config]:
    """Every algorithm at every N under every profile of NETWORK_PROFILES, workdirs
    `{profile}/n{N}_{algorithm}`."""
    unknown = [p for p in profiles if p not in NETWORK_PROFILES]
    if unknown:
        raise ValueError(f"--option=profiles: unknown {', '.join(unknown)}; allowed: "
                         f"{', '.join(NETWORK_PROFILES)}")
    configs = []
    for profile in profiles:
        nested = dataclasses.replace(base, workdir=os.path.join(base.workdir, profile),
                                     **NETWORK_PROFILES[profile])
        configs += peer_configs(nested, peer_counts, algorithm_names)
    return configs


OPTIONS = {"profiles": Option(tuple(NETWORK_PROFILES), str,
                              f"the peer profiles ({', '.join(NETWORK_PROFILES)})")}


def configs(scale, workdir):
    base = dataclasses.replace(mnist_config(scale, scale.peer_counts[0], workdir),
                               workdir=workdir)
    return network_configs(base, scale.peer_counts, scale.algorithms,
                           STUDY.options_of(scale).profiles)


def network_row(config: Config, result) -> dict:
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


def setting(scale, configs):
    return (f"The runs of section 1 (N in {set_of(scale.peer_counts)}, "
            f"{', '.join(scale.algorithms)}; {describe(configs[0])}) with the simulated clock "
            "(`marfl_jax/clock.py`): `uniform` = every peer 10 Mbit/s up, 50 down, 50 ms, "
            "100 examples/s, a 1 Gbit/s FedAvg server; `lognormal` = each rate log-normal "
            "around those (sigma 1 for links, 0.5 for speed); `deadline` = lognormal with "
            "a 30 s round deadline (`--round_timeout_s=30`), which cuts the slowest peers "
            "off. Coordination: the authors' 5 s participation count per iteration and "
            "50 ms DHT barriers.")


def summarize(rows, reference=REFERENCE) -> str:
    largest = max(r["num_peers"] for r in rows)
    parts = []
    for profile in dict.fromkeys(r["profile"] for r in rows):
        mine = {r["algorithm"]: r for r in rows
                if r["profile"] == profile and r["num_peers"] == largest}
        theirs = mine.get(reference, {}).get("sim_seconds_to_target", "")
        if theirs == "":
            parts.append(f"`{profile}`, N = {largest}: MAR-FL missed the target.")
            continue
        others = [f"{name} {r['sim_seconds_to_target'] / theirs:.2f}x" if
                  r["sim_seconds_to_target"] != "" else f"{name} never (target missed)"
                  for name, r in mine.items() if name != reference]
        parts.append(f"`{profile}`, N = {largest}: MAR-FL reached the target in "
                     f"{theirs / 3600:.2f} simulated hours; the others' time as a multiple of "
                     f"MAR-FL's: {', '.join(others)}.")
    return " ".join(parts)


STUDY = Study(
    name="network",
    configs=configs,
    options=OPTIONS,
    make_row=network_row,
    fields=FIELDS,
    draw=lambda rows, curves, configs, path: plotting.plot_time_to_target(rows, path),
    figure="time_to_target.png",
    defaults=dict(peer_counts=(16, 64, 125, 1024)),
    section=6,
    title="Simulated time: the same runs on bandwidth-limited links",
    claim=("MAR-FL is designed for bandwidth-limited wireless networks with unreliable "
           "peers: exchanging with a few group mates per round instead of every peer "
           "should make it faster than AR-FL and RDFL where uplinks are the bottleneck. "
           "(The paper reports bytes, not time; this experiment is ours.)"),
    setting=setting,
    columns=(("profile", "profile"), ("num_peers", "N"), ("algorithm", "algorithm"),
             ("iterations_to_target", "iterations to target"),
             ("sim_seconds_to_target", "simulated s to target"),
             ("sim_seconds_per_iteration", "simulated s / iteration"),
             ("comm_share", "communication's share"),
             ("stragglers_per_iteration", "stragglers / iteration"),
             ("final_accuracy", "final accuracy")),
    summarize=summarize)
