"""Differential privacy with adaptive clipping: MAR-FL without DP and with DP at each noise
multiplier z; final accuracy and epsilon from the RDP and PLD accountants and the authors'
formula, accuracy over iterations (section 4 of the reproduction).

    python -m launch.compare --study=dp          # N=64 CNN, 40 iterations: no DP vs z 0.2 / 0.5 / 1
    python -m launch.reproduce --experiments=dp

Settings (`--option=NAME=V1,V2`, `STUDY.options`): `noise_multipliers` (default 0.2, 0.5, 1;
alias `--dp_noise_multipliers`), `iterations` and `target_accuracy` (default: the shared
`--max_iterations`, 40 here, and `--target_accuracy`, 1.0 here: every run takes them all); N is
`--churn_peers` (64). Writes `dp.csv` and `dp.png`.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterable

from marfl_jax import plotting
from marfl_jax.config import Config
from marfl_jax.report import describe, num, pct, set_of
from marfl_jax.scales import mnist_config
from marfl_jax.sweep import Option, Study

FIELDS = ("run", "dp", "noise_multiplier", "iterations", "final_accuracy", "best_accuracy",
          "dp_delta", "epsilon_rdp", "epsilon_pld", "epsilon_authors", "epsilon_authors_sweep",
          "final_clip", "cumulative_bytes", "wall_seconds")


def dp_configs(base: Config, noise_multipliers: Iterable[float]) -> list[Config]:
    """MAR-FL without DP (workdir `no_dp`) and with DP at each noise multiplier z (`dp_z{z}`)."""
    configs = [dataclasses.replace(base, dp=False, workdir=os.path.join(base.workdir, "no_dp"))]
    configs += [dataclasses.replace(base, dp=True, dp_noise_multiplier=z,
                                    workdir=os.path.join(base.workdir, f"dp_z{z:g}"))
                for z in noise_multipliers]
    return [c.validate() for c in configs]


OPTIONS = {
    "noise_multipliers": Option((0.2, 0.5, 1.0), float, "the noise multipliers z"),
    "iterations": Option(None, int, "each run's iterations (default: the shared setting's "
                         "max_iterations)"),
    "target_accuracy": Option(None, float, "the target accuracy (default: the shared "
                              "setting's; 1.0: every run takes all its iterations)"),
}


def configs(scale, workdir):
    options = STUDY.options_of(scale)
    base = mnist_config(scale, scale.study_peers, workdir)
    base = dataclasses.replace(base, **{
        field: value for field, value in (("max_iterations", options.iterations),
                                          ("target_accuracy", options.target_accuracy))
        if value is not None})
    return dp_configs(base, options.noise_multipliers)


def dp_row(config: Config, result) -> dict:
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


def setting(scale, configs):
    return (f"MAR-FL, N = {scale.study_peers}, {configs[0].max_iterations} iterations, full "
            "participation; without DP and with noise multiplier z in "
            f"{set_of(STUDY.options_of(scale).noise_multipliers)} (initial clip "
            "0.1, target quantile 0.5, server lr 0.1, server momentum 0.9, delta = "
            f"N^-1.1); {describe(configs[0])}. Epsilon from dp-accounting's RDP and PLD "
            "accountants, the authors' formula beside them.")


def summarize(rows) -> str:
    plain = next((r for r in rows if not r["dp"]), None)
    parts = [f"Without DP: {pct(plain['final_accuracy'])}." if plain else ""]
    for r in rows:
        if r["dp"]:
            parts.append(f"z = {r['noise_multiplier']:g}: {pct(r['final_accuracy'])}, "
                         f"epsilon {num(r['epsilon_rdp'])} (RDP) / {num(r['epsilon_pld'])} "
                         f"(PLD) / {num(r['epsilon_authors'])} (authors' formula).")
    return " ".join(p for p in parts if p)


STUDY = Study(
    name="dp",
    configs=configs,
    options=OPTIONS,
    make_row=dp_row,
    fields=FIELDS,
    draw=lambda rows, curves, configs, path: plotting.plot_accuracy_vs_iteration(curves, path),
    defaults=dict(mnist=dict(model="cnn", target_accuracy=1.0, local_batches=4, eval_every=2,
                             max_iterations=40)),
    section=4,
    title="Differential privacy with adaptive clipping",
    claim=("Decentralized DP-FedAvg with adaptive clipping trades accuracy for privacy: "
           "more noise, a smaller epsilon, a lower accuracy. The authors bound epsilon with "
           "a closed-form RDP expression at a fixed order."),
    setting=setting,
    columns=(("run", "run"), ("final_accuracy", "final accuracy"),
             ("epsilon_rdp", "epsilon (RDP)"), ("epsilon_pld", "epsilon (PLD)"),
             ("epsilon_authors", "epsilon (authors' formula)"),
             ("cumulative_bytes", "bytes")),
    summarize=summarize)
