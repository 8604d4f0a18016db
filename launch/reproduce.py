"""Reproduces the MAR-FL paper's experiments and writes REPRODUCTION.md.

    python -m launch.reproduce --scale=small     # MLP, embedded MNIST: within 1 h on 2 CPU cores
    python -m launch.reproduce --scale=full --data_dir=/path/to/mnist   # the paper's settings
    python -m launch.reproduce --experiments=baselines,mkd --workdir=runs/repro

Experiments (the modules of `marfl_jax/experiments/` with a report section, in its order):
`baselines` (MNIST, N = 16, 64, 125; MAR-FL, FedAvg, AR-FL, RDFL), `churn`, `mkd`, `dp`, `text`
(BBC News; 20 Newsgroups with `--text_data_dir` or scikit-learn's cache), `network` (the
clock), `codec` (momentum and message codecs), `byzantine` (attackers and robust group rules,
beyond the paper). The scales are `marfl_jax.scales.SCALES`: the shared setting, the size, and
the settings each gives the studies (the others keep the defaults of the study's module).
Each section of the report is written from its study's record (`STUDY`), none by hand. Runs
go to `--workdir/<experiment>/<run>/`, figures to `results/reproduction/<scale>/` beside the
report. Finished runs are reused, so an
interrupted reproduction continues where it stopped; the report is rewritten after each
experiment. A run whose dataset is missing is listed in the report as not run, with the reason.
"""

from __future__ import annotations

import dataclasses
import os
import platform
import sys
import time

from absl import app, flags, logging

from marfl_jax import experiments, scales

flags.DEFINE_enum("scale", "small", list(scales.SCALES), "How large: small (MLP on the "
                  "embedded MNIST) or full (the paper's settings: CNN on the full MNIST).")
flags.DEFINE_list("experiments", list(experiments.paper_names()), "Which experiments, in order.")
flags.DEFINE_string("data_dir", "", "MNIST for --scale=full: a folder with the four IDX "
                    "files, or a TFDS data directory.")
flags.DEFINE_string("text_data_dir", "", "20 Newsgroups: 20news-bydate.tar.gz or its folder "
                    "('' = scikit-learn's cache).")
flags.DEFINE_string("workdir", None, "Where the runs go (default runs/reproduce/<scale>).")
flags.DEFINE_integer("replicas", None, "Replicas of every run (default: the scale's): the "
                     "tables give mean +- std over seeds seed .. seed + R - 1.")
flags.DEFINE_string("report", None, "The report (default REPRODUCTION.md for small, "
                    "REPRODUCTION_full.md for full).")
FLAGS = flags.FLAGS


def machine() -> str:
    import jax

    device = jax.devices()[0]
    return (f"{platform.machine()} Linux, {os.cpu_count()} CPU cores, JAX {jax.__version__} "
            f"on {jax.default_backend()} ({device.device_kind}, {jax.device_count()} device(s))")


def main(argv: list[str]) -> None:
    del argv
    from marfl_jax import report as markdown
    from marfl_jax import runtime, sweep
    from marfl_jax.config import Config

    runtime.configure(Config())  # The runs' numerics (defaults), before machine() starts jax.

    scale = scales.SCALES[FLAGS.scale]
    if FLAGS.text_data_dir:
        scale = scales.with_options(scale, "text", {"data_dir": FLAGS.text_data_dir})
    if FLAGS.replicas is not None:
        scale = dataclasses.replace(
            scale, mnist=dataclasses.replace(scale.mnist, replicas=FLAGS.replicas))
    if FLAGS.data_dir:
        scale = dataclasses.replace(
            scale, mnist=dataclasses.replace(scale.mnist, data_dir=FLAGS.data_dir))
    workdir = FLAGS.workdir or os.path.join("runs", "reproduce", FLAGS.scale)
    report = FLAGS.report or ("REPRODUCTION.md" if FLAGS.scale == "small"
                              else f"REPRODUCTION_{FLAGS.scale}.md")
    figure_dir = os.path.join(os.path.dirname(os.path.abspath(report)), "results",
                              "reproduction", FLAGS.scale)
    try:
        studies = experiments.paper(scale, workdir, FLAGS.experiments)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)

    logging.set_verbosity(logging.WARNING)
    command = "python -m launch.reproduce " + " ".join(sys.argv[1:])
    start, outcomes, description = time.time(), [], machine()
    for study, configs in studies:
        print(f"== {study.title}: {len(configs)} runs", flush=True)
        outcomes.append(sweep.run(
            study, configs, os.path.join(figure_dir, f"{study.name}.png"),
            on_row=lambda row: print("  ", _brief(row), flush=True)))
        markdown.write_report(outcomes, report, scale=scale, command=command.strip(),
                              machine=description, wall_seconds=time.time() - start)
    print(f"wrote {report} ({time.time() - start:.0f} s)")


def _brief(row: dict) -> str:
    keys = ("run", "num_peers", "algorithm", "dropout", "dataset", "final_accuracy",
            "iterations", "iterations_to_target", "wall_seconds")
    return "  ".join(f"{k}={row[k]:.4g}" if isinstance(row[k], float) else f"{k}={row[k]}"
                     for k in keys if k in row)


if __name__ == "__main__":
    app.run(main)
