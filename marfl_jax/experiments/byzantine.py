"""Byzantine peers: honest accuracy after a fixed number of iterations, for fractions of attackers
x attacks x group rules x algorithms x placement (what small Moshpit groups buy, or cost,
against the server's single robust aggregate).

    python -m launch.compare --study=byzantine                    # the whole grid (long)
    python -m launch.compare --study=byzantine --option=algorithms=marfl,fedavg \\
        --option=fractions=0,0.1,0.2 --option=attacks=sign_flip,alie,label_flip   # results/

Settings (`--option=NAME=V1,V2`): `fractions` (default 0, 0.05, 0.1, 0.2), `attacks`
(sign_flip, gaussian, alie, ipm, label_flip), `rules` (mean, median, trimmed_mean,
centered_clip), `placements` (random, collude; for algorithms whose groups come from keys,
MAR-FL: a server's one group or random pairs leave colluders no key to choose) and
`algorithms` (marfl, fedavg, gossip); flags `--churn_peers` (N, default 64), `--model`,
`--max_iterations` (default 30: every run takes them all, no target). Each run's rule tolerates
f = max(1, ceil(fraction * M)) copies (M its largest group, at most (M - 1) // 2): what a group
of M holds at that fraction on average, as a defender sizing the rule would assume; centered
clipping uses tau = 1 and 3 iterations. Accuracy is over the honest peers only. Writes
`byzantine.csv` and `byzantine.png` (a heat map per attack and fraction: honest final accuracy
for each algorithm and placement x rule).
"""

from __future__ import annotations

import dataclasses
import math
import os

from marfl_jax import algorithms
from marfl_jax.config import Config
from marfl_jax.scales import mnist_config, moshpit_grid
from marfl_jax.sweep import Study

FRACTIONS = (0.0, 0.05, 0.1, 0.2)
ATTACKS = ("sign_flip", "gaussian", "alie", "ipm", "label_flip")
RULES = ("mean", "median", "trimmed_mean", "centered_clip")
PLACEMENTS = ("random", "collude")
CLIP = dict(clip_tau=1.0, clip_iterations=3)
FIELDS = ("algorithm", "placement", "fraction", "byzantine_peers", "attack", "rule",
          "aggregator_f", "group_size", "iterations", "final_accuracy", "accuracy_min",
          "accuracy_max", "consensus_after", "diverged", "bytes", "wall_seconds")


