"""Sweeps that compare algorithms on equal terms: same data, model, loop and ledger.

    python -m launch.compare                     # scaling study: N in {16,64,125,256,1024}
    python -m launch.compare --study=churn       # churn study: N=64, dropout 0 / 0.1 / 0.2 / 0.5
    python -m launch.compare --num_peers=16,64 --algorithms=marfl,arfl --workdir=runs/small
    python -m launch.compare --study=mkd         # MKD study: N=64 CNN, no MKD vs rho 0.4 / 1.0
    python -m launch.compare --study=dp          # DP study: N=64 CNN, no DP vs z 0.2 / 0.5 / 1
    python -m launch.compare --study=network     # every algorithm's simulated time to target
    python -m launch.compare --study=codec       # N=64 CNN: each codec, with / without momentum
    python -m launch.compare --study=codec --algorithms=marfl,fedavg,arfl,rdfl,gossip --model=mlp

* `scaling`: every algorithm at every N (MLP on the embedded MNIST by default) until
  `--target_accuracy` or `--max_iterations`; writes `scaling.csv` and `bytes_per_iteration.png`
  (log-log against N, with N log N and N^2 guides). MAR-FL runs on a perfect Moshpit grid where
  N = M^d (the paper's N=125 is 5x5x5), else on the exact mixed-radix schedule.
* `churn`: MAR-FL, FedAvg and RDFL at N=64 for each `--dropouts` value; writes `churn.csv` and
  `churn.png` (final accuracy and bytes to the target against dropout).
* `mkd`: MAR-FL at N=64 with the paper's CNN on the default run's settings (b=4, B=16,
  evaluation every iteration, target 95 %), without MKD and with MKD for `--mkd_iterations`
  iterations at each `--mkd_fractions` rho; writes `mkd.csv` (iterations and bytes to 50 % and
  to the target) and `mkd.png` (accuracy against cumulative bytes).
* `dp`: MAR-FL at N=64 with the paper's CNN for `--max_iterations` (40) iterations, without DP
  and with DP at each `--dp_noise_multipliers` z; writes `dp.csv` (final accuracy, epsilon from
  the RDP and PLD accountants and the authors' formula) and `dp.png` (accuracy over iterations).
* `network`: every algorithm (`--algorithms`, default marfl, fedavg, arfl, rdfl) at each
  `--num_peers` (default 16, 64, 125, 1024) under each `--profiles` entry (uniform links,
  log-normal links and speeds, and log-normal with a 30 s round deadline; `studies.
  NETWORK_PROFILES`); writes `network.csv` (simulated time and bytes to the target, time per
  iteration, communication's share, stragglers) and `time_to_target.png`.
* `codec`: MAR-FL (or each of `--algorithms`) at N=64 with the paper's CNN on the default
  run's settings (b=4, B=16, evaluation every iteration, target 95 %) for each `--codecs`
  entry, with momentum in the messages and without (`--share_momentum=false`); writes
  `codec.csv` (bytes and iterations to the target) and `codec.png` (accuracy against
  cumulative bytes for one algorithm; bytes to the target per algorithm for several).
Flags the user does not set take each study's defaults (the `mkd` study's differ; see
`STUDY_DEFAULTS`). Runs already finished in their workdirs are reused, so an interrupted sweep
picks up where it stopped.
"""

from __future__ import annotations

import dataclasses
import os
import sys

from absl import app, flags, logging

from marfl_jax.config import Config, ConfigError

flags.DEFINE_enum("study", "scaling", ["scaling", "churn", "mkd", "dp", "network", "codec"],
                  "Which sweep.")
flags.DEFINE_list("num_peers", ["16", "64", "125", "256", "1024"], "Scaling: peer counts N.")
flags.DEFINE_list("dropouts", ["0", "0.1", "0.2", "0.5"], "Churn: dropout probabilities.")
flags.DEFINE_list("algorithms", None, "Algorithms (default: all five for scaling; marfl, "
                  "fedavg, rdfl for churn; marfl for codec).")
flags.DEFINE_integer("churn_peers", 64, "Churn, MKD and DP: N.")
flags.DEFINE_list("mkd_fractions", ["0.4", "1.0"], "MKD: teacher fractions rho.")
flags.DEFINE_integer("mkd_iterations", 8, "MKD: K, the iterations that distil.")
flags.DEFINE_list("profiles", ["uniform", "lognormal", "deadline"],
                  "Network: peer profiles (marfl_jax.studies.NETWORK_PROFILES).")
flags.DEFINE_list("codecs", ["float32", "float16", "bfloat16", "int8"],
                  "Codec: the message codecs (marfl_jax.codec.CODECS).")
flags.DEFINE_list("dp_noise_multipliers", ["0.2", "0.5", "1.0"], "DP: noise multipliers z.")
flags.DEFINE_string("model", "mlp", "Model (cnn | mlp).")
flags.DEFINE_string("dataset", "mnist10k", "Dataset.")
flags.DEFINE_string("data_dir", "", "Data folder (see launch.train).")
flags.DEFINE_float("target_accuracy", 0.9, "Target test accuracy.")
flags.DEFINE_integer("max_iterations", 60, "Iteration budget per run.")
flags.DEFINE_integer("local_batches", 2, "Local mini-batches b per iteration.")
flags.DEFINE_integer("batch_size", 16, "Mini-batch size B.")
flags.DEFINE_integer("eval_every", 2, "Evaluate every k iterations.")
flags.DEFINE_integer("seed", 0, "Seed.")
flags.DEFINE_string("workdir", None, "Output folder (default runs/<study>).")
FLAGS = flags.FLAGS

