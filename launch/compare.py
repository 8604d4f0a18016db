"""Sweeps that compare algorithms on equal terms: same data, model, loop and ledger.

    python -m launch.compare                     # scaling study: N in {16,64,125,256,1024}
    python -m launch.compare --study=churn       # churn study: N=64, dropout 0 / 0.1 / 0.2 / 0.5
    python -m launch.compare --num_peers=16,64 --algorithms=marfl,arfl --workdir=runs/small
    python -m launch.compare --study=mkd         # MKD study: N=64 CNN, no MKD vs rho 0.4 / 1.0
    python -m launch.compare --study=dp          # DP study: N=64 CNN, no DP vs z 0.2 / 0.5 / 1
    python -m launch.compare --study=network     # every algorithm's simulated time to target
    python -m launch.compare --study=codec       # N=64 CNN: each codec, with / without momentum
    python -m launch.compare --study=codec --algorithms=marfl,fedavg,arfl,rdfl,gossip --model=mlp
    python -m launch.compare --study=byzantine --option=rules=mean,krum --option=fractions=0,0.1

`--study` is any module of `marfl_jax/experiments/` (scaling, churn, mkd, dp, network, codec,
byzantine, and the reproduction's baselines and text); its docstring says what it runs and
writes. Each writes `<study>.csv` and its figure into `--workdir` (default runs/<study>).

What a sweep runs comes from two places. The shared setting and the size: flags the user does
not set take `SCALES["small"]` of `marfl_jax.scales` (MLP on the embedded MNIST, b=2, B=16,
target 90 %, 60 iterations; N=64 for the studies at one N) with the study module's `defaults` on
top. The study's own settings: `--option=NAME=V1,V2` (repeatable) sets any of them, the rest
keep the defaults its module declares (`STUDY.options`; its docstring lists them; the settings
`SCALES` gives the reproduction's studies do not apply here); an unknown NAME is refused, with
the study's settings, before anything runs. `--dropouts` (churn), `--mkd_fractions` and
`--mkd_iterations` (mkd), `--dp_noise_multipliers` (dp), `--profiles` (network) and `--codecs`
(codec) are short for `--option=...` of that one study and are refused with another;
`--algorithms` sets the study's `algorithms` setting where it has one (churn, codec, byzantine),
else the algorithms of the size (scaling, network, baselines). No flag sets another study's
setting. Runs already finished in their workdirs are reused, so an interrupted sweep picks up
where it stopped.
"""

from __future__ import annotations

import dataclasses
import os
import sys

from absl import app, flags, logging

from marfl_jax import experiments
from marfl_jax.config import ConfigError

flags.DEFINE_enum("study", "scaling", list(experiments.studies()), "Which sweep.")
flags.DEFINE_list("num_peers", None, "Scaling, network, baselines: peer counts N.")
flags.DEFINE_list("algorithms", None, "Algorithms: the study's `algorithms` setting where it "
                  "has one (churn: marfl, fedavg, rdfl; codec: marfl; byzantine: marfl, "
                  "fedavg, gossip), else the sweep's (scaling: all five).")
flags.DEFINE_integer("churn_peers", None, "N of the studies at one N (churn, MKD, DP, codec, "
                     "byzantine).")
flags.DEFINE_list("dropouts", None, "Churn: dropout probabilities (--option=dropouts).")
flags.DEFINE_list("mkd_fractions", None, "MKD: teacher fractions rho (--option=fractions).")
flags.DEFINE_integer("mkd_iterations", None, "MKD: K, the iterations that distil "
                     "(--option=iterations).")
flags.DEFINE_list("profiles", None, "Network: peer profiles "
                  "(marfl_jax.experiments.network.NETWORK_PROFILES; --option=profiles).")
flags.DEFINE_list("codecs", None, "Codec: the message codecs (marfl_jax.codec.CODECS; "
                  "--option=codecs).")
flags.DEFINE_list("dp_noise_multipliers", None, "DP: noise multipliers z "
                  "(--option=noise_multipliers).")
flags.DEFINE_string("model", None, "Model (cnn | mlp).")
flags.DEFINE_string("dataset", None, "Dataset.")
flags.DEFINE_string("data_dir", None, "Data folder (see launch.train).")
flags.DEFINE_float("target_accuracy", None, "Target test accuracy.")
flags.DEFINE_integer("max_iterations", None, "Iteration budget per run.")
flags.DEFINE_integer("local_batches", None, "Local mini-batches b per iteration.")
flags.DEFINE_integer("batch_size", None, "Mini-batch size B.")
flags.DEFINE_integer("eval_every", None, "Evaluate every k iterations.")
flags.DEFINE_integer("seed", None, "Seed.")
flags.DEFINE_integer("replicas", None, "Replicas of every run (seeds seed .. seed + R - 1, one "
                     "program each): rows and tables give means and standard deviations.")
