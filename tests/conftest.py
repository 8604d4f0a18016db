"""Shared test settings: tests run on the CPU with float32 and never touch the network."""

import atexit
import os
import shutil
import tempfile

os.environ.setdefault("MARFL_OFFLINE", "1")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# One compilation cache for the session, shared with the subprocesses tests start: many tests
# compile the same small iteration, and compiling is most of a tiny run's time.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="marfl_jax_cache_")
    atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], True)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")
# The plans chosen by tests stay in the session's own folder (not beside a shared cache).
os.environ.setdefault("MARFL_PLAN_CACHE",
                      os.path.join(os.environ["JAX_COMPILATION_CACHE_DIR"], "plans"))

import subprocess  # noqa: E402

import pytest  # noqa: E402

# The fast tier (`python -m pytest -q`) holds unit, equivalence and oracle tests and a few smoke
# runs; whole simulations, launcher subprocesses and notebooks belong to `-m slow`. A test that
# starts one without a `slow` or `smoke` mark fails at once, saying so.
_WHOLE_RUN = ("-m launch.", "launch/", "-m benchmarks.", "benchmarks/", "nbclient")


def _refuse(what: str):
    def refuse(*args, **kwargs):
        pytest.fail(f"this test starts {what}: mark it @pytest.mark.slow (or @pytest.mark.smoke "
                    "for one of the fast tier's few short end-to-end runs), or test the piece "
                    "on a few jitted iterations instead", pytrace=False)
    return refuse


@pytest.fixture(autouse=True)
def _whole_runs_are_marked(request, monkeypatch):
    if request.node.get_closest_marker("slow") or request.node.get_closest_marker("smoke"):
        return
    import marfl_jax
    from marfl_jax import runner

    monkeypatch.setattr(runner, "run", _refuse("a whole simulation (runner.run)"))
    monkeypatch.setattr(marfl_jax, "run", _refuse("a whole simulation (marfl_jax.run)"))
    popen = subprocess.Popen

    class GuardedPopen(popen):
        def __init__(self, args, *rest, **kwargs):
            command = " ".join(map(str, args)) if not isinstance(args, str) else args
            if any(part in command for part in _WHOLE_RUN):
                _refuse(f"a launcher or benchmark subprocess ({command[:80]})")()
            super().__init__(args, *rest, **kwargs)

    monkeypatch.setattr(subprocess, "Popen", GuardedPopen)
    try:
        import nbclient
    except ImportError:
        return
    monkeypatch.setattr(nbclient.NotebookClient, "execute", _refuse("a notebook"))


class NotStrictJSON(Exception):
    pass


def _refuse_constant(name):
    raise NotStrictJSON(f"{name} is not JSON")


@pytest.fixture(autouse=True)
def _rows_are_strict_json(tmp_path):
    """No metrics.jsonl or summary.json a test leaves in its tmp_path holds a NaN or Infinity
    token (lines a test broke on purpose, to see them refused, are not JSON at all: skipped)."""
    yield
    import json

    for path in [*tmp_path.rglob("metrics.jsonl"), *tmp_path.rglob("summary.json")]:
        text = path.read_text()
        lines = text.splitlines() if path.suffix == ".jsonl" else [text]
        for line in filter(str.strip, lines):
            try:
                json.loads(line, parse_constant=_refuse_constant)
            except json.JSONDecodeError:
                continue
