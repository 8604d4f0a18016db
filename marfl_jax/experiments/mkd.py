"""Moshpit Knowledge Distillation: MAR-FL without MKD and with MKD in the first K iterations
at each teacher fraction rho; iterations and bytes to 50 % and to the target, accuracy against
cumulative bytes (section 3 of the reproduction).

    python -m launch.compare --study=mkd         # N=64 CNN, b=4, B=16: no MKD vs rho 0.4 / 1.0
    python -m launch.reproduce --experiments=mkd

Settings (`--option=NAME=V1,V2`, `STUDY.options`): `fractions` (the teacher fractions rho,
default 0.4, 1; alias `--mkd_fractions`), `iterations` (K, default 8; `--mkd_iterations`),
`eval_every` (default: the shared `--eval_every`, 1 here: bytes to 50 % need every evaluation);
N is `--churn_peers` (64). Writes `mkd.csv` and `mkd.png`.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterable

from marfl_jax import plotting
from marfl_jax.config import Config
from marfl_jax.report import describe, set_of
from marfl_jax.scales import mnist_config
from marfl_jax.sweep import Option, Study, first_reaching

FIELDS = ("run", "mkd", "mkd_teacher_fraction", "mkd_iterations", "iterations",
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


OPTIONS = {
    "fractions": Option((0.4, 1.0), float, "the teacher fractions rho"),
    "iterations": Option(8, int, "K, the iterations that distil"),
    "eval_every": Option(None, int, "evaluate every k iterations (default: the shared "
                         "setting's eval_every; bytes to 50 % need every evaluation)"),
}


def configs(scale, workdir):
    options = STUDY.options_of(scale)
    base = mnist_config(scale, scale.study_peers, workdir)
    if options.eval_every is not None:
        base = dataclasses.replace(base, eval_every=options.eval_every)
    return mkd_configs(base, options.fractions, options.iterations)


def mkd_row(config: Config, result) -> dict:
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


def setting(scale, configs):
    options = STUDY.options_of(scale)
    every = configs[0].eval_every
    return (f"MAR-FL, N = {scale.study_peers}; without MKD, and with MKD in the first "
            f"K = {options.iterations} iterations keeping the fraction rho in "
            f"{set_of(options.fractions)} of the mates as "
            f"teachers (tau = 3, 8 distillation batches); {describe(configs[0])}, evaluated "
            + ("every iteration." if every == 1 else f"every {every} iterations."))


def summarize(rows) -> str:
    plain = next((r for r in rows if not r["mkd"]), None)
    parts = []
    for r in rows:
        if not r["mkd"]:
            continue
        if plain and plain["bytes_to_target"] != "" and r["bytes_to_target"] != "":
            change = r["bytes_to_target"] / plain["bytes_to_target"] - 1
            parts.append(f"MKD with rho = {r['mkd_teacher_fraction']:g} reached the target "
                         f"after {r['iterations_to_target']} iterations instead of "
                         f"{plain['iterations_to_target']}, with {change:+.1%} bytes.")
        else:
            parts.append(f"MKD with rho = {r['mkd_teacher_fraction']:g}: the target was not "
                         "reached by both runs, so no bytes-to-target comparison.")
    return " ".join(parts)


STUDY = Study(
    name="mkd",
    configs=configs,
    options=OPTIONS,
    make_row=mkd_row,
    fields=FIELDS,
    draw=lambda rows, curves, configs, path: plotting.plot_accuracy_vs_bytes(
        curves, path, (0.5, configs[0].target_accuracy)),
    defaults=dict(mnist=dict(model="cnn", target_accuracy=0.95, local_batches=4, eval_every=1,
                             max_iterations=60)),
    section=3,
    title="Moshpit Knowledge Distillation",
    claim=("Distilling from group mates in the first K iterations costs more per "
           "iteration (weights are exchanged once more: 1.5x the bytes of a plain "
           "iteration) but reaches the target accuracy with less communication in total."),
    setting=setting,
    columns=(("run", "run"), ("iterations_to_50", "iterations to 50 %"),
             ("bytes_to_50", "bytes to 50 %"),
             ("iterations_to_target", "iterations to target"),
             ("bytes_to_target", "bytes to target"), ("mkd_bytes", "MKD bytes"),
             ("final_accuracy", "final accuracy")),
    summarize=summarize)