flags.DEFINE_string("workdir", None, "Output folder (default runs/<study>).")
flags.DEFINE_multi_string("option", None, "A setting of the chosen study, NAME=V1,V2 "
                          "(repeatable; the study module's STUDY.options and docstring list "
                          "them; an unknown NAME is refused).")
FLAGS = flags.FLAGS

# Flag -> (the Scale field of the size it sets, the type of its values).
SIZE_FLAGS = {"num_peers": ("peer_counts", int), "churn_peers": ("study_peers", int)}
# Flag -> (the one study whose setting it sets, that setting's name).
OPTION_FLAGS = {"dropouts": ("churn", "dropouts"), "mkd_fractions": ("mkd", "fractions"),
                "mkd_iterations": ("mkd", "iterations"), "profiles": ("network", "profiles"),
                "codecs": ("codec", "codecs"),
                "dp_noise_multipliers": ("dp", "noise_multipliers")}
# Flags of the shared setting (Config fields of `Scale.mnist`).
CONFIG_FLAGS = ("model", "dataset", "data_dir", "target_accuracy", "max_iterations",
                "local_batches", "batch_size", "eval_every", "seed", "replicas")


def _texts(value) -> tuple[str, ...]:
    return tuple(str(v) for v in (value if isinstance(value, list) else [value]))


def scale_from_flags(study):
    """The Scale the flags describe for `study` (`experiments.compare_scale`); ValueError for
    a setting the study does not have."""
    sizes = {}
    for name, (field, kind) in SIZE_FLAGS.items():
        if FLAGS[name].present:
            value = FLAGS[name].value
            sizes[field] = tuple(kind(v) for v in value) if isinstance(value, list) else (
                kind(value))
    options = []
    for name, (owner, option) in OPTION_FLAGS.items():
        if FLAGS[name].present:
            if owner != study.name:
                raise ValueError(f"--{name} sets the {owner} study's setting {option}, not "
                                 f"the {study.name} study's (its settings: "
                                 f"{', '.join(study.options) or 'none'}; --option=NAME=V1,V2)")
            options.append((option, _texts(FLAGS[name].value)))
    if FLAGS.algorithms is not None:
        if "algorithms" in study.options:
            options.append(("algorithms", _texts(FLAGS.algorithms)))
        else:
            sizes["algorithms"] = tuple(FLAGS.algorithms)
    for text in FLAGS.option or ():
        name, equals, values = text.partition("=")
        if not equals or not name:
            raise ValueError(f"--option={text}: expected NAME=V1,V2")
        options.append((name, tuple(v for v in values.split(",") if v)))
    mnist = {name: FLAGS[name].value for name in CONFIG_FLAGS if FLAGS[name].present}
    return experiments.compare_scale(study, sizes, mnist, options)


def main(argv):
    del argv
    from marfl_jax import runtime, sweep

    study = experiments.get(FLAGS.study)
    workdir = FLAGS.workdir or os.path.join("runs", FLAGS.study)
    try:
        scale = scale_from_flags(study)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    # Before anything starts the backend (each run checks it again).
    runtime.configure(dataclasses.replace(scale.mnist, workdir=workdir))
    try:
        configs = study.configs(scale, workdir)
    except (ConfigError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)

    logging.set_verbosity(logging.WARNING)
    os.makedirs(workdir, exist_ok=True)
    plot_path = os.path.join(workdir, study.figure_name)
    outcome = sweep.run(study, configs, plot_path, on_row=_report, check_data=False)
    csv_path = os.path.join(workdir, f"{FLAGS.study}.csv")
    sweep.write_csv(outcome.rows, csv_path, study.fields)
    print(f"wrote {csv_path} and {plot_path}")


def _report(row: dict) -> None:
    """One line per finished run: every field of its row."""
    def show(value):
        return f"{value:,}" if isinstance(value, int) and not isinstance(value, bool) else (
            f"{value:.4g}" if isinstance(value, float) else str(value) or "-")

    print("  ".join(f"{name}={show(value)}" for name, value in row.items()), flush=True)

if __name__ == "__main__":
    app.run(main)
