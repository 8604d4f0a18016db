"""The paper reproduction: flagfile settings, every experiment end to end at a tiny scale, the
report, and the launcher's refusals."""

import dataclasses
import glob
import os
import re
import subprocess
import sys

import pytest

from marfl_jax import experiments, report, scales, sweep
from marfl_jax.config import Config
from marfl_jax.experiments import codec

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TINY = scales.Scale(
    name="tiny",
    mnist=Config(model="mlp", dataset="mnist10k", local_batches=1, batch_size=8,
                 target_accuracy=0.9, max_iterations=2, eval_every=1, eval_peers="2",
                 checkpoint_every=0),
    peer_counts=(16,), algorithms=("marfl", "arfl"), study_peers=8,
    options={"churn": {"dropouts": (0.5,), "algorithms": ("marfl",)},
             "mkd": {"fractions": (1.0,), "iterations": 1},
             "dp": {"noise_multipliers": (0.5,)},
             "text": {"bbc_iterations": 1, "feature_dim": 16, "newsgroups_peers": (16,),
                      "newsgroups_iterations": 1},
             "network": {"profiles": ("deadline",)}, "codec": {"codecs": ("int8",)},
             "byzantine": {"fractions": (0.25,), "attacks": ("sign_flip",),
                           "rules": ("median",), "algorithms": ("marfl",)},
             "asynchrony": {"setups": ("mlp@8",), "profiles": ("sigma1",),
                            "modes": ("sync_marfl", "async_marfl")}})


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(ROOT, "launch/configs/*.cfg"))))
def test_every_flagfile_reads_into_a_valid_config(path):
    config = scales.config_from_flagfile(path, workdir="x")
    config.validate()
    with open(path) as f:
        for line in f:
            if line.startswith("--"):
                name, value = line.strip()[2:].split("=", 1)
                assert str(getattr(config, name)).lower() == value.lower(), name


def test_flagfile_with_an_unknown_flag_is_refused(tmp_path):
    path = tmp_path / "bad.cfg"
    path.write_text("# comment\n--num_peers=16\n--num_pears=3\n")
    with pytest.raises(ValueError, match="--num_pears is not a flag"):
        scales.config_from_flagfile(str(path))


def test_full_scale_takes_the_paper_settings():
    scale = dataclasses.replace(scales.SCALES["full"], mnist=dataclasses.replace(
        scales.SCALES["full"].mnist, data_dir="/data/mnist"))
    config = scales.mnist_config(scale, 125, "w")
    assert (config.num_peers, config.group_size, config.key_dim) == (125, 5, 3)
    assert (config.model, config.dataset, config.data_dir) == ("cnn", "mnist", "/data/mnist")
    assert (config.batch_size, config.local_batches, config.max_iterations) == (64, 4, 500)
    small = scales.mnist_config(scales.SCALES["small"], 64, "w")
    assert (small.group_size, small.key_dim, small.model) == (4, 3, "mlp")


def test_unknown_experiment_is_refused():
    with pytest.raises(ValueError, match="unknown churns; allowed: baselines, churn"):
        experiments.paper(TINY, "w", ["baselines", "churns"])


