"""The communication-scaling study: every algorithm at several N, same data, model and ledger.

    python -m launch.compare                                  # default sweep, ~RUNTIME on 2 cores
    python -m launch.compare --num_peers=16,64 --algorithms=marfl,arfl --workdir=runs/small

For each N and algorithm it runs `experiment.run` (MLP on the embedded MNIST by default) until
`--target_accuracy` or `--max_iterations`, then writes `scaling.csv` (bytes per iteration, bytes
and iterations to the target, final accuracy) and `bytes_per_iteration.png` (log-log against N,
with N log N and N^2 guides) into `--workdir`. MAR-FL uses a perfect Moshpit grid where N = M^d
for M in 4..8 (the paper's N=125 is 5x5x5) and otherwise the exact mixed-radix schedule.
Finished runs (a `summary.json` beside an identical `config.json`) are reused, so an interrupted
sweep picks up where it stopped.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
import sys

from absl import app, flags, logging

from marfl_jax.config import Config, ConfigError

flags.DEFINE_list("num_peers", ["16", "64", "125", "256", "1024"], "Peer counts N.")
flags.DEFINE_list("algorithms", ["marfl", "fedavg", "arfl", "rdfl", "gossip"], "Algorithms.")
flags.DEFINE_string("model", "mlp", "Model (cnn | mlp).")
flags.DEFINE_string("dataset", "mnist10k", "Dataset.")
flags.DEFINE_string("data_dir", "", "Data folder (see launch.train).")
flags.DEFINE_float("target_accuracy", 0.9, "Target test accuracy.")
flags.DEFINE_integer("max_iterations", 60, "Iteration budget per run.")
flags.DEFINE_integer("local_batches", 2, "Local mini-batches b per iteration.")
flags.DEFINE_integer("batch_size", 16, "Mini-batch size B.")
flags.DEFINE_integer("eval_every", 2, "Evaluate every k iterations.")
flags.DEFINE_integer("seed", 0, "Seed.")
flags.DEFINE_string("workdir", "runs/compare", "Output folder.")
FLAGS = flags.FLAGS

CSV_FIELDS = ("num_peers", "algorithm", "schedule", "group_size", "rounds", "bytes_per_iteration",
              "iterations", "reached_target", "iterations_to_target", "bytes_to_target",
              "final_accuracy", "wall_seconds")


def moshpit_grid(num_peers: int) -> tuple[int, int, str]:
    """(group size M, key dimension d, schedule) for N peers: a perfect grid N = M^d with the
    smallest M in 4..8 (then 2, 3), else M = 4 and the mixed-radix schedule with d = round(log4 N).
    """
    for m in (4, 5, 6, 7, 8, 2, 3):
        d = round(math.log(num_peers, m)) if num_peers > 1 else 1
        if d >= 1 and m**d == num_peers:
            return m, d, "authors"
    return 4, max(1, round(math.log(num_peers, 4))), "mixed_radix"


def study_configs(base: Config, peer_counts, algorithm_names) -> list[Config]:
    configs = []
    for n in peer_counts:
        m, d, schedule = moshpit_grid(n)
        for name in algorithm_names:
            configs.append(dataclasses.replace(
                base, num_peers=n, group_size=m, key_dim=d, schedule=schedule, algorithm=name,
                workdir=os.path.join(base.workdir, f"n{n}_{name}")).validate())
    return configs


def run_or_reuse(config: Config) -> tuple[dict, list[dict]]:
    """Runs config unless its workdir already holds a finished run of the same config."""
    from marfl_jax import experiment

    summary_path = os.path.join(config.workdir, "summary.json")
    config_path = os.path.join(config.workdir, "config.json")
    if os.path.exists(summary_path) and os.path.exists(config_path):
        with open(config_path) as f:
            if Config.from_dict(json.load(f)) == config:
                with open(summary_path) as f:
                    summary = json.load(f)
                with open(os.path.join(config.workdir, "metrics.jsonl")) as f:
                    return summary, [json.loads(line) for line in f]
    result = experiment.run(config)
    return result.summary, result.metrics


def study_row(config: Config, summary: dict, metrics: list[dict]) -> dict:
    from marfl_jax import algorithms

    algorithm = algorithms.make_algorithm(config)
    reached = summary["iteration_reached_target"]
    return {
        "num_peers": config.num_peers,
        "algorithm": config.algorithm,
        "schedule": config.schedule if config.algorithm == "marfl" else "",
        "group_size": config.group_size if config.algorithm == "marfl" else "",
        "rounds": algorithm.num_rounds,
        "bytes_per_iteration": metrics[0]["bytes"],
        "iterations": summary["iterations"],
        "reached_target": summary["reached_target"],
        "iterations_to_target": "" if reached is None else reached + 1,
        "bytes_to_target": "" if reached is None else metrics[reached]["cumulative_bytes"],
        "final_accuracy": summary["final_accuracy"],
        "wall_seconds": summary["wall_seconds"],
    }


def main(argv):
    del argv
    base = Config(model=FLAGS.model, dataset=FLAGS.dataset, data_dir=FLAGS.data_dir,
                  target_accuracy=FLAGS.target_accuracy, max_iterations=FLAGS.max_iterations,
                  local_batches=FLAGS.local_batches, batch_size=FLAGS.batch_size,
                  eval_every=FLAGS.eval_every, seed=FLAGS.seed, workdir=FLAGS.workdir,
                  eval_peers="8")
    try:
        configs = study_configs(base, [int(n) for n in FLAGS.num_peers], FLAGS.algorithms)
    except (ConfigError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    from marfl_jax import plotting

    logging.set_verbosity(logging.WARNING)
    os.makedirs(FLAGS.workdir, exist_ok=True)
    rows = []
    for config in configs:
        summary, metrics = run_or_reuse(config)
        rows.append(study_row(config, summary, metrics))
        row = rows[-1]
        print(f"N={row['num_peers']:>5} {row['algorithm']:>6}: "
              f"{row['bytes_per_iteration']:>16,} B/iteration, final accuracy "
              f"{row['final_accuracy']:.4f}, to target: {row['iterations_to_target'] or '-'} "
              f"iterations, {row['bytes_to_target'] or '-'} B ({row['wall_seconds']:.0f} s)",
              flush=True)
    csv_path = os.path.join(FLAGS.workdir, "scaling.csv")
    with open(csv_path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        writer.writeheader()
        writer.writerows(rows)
    plot_path = os.path.join(FLAGS.workdir, "bytes_per_iteration.png")
    plotting.plot_bytes_per_iteration(rows, plot_path)
    print(f"wrote {csv_path} and {plot_path}")


if __name__ == "__main__":
    app.run(main)