def tolerated(fraction: float, largest_group: int) -> int:
    """f = max(1, ceil(fraction * M)), at most (M - 1) // 2."""
    return min(max(1, math.ceil(fraction * largest_group - 1e-9)), (largest_group - 1) // 2)


def one_run(base: Config, algorithm: str, placement: str, fraction: float, attack: str,
            rule: str) -> Config:
    name = (f"{algorithm}_{placement}_f{fraction:g}_{attack}_{rule}" if fraction
            else f"{algorithm}_honest_{rule}")
    config = dataclasses.replace(
        base, algorithm=algorithm, byzantine_fraction=fraction,
        byzantine_placement=placement if fraction else "random",
        attack=attack if fraction else "none", aggregator=rule,
        workdir=os.path.join(base.workdir, name), **(CLIP if rule == "centered_clip" else {}))
    largest = algorithms.make_algorithm(config).max_group_size
    f = tolerated(fraction, largest) if largest > 2 else 0
    return dataclasses.replace(config, aggregator_f=f).validate()


def configs(scale, workdir):
    n = scale.study_peers
    m, d, schedule = moshpit_grid(n)
    base = dataclasses.replace(mnist_config(scale, n, workdir), group_size=m, key_dim=d,
                               schedule=schedule, target_accuracy=1.0, eval_every=10)
    runs = []
    for fraction in scale.option("fractions", FRACTIONS, float):
        for attack in scale.option("attacks", ATTACKS) if fraction else ("none",):
            for algorithm in scale.option("algorithms", ("marfl", "fedavg", "gossip")):
                keyed = algorithms.make_algorithm(
                    dataclasses.replace(base, algorithm=algorithm)).group_keys
                places = (scale.option("placements", PLACEMENTS) if fraction and keyed
                          else ("random",))  # Colluders choose keys; others have none.
                for placement in places:
                    runs += [one_run(base, algorithm, placement, fraction, attack, rule)
                             for rule in scale.option("rules", RULES)]
    return runs


def make_row(config: Config, result) -> dict:
    summary, metrics = result.summary, result.metrics
    evaluated = [r for r in metrics if r.get("accuracy") is not None]
    last = evaluated[-1] if evaluated else {}
    return {
        "algorithm": config.algorithm, "placement": config.byzantine_placement,
        "fraction": config.byzantine_fraction,
        "byzantine_peers": metrics[-1].get("byzantine_peers", 0) if metrics else 0,
        "attack": config.attack, "rule": config.aggregator, "aggregator_f": config.aggregator_f,
        "group_size": algorithms.make_algorithm(config).max_group_size,
        "iterations": summary["iterations"], "final_accuracy": summary["final_accuracy"],
        "accuracy_min": last.get("accuracy_min", ""), "accuracy_max": last.get("accuracy_max", ""),
        "consensus_after": metrics[-1]["consensus_after"] if metrics else "",
        "diverged": "diverged" in summary, "bytes": summary["cumulative_bytes"],
        "wall_seconds": summary["wall_seconds"]}


def draw(rows, curves, configs, path):
    """One heat map per (attack, fraction): rows algorithm/placement, columns rule."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = sorted({(r["attack"], r["fraction"]) for r in rows if r["fraction"]})
    lines = sorted({(r["algorithm"], r["placement"]) for r in rows})
    rules = [r for r in RULES if any(row["rule"] == r for row in rows)]
    honest = {(r["algorithm"], r["rule"]): r["final_accuracy"] for r in rows
              if not r["fraction"]}
    fig, axes = plt.subplots(1, max(len(panels), 1), figsize=(3.2 * max(len(panels), 1), 3.4),
                             squeeze=False)
    for ax, (attack, fraction) in zip(axes[0], panels, strict=False):
        cells = [[next((r["final_accuracy"] or 0.0 for r in rows
                        if (r["attack"], r["fraction"], r["algorithm"], r["placement"], r["rule"])
                        == (attack, fraction, a, p, rule)), float("nan")) for rule in rules]
                 for a, p in lines]
        ax.imshow(cells, vmin=0, vmax=1, cmap="RdYlGn")
        for i, line in enumerate(cells):
            for j, value in enumerate(line):
                ax.text(j, i, f"{100 * value:.0f}", ha="center", va="center", fontsize=8)
        ax.set_xticks(range(len(rules)), [r.replace("_", "\n") for r in rules], fontsize=7)
        ax.set_yticks(range(len(lines)), [f"{a} {p}" for a, p in lines], fontsize=7)
        ax.set_title(f"{attack}, {100 * fraction:g} % attackers", fontsize=9)
    best_honest = max(honest.values(), default=float("nan"))
    fig.suptitle(f"Honest peers' accuracy (%) after the run; no attackers: up to "
                 f"{100 * best_honest:.0f} %", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


STUDY = Study(
    name="byzantine",
    configs=configs,
    make_row=make_row,
    fields=FIELDS,
    draw=draw,
    defaults=dict(mnist=dict(max_iterations=30, eval_peers="all")),
)


def table(rows, fraction: float, attack: str) -> str:
    """A Markdown table of honest final accuracy: algorithm/placement x rule."""
    lines = sorted({(r["algorithm"], r["placement"]) for r in rows})
    rules = [r for r in RULES if any(row["rule"] == r for row in rows)]
    out = ["| algorithm, placement | " + " | ".join(rules) + " |",
           "|---|" + "---|" * len(rules)]
    for a, p in lines:
        cells = []
        for rule in rules:
            row = next((r for r in rows if (r["fraction"], r["attack"], r["algorithm"],
                                            r["placement"], r["rule"])
                        == (fraction, attack, a, p, rule)), None)
            cells.append("" if row is None else f"{100 * float(row['final_accuracy']):.1f} %"
                         + (" (diverged)" if str(row["diverged"]) == "True" else ""))
        out.append(f"| {a}, {p} | " + " | ".join(cells) + " |")
    return "\n".join(out)