@pytest.mark.slow
def test_tiny_reproduction_writes_the_report(tmp_path):
    workdir, figures = str(tmp_path / "runs"), str(tmp_path / "figures")
    outcomes = [sweep.run(study, configs, os.path.join(figures, f"{study.name}.png"))
                for study, configs in experiments.paper(TINY, workdir)]
    path = str(tmp_path / "REPRODUCTION.md")
    report.write_report(outcomes, path, scale=TINY, command="test", machine="here",
                        wall_seconds=12.0)
    text = open(path).read()

    by_name = {o.study.name: o for o in outcomes}
    assert [len(by_name[n].rows) for n in experiments.paper_names()] == [2, 1, 2, 2, 1, 2, 2, 2,
                                                                          2]
    for outcome in outcomes:
        assert f"## {outcomes.index(outcome) + 1}. {outcome.study.title}" in text
        assert os.path.exists(outcome.figure)
        assert os.path.relpath(outcome.figure, str(tmp_path)) in text
    assert os.path.exists(os.path.join(figures, "baselines_accuracy_n16.png"))

    # Every table row is in the report, with its measured numbers.
    for outcome in outcomes:
        for row in outcome.rows:
            assert report.pct(row["final_accuracy"]) in text
    baselines = by_name["baselines"].rows
    assert all(r["iterations"] == 2 for r in baselines)
    # At N=16 an AR-FL peer receives N-1 = 15 messages, a MAR-FL peer on the 4x4 grid
    # G(M-1) = 6: the paper's ratio (N-1)/(G(M-1)).
    per_iteration = {(r["num_peers"], r["algorithm"]): r["bytes_per_iteration"]
                     for r in baselines}
    assert per_iteration[(16, "arfl")] * 6 == per_iteration[(16, "marfl")] * 15

    # 20 Newsgroups is absent offline: listed as not run, with what to do.
    assert by_name["text"].not_run[0][0] == "20newsgroups_n16"
    assert "**Not run:** `20newsgroups_n16`, because:" in text
    assert re.search(r"> .*--data_dir=PATH.*\n> \(launch.reproduce: give the data with "
                     r"--text_data_dir.\)", text)
    assert "- The text task: a head on frozen text features: `20newsgroups_n16`" in text
    assert "12 s of wall time" in text

    # A second pass reuses the finished runs.
    ((dp, configs),) = experiments.paper(TINY, workdir, ["dp"])
    again = sweep.run(dp, configs, os.path.join(figures, "dp.png"))
    for a, b in zip(again.rows, by_name["dp"].rows, strict=True):
        assert {k: (a[k], b[k]) for k in a if a[k] != b[k]} == {}


@pytest.mark.smoke
def test_launcher_refuses_a_bad_experiment_name(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "launch.reproduce", "--experiments=baselines,bogus",
         f"--workdir={tmp_path}"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "--experiments: unknown bogus; allowed: baselines, churn, mkd, dp, text" in (
        result.stderr)


def test_codec_summary_compares_weights_only_with_momentum():
    def row(codec, share, iterations, to_target, bytes_to_target, accuracy=0.95):
        return dict(run=f"{codec}_{'momentum' if share else 'weights'}", codec=codec,
                    share_momentum=share, iterations=iterations,
                    iterations_to_target=to_target, bytes_to_target=bytes_to_target,
                    final_accuracy=accuracy)

    text = codec.summarize([
        row("float32", True, 31, 31, 100), row("float32", False, 39, 39, 63),
        row("int8", True, 60, "", "", 0.94), row("int8", False, 45, 45, 20)])
    assert "float32: weights only reached the target in 39 iterations against 31 with " \
           "momentum, with 0.63x the bytes." in text
    assert "int8: weights only reached the target in 45 iterations; with momentum it was " \
           "missed." in text
    assert text.endswith("The fewest bytes to the target: int8_weights, 0.20x the authors' "
                         "float32 messages with momentum.")
    missed = codec.summarize([row("int8", True, 60, 50, 9),
                                            row("int8", False, 60, "", "", 0.9)])
    assert missed == ("int8: weights only missed the target (90.00 % after 60 iterations); "
                      "with momentum it took 50 iterations.")


def test_the_report_is_written_whole_from_the_studies(tmp_path):
    """Nothing of an earlier report survives: every section comes from a study's record."""
    path = tmp_path / "REPRODUCTION.md"
    path.write_text("# old generated text\n\n## Beyond the paper\n\nBy hand.\n")
    report.write_report([], str(path), scale=TINY, command="test", machine="here",
                        wall_seconds=1.0)
    text = path.read_text()
    assert "old generated text" not in text and "By hand" not in text
    assert text.startswith("# Reproducing the MAR-FL paper") and text.endswith(
        "Every run of this scale ran.\n")