PLOT_NAMES = {"scaling": "bytes_per_iteration.png", "churn": "churn.png", "mkd": "mkd.png",
              "dp": "dp.png", "network": "time_to_target.png", "codec": "codec.png"}
# Where a study's defaults differ from the flags' (used unless the flag is given).
STUDY_DEFAULTS = {"mkd": dict(model="cnn", target_accuracy=0.95, local_batches=4, eval_every=1,
                              max_iterations=60),
                  "dp": dict(model="cnn", target_accuracy=1.0, local_batches=4, eval_every=2,
                             max_iterations=40),
                  "codec": dict(model="cnn", target_accuracy=0.95, local_batches=4, eval_every=1,
                                max_iterations=60)}


def main(argv):
    del argv
    for name, value in STUDY_DEFAULTS.get(FLAGS.study, {}).items():
        if not FLAGS[name].present:
            FLAGS[name].value = value
    workdir = FLAGS.workdir or os.path.join("runs", FLAGS.study)
    base = Config(model=FLAGS.model, dataset=FLAGS.dataset, data_dir=FLAGS.data_dir,
                  target_accuracy=FLAGS.target_accuracy, max_iterations=FLAGS.max_iterations,
                  local_batches=FLAGS.local_batches, batch_size=FLAGS.batch_size,
                  eval_every=FLAGS.eval_every, seed=FLAGS.seed, workdir=workdir,
                  eval_peers="8", checkpoint_every=0)
    from marfl_jax import plotting, runtime, studies

    runtime.configure(base)  # Before anything starts the backend (each run checks it again).

    try:
        if FLAGS.study == "scaling":
            names = FLAGS.algorithms or ["marfl", "fedavg", "arfl", "rdfl", "gossip"]
            configs = studies.scaling_configs(base, [int(n) for n in FLAGS.num_peers], names)
        elif FLAGS.study == "network":
            names = FLAGS.algorithms or ["marfl", "fedavg", "arfl", "rdfl"]
            peers = ([int(n) for n in FLAGS.num_peers] if FLAGS["num_peers"].present
                     else [16, 64, 125, 1024])
            configs = studies.network_configs(base, peers, names, FLAGS.profiles)
        elif FLAGS.study == "churn":
            names = FLAGS.algorithms or ["marfl", "fedavg", "rdfl"]
            base = dataclasses.replace(base, num_peers=FLAGS.churn_peers)
            configs = studies.churn_configs(base, [float(p) for p in FLAGS.dropouts], names)
        else:
            m, d, schedule = studies.moshpit_grid(FLAGS.churn_peers)
            base = dataclasses.replace(base, num_peers=FLAGS.churn_peers, group_size=m,
                                       key_dim=d, schedule=schedule)
            if FLAGS.study == "mkd":
                configs = studies.mkd_configs(base, [float(r) for r in FLAGS.mkd_fractions],
                                              FLAGS.mkd_iterations)
            elif FLAGS.study == "codec":
                configs = studies.codec_configs(base, FLAGS.codecs,
                                                FLAGS.algorithms or ["marfl"])
            else:
                configs = studies.dp_configs(base, [float(z) for z in FLAGS.dp_noise_multipliers])
    except (ConfigError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)

    logging.set_verbosity(logging.WARNING)
    os.makedirs(workdir, exist_ok=True)

    make_row, fields = {"mkd": (studies.mkd_row, studies.MKD_FIELDS),
                        "dp": (studies.dp_row, studies.DP_FIELDS),
                        "network": (studies.network_row, studies.NETWORK_FIELDS),
                        "codec": (studies.codec_row, studies.CODEC_FIELDS)}.get(
        FLAGS.study, (studies.result_row, studies.ROW_FIELDS))
    curves = {}  # Run name -> metrics rows, for the per-run curves.
    rows = studies.run_study(
        configs, on_row=_report, make_row=make_row,
        on_result=lambda c, r: curves.update({os.path.basename(c.workdir): r.metrics}))
    csv_path = os.path.join(workdir, f"{FLAGS.study}.csv")
    studies.write_csv(rows, csv_path, fields)
    plot_path = os.path.join(workdir, PLOT_NAMES[FLAGS.study])
    if FLAGS.study == "scaling":
        plotting.plot_bytes_per_iteration(rows, plot_path)
    elif FLAGS.study == "churn":
        plotting.plot_churn(rows, plot_path)
    elif FLAGS.study == "codec" and len({row["algorithm"] for row in rows}) > 1:
        plotting.plot_codec_bytes(rows, plot_path)
    elif FLAGS.study in ("mkd", "codec"):
        plotting.plot_accuracy_vs_bytes(curves, plot_path, (0.5, FLAGS.target_accuracy))
    elif FLAGS.study == "network":
        plotting.plot_time_to_target(rows, plot_path)
    else:
        plotting.plot_accuracy_vs_iteration(curves, plot_path)
    print(f"wrote {csv_path} and {plot_path}")


def _report(row: dict) -> None:
    """One line per finished run: every field of its row."""
    def show(value):
        return f"{value:,}" if isinstance(value, int) and not isinstance(value, bool) else (
            f"{value:.4g}" if isinstance(value, float) else str(value) or "-")

    print("  ".join(f"{name}={show(value)}" for name, value in row.items()), flush=True)

if __name__ == "__main__":
    app.run(main)
