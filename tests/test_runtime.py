"""Process-wide numerics: --matmul_precision and --deterministic (marfl_jax/runtime.py)."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

from marfl_jax import Config, plan, runtime
from marfl_jax import workdir as files
from marfl_jax.config import ConfigError
from marfl_jax.runtime import DETERMINISTIC_OPS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_the_deterministic_flag_is_added_once_and_keeps_the_other_flags():
    add = runtime.with_deterministic_ops
    assert add("", True) == DETERMINISTIC_OPS
    other = "--xla_force_host_platform_device_count=4 --xla_dump_to=/tmp/x"
    once = add(other, True)
    assert once == f"{other} {DETERMINISTIC_OPS}"
    assert add(once, True) == once  # Already there: unchanged, not doubled.
    assert add(f"{DETERMINISTIC_OPS} {other}", True) == f"{DETERMINISTIC_OPS} {other}"
    assert add(f"{other} --xla_gpu_deterministic_ops=false", True) == once  # The config decides.
    # --deterministic=false: never added, and removed where it was; the rest kept.
    assert add(other, False) == other
    assert add(once, False) == other
    assert add("", False) == ""


def test_the_environment_changes_only_where_a_gpu_may_be_used():
    settings = runtime.deterministic_settings
    gpu = {"JAX_PLATFORMS": "cuda", "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    assert settings(gpu, True) == {
        "XLA_FLAGS": f"--xla_force_host_platform_device_count=2 {DETERMINISTIC_OPS}"}
    assert settings({**gpu, **settings(gpu, True)}, True) == {}  # Once.
    assert settings(gpu, False) == {}
    assert settings({"JAX_PLATFORMS": "cuda", "XLA_FLAGS": DETERMINISTIC_OPS}, False) == {
        "XLA_FLAGS": ""}
    assert settings({"JAX_PLATFORMS": "cpu"}, True) == {}  # Nothing to change on a CPU.
    assert runtime.may_use_gpu({"JAX_PLATFORMS": "cuda,cpu"})
    assert not runtime.may_use_gpu({"JAX_PLATFORMS": "cpu"})


def test_configure_sets_xla_flags_before_the_backend_starts():
    """A fresh process (no backend yet) told it may use a GPU; nothing starts a backend."""
    code = (
        "import os\n"
        "from marfl_jax import Config, runtime\n"
        "import jax\n"
        "runtime.configure(Config())\n"
        "assert not runtime.backends_started()\n"
        "print(os.environ['XLA_FLAGS'])\n"
        "runtime.configure(Config())\n"
        "print(os.environ['XLA_FLAGS'])\n"
        "print(jax.config.jax_default_matmul_precision)\n"
        "runtime.configure(Config(deterministic=False, matmul_precision='default'))\n"
        "print(os.environ['XLA_FLAGS'])\n"
        "print(jax.config.jax_default_matmul_precision)\n")
    env = dict(os.environ, JAX_PLATFORMS="cuda", XLA_FLAGS="--xla_dump_to=/tmp/none")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    expected = f"--xla_dump_to=/tmp/none {DETERMINISTIC_OPS}"
    assert lines == [expected, expected, "highest", "--xla_dump_to=/tmp/none", "None"]



def test_validate_never_starts_a_backend():
    """Config.validate() (what the launchers and run() call before runtime.configure sets
    XLA_FLAGS) leaves the backend unstarted for every kind of config, in a fresh process."""
    configs = [{}, {"byzantine_fraction": 0.1, "attack": "sign_flip"},
               {"byzantine_fraction": 0.1, "attack": "alie", "aggregator": "krum",
                "aggregator_f": 1},
               {"aggregator": "trimmed_mean", "aggregator_f": 1},
               {"aggregator": "trimmed_mean", "aggregator_f": 1, "schedule": "mixed_radix",
                "num_peers": 100},
               {"mkd": True}, {"algorithm": "gossip"}, {"algorithm": "gossip", "rounds": 3},
               {"dp": True}, {"dropout": 0.2}, {"num_peers": 50}, {"num_peers": 125},
               {"algorithm": "fedavg"}, {"algorithm": "rdfl", "dropout": 0.1},
               {"network": "uniform"}]
    code = (
        "import json, sys\n"
        "from marfl_jax import Config, runtime\n"
        "for values in json.loads(sys.argv[1]):\n"
        "    Config(**values).validate()\n"
        "    assert not runtime.backends_started(), values\n"
        "print('ok', len(json.loads(sys.argv[1])))\n")
    result = subprocess.run([sys.executable, "-c", code, json.dumps(configs)], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["ok", str(len(configs))]



def test_backends_started_falls_back_where_jax_moved_its_internals(monkeypatch):
    """Without backends_are_initialized: the `_backends` dict, else False (the safe answer:
    prepare_backend then only sets XLA_FLAGS); without the module at all: False."""
    import types

    from jax._src import xla_bridge

    jax.devices()  # This test process has a backend.
    assert runtime.backends_started()
    fake = types.ModuleType("jax._src.xla_bridge")
    monkeypatch.setattr(jax._src, "xla_bridge", fake)
    monkeypatch.setitem(sys.modules, "jax._src.xla_bridge", fake)
    assert not runtime.backends_started()
    fake._backends = {}
    assert not runtime.backends_started()
    fake._backends = {"cpu": object()}
    assert runtime.backends_started()
    monkeypatch.setitem(sys.modules, "jax._src.xla_bridge", None)  # import raises ImportError.
    monkeypatch.delattr(jax._src, "xla_bridge")
    assert not runtime.backends_started()
    monkeypatch.undo()
    assert runtime.backends_started() and xla_bridge.backends_are_initialized()


@pytest.fixture
def restore_precision():
    before = jax.config.jax_default_matmul_precision
    yield
    jax.config.update("jax_default_matmul_precision", before)


@pytest.mark.parametrize("flag,hlo", [("highest", "HIGHEST"), ("high", "HIGH"),
                                      ("default", "DEFAULT")])
def test_matmul_precision_reaches_the_compiled_matmuls(flag, hlo, restore_precision):
    before = os.environ.get("XLA_FLAGS")
    runtime.configure(Config(matmul_precision=flag))  # The CPU backend has started: no flags.
    assert os.environ.get("XLA_FLAGS") == before
    text = jax.jit(lambda x: x @ x).lower(jnp.ones((4, 4))).as_text()
    assert f"precision = [{hlo}, {hlo}]" in text
    assert runtime.describe(Config(matmul_precision=flag)) == (
        f"matmul precision {flag}; deterministic GPU ops not needed on cpu")


def test_the_flags_are_validated_recorded_and_keyed():
    with pytest.raises(ConfigError, match="--matmul_precision='tf32' is not allowed; choose one "
                       "of: highest, high, default"):
        Config(matmul_precision="tf32").validate()
    config = Config(matmul_precision="high", deterministic=False).validate()
    recorded = json.loads(config.to_json())
    assert recorded["matmul_precision"] == "high" and recorded["deterministic"] is False
    assert Config.from_dict(recorded) == config
    key = dict(backend="gpu", device_kind="H200", input_shape=(28, 28, 1), num_classes=10)
    keys = {plan.cache_key(c, **key) for c in (Config(), config, Config(matmul_precision="high"))}
    assert len(keys) == 3


def test_a_workdir_from_before_these_flags_still_resumes(tmp_path):
    """Its config.json lacks the fields: they take their defaults, which are what it ran with
    (on a CPU float32 either way; no deterministic flag changes a CPU run)."""
    old = json.loads(Config(workdir=str(tmp_path)).to_json())
    del old["matmul_precision"], old["deterministic"]
    (tmp_path / "config.json").write_text(json.dumps(old))
    previous = files.previous_config(Config(workdir=str(tmp_path)), str(tmp_path))
    assert previous == Config(workdir=str(tmp_path))
    with pytest.raises(ConfigError, match="differs in: --matmul_precision"):
        files.previous_config(Config(workdir=str(tmp_path), matmul_precision="default"),
                              str(tmp_path))


@pytest.mark.smoke
def test_run_traces_at_the_configs_precision_and_leaves_the_callers(monkeypatch, tmp_path,
                                                                    restore_precision):
    from marfl_jax import runner

    seen = []

    class Traced(Exception):
        pass

    def build(*args):  # Where the run starts building what it traces.
        seen.append(jax.config.jax_default_matmul_precision)
        raise Traced

    monkeypatch.setattr(runner, "assemble", build)
    jax.config.update("jax_default_matmul_precision", "bfloat16")
    for flag in ("highest", "default"):
        with pytest.raises(Traced):
            runner.run(Config(matmul_precision=flag, workdir=str(tmp_path)))
    assert seen == ["highest", None]
    assert jax.config.jax_default_matmul_precision == "bfloat16"


def test_the_numerics_settings_are_the_configs_flags():
    assert Config().settings(runtime.Settings) == runtime.Settings()
    chosen = Config(matmul_precision="high", deterministic=False).settings(runtime.Settings)
    assert chosen == runtime.Settings("high", False)
    assert runtime.describe(chosen).startswith("matmul precision high;")
