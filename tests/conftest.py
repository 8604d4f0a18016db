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


def pytest_configure(config):
    # The fast tier is compile-bound (a few jitted iterations on tiny data): XLA:CPU's
    # backend optimisation level 0 compiles about a quarter faster and computes the same
    # results to float tolerance. The slow tier (whole runs, executing for longer) keeps the
    # defaults, and so does an XLA_FLAGS given by the caller.
    if "not slow" in (config.option.markexpr or "") and "XLA_FLAGS" not in os.environ:
        os.environ["XLA_FLAGS"] = "--xla_backend_optimization_level=0"


# Equivalence and oracle tests of the fast tier whose compiles took the longest (5-23 s each on
# a 2-core AMD EPYC), run in the slow tier instead so that the fast tier keeps its 4 minutes
# there; each keeps a cheaper sibling in the fast tier (another parameter, rule, algorithm or
# grid) where it has one. Same assertions, only the tier changes.
SLOW_FOR_TIME = (
    "tests/test_marfl.py::MixedRadixTest::test_churn_keeps_absent_peers_and_the_present_mean_on_average",
    "tests/test_marfl.py::BucketScheduleTest::test_125_peers_uses_hard_coded_alphas",
    "tests/test_codec.py::test_every_algorithm_runs_with_codecs_and_weights_only[marfl-extra3]",
    "tests/test_mkd.py::TestDistillRound::test_equals_a_per_peer_reference[1.0]",
    "tests/test_core.py::test_iteration_is_the_chain_under_jit",
    "tests/test_rules.py::RuleTest::test_every_rule_is_its_per_group_definition_('centered_clip')__with_jit",
    "tests/test_adversary.py::test_a_robust_rule_takes_decoded_copies_under_a_lossy_codec",
    "tests/test_scale.py::test_chunked_local_training_equals_all_at_once[1]",
    "tests/test_adversary.py::test_attackers_are_counted_and_only_honest_peers_measured",
    "tests/test_core.py::test_a_forgotten_absence_is_never_averaged_over_the_grid",
    "tests/test_core.py::test_a_non_mean_rule_runs_the_chain_without_the_grid",
    "tests/test_core.py::test_a_user_stage_joins_the_chain",
    "tests/test_mkd.py::TestDistillRound::test_batched_teacher_logits_equal_a_per_pair_loop",
    "tests/test_marfl.py::BucketScheduleTest::test_residual_at_100_peers_is_a_few_percent",
    "tests/test_workdir.py::test_a_checkpoint_that_cannot_be_restored_falls_back_to_the_one_before",
    "tests/test_mixing.py::GroupRuleTest::test_the_grid_is_taken_only_where_the_schedule_is_the_grid",
    "tests/test_scale.py::test_chunk_loop_writes_in_place[1]",
    "tests/test_clock.py::test_marfl_4x4x4_cnn_round_at_10_mbits_is_23_04_s_plus_latency",
    "tests/test_marfl.py::MixedRadixTest::test_exact_global_mean_for_any_factorable_n2",
    "tests/test_comm.py::test_a_users_own_wire_sets_the_bytes_the_seconds_and_the_coded_combine",
    "tests/test_churn.py::test_runs_under_churn[changes0]",
    "tests/test_codec.py::test_every_algorithm_runs_with_codecs_and_weights_only[fedavg-extra1]",
    "tests/test_attacks.py::AttackTest::test_gaussian_is_independent_noise_of_sigma_in_the_attackers_slots__with_jit",
    "tests/test_churn.py::test_runs_under_churn[changes4]",
    "tests/test_marfl.py::MixedRadixTest::test_exact_global_mean_for_any_factorable_n1",
    "tests/test_marfl.py::MixedRadixTest::test_exact_global_mean_for_any_factorable_n4",
    "tests/test_marfl.py::GridScheduleTest::test_full_grid_gives_exact_global_mean3",
    "tests/test_adversary.py::test_churn_samples_the_pool_like_everyone_else",
    "tests/test_baselines.py::ClosedFormTest::test_exact_global_mean_and_cost0",
    "tests/test_churn.py::test_runs_under_churn[changes9]",
    "tests/test_baselines.py::ClosedFormTest::test_exact_global_mean_and_cost2",
    "tests/test_device_check.py::test_a_killed_check_keeps_every_line_it_measured",
    "tests/test_device_check.py::test_sigterm_leaves_the_lines_and_says_where_it_stopped",
    "tests/test_marfl.py::GridScheduleTest::test_full_grid_gives_exact_global_mean2",
    "tests/test_mixing.py::test_grid_rounds_equal_the_segment_means_of_the_schedule[changes2-radices2]",
    "tests/test_baselines.py::ClosedFormTest::test_exact_global_mean_and_cost1",
    "tests/test_mixing.py::test_grid_rounds_equal_the_segment_means_of_the_schedule[changes1-radices1]",
)


def pytest_collection_modifyitems(config, items):
    slow = set(SLOW_FOR_TIME)
    for item in items:
        if item.nodeid in slow:
            item.add_marker(pytest.mark.slow)
