"""The execution plan: candidates, timing within the budget, the cache, and resume."""

import dataclasses
import json

import pytest

from marfl_jax import Config, plan, runner
from marfl_jax.plan import Plan

SMALL = Config(model="mlp", num_peers=8, group_size=2, key_dim=3, local_batches=1, batch_size=8,
               eval_every=2, max_iterations=3, target_accuracy=1.0, checkpoint_every=0)


def test_candidates_keep_explicit_flags_and_skip_cpu_grouped_convs_in_loops():
    cnn = Config(num_peers=64)
    found = plan.candidates(cnn, "cpu")
    assert found[0] == Plan(1, "gather") and found[5] == Plan(0, "gather")  # Narrow first.
    assert Plan(8, "shift_concat") in found and Plan(0, "lax") not in found
    assert Plan(8, "lax") in plan.candidates(cnn, "gpu")
    assert Plan(0, "lax") in plan.candidates(Config(num_peers=64, conv_impl="lax"), "cpu")
    assert plan.candidates(Config(num_peers=64, peer_chunk=5, conv_impl="lax"), "gpu") == [
        Plan(5, "lax")]
    assert {p.conv_impl for p in plan.candidates(SMALL, "cpu")} == {""}
    assert [p.peer_chunk for p in plan.candidates(SMALL, "cpu")] == [1, 4, 0]


def _choose(config, tmp_path, budget_s=60.0, log=print):
    calls = []

    def runner_log(message):
        calls.append(message)
        log(message)

    def build_apply_fn(candidate):
        model = runner.build_model(config, 10, candidate)
        import jax
        import jax.numpy as jnp

        params = model.init(jax.random.key(0), jnp.zeros((1, 28, 28, 1)))["params"]
        return runner.make_apply_fn(model), params

    import jax.numpy as jnp

    from marfl_jax import local

    make_step = plan.local_step_factory(config, build_apply_fn, jnp.zeros((1, 28, 28, 1)),
                                        local.momentum_sgd(0.1, 0.9), 10)
    chosen, timings = plan.choose(config, make_step, backend="cpu", device_kind="test",
                                  input_shape=(28, 28, 1), num_classes=10, budget_s=budget_s,
                                  cache_dir=str(tmp_path), log=runner_log)
    return chosen, timings, calls


def test_choose_times_the_candidates_then_caches_the_choice(tmp_path):
    chosen, timings, calls = _choose(SMALL, tmp_path)
    assert [t.plan for t in timings] == plan.candidates(SMALL, "cpu")
    assert chosen == min(timings, key=lambda t: t.per_peer_s).plan
    assert all(t.step_s > 0 and t.width in (8, 4, 1) for t in timings)
    assert "ms/peer-step" in calls[0]
    (cached,) = tmp_path.glob("*.json")
    assert Plan(**json.loads(cached.read_text())["plan"]) == chosen
    again, timings, calls = _choose(SMALL, tmp_path)
    assert again == chosen and timings == [] and "cached" in calls[0]


def test_the_budget_bounds_the_timing(tmp_path):
    chosen, timings, calls = _choose(dataclasses.replace(SMALL, num_peers=64), tmp_path,
                                     budget_s=1e-9)
    assert len(timings) == 1 and chosen == Plan(1, "")  # The first is always timed.
    assert "not timed (budget" in calls[0]


def test_a_run_keeps_its_plan_when_resumed(tmp_path, monkeypatch):
    monkeypatch.setattr(plan, "MIN_PEER_STEPS", 0)
    monkeypatch.setenv("MARFL_PLAN_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(plan, "choose", lambda *a, **k: (Plan(4, ""), []))
    short = dataclasses.replace(SMALL, max_iterations=2, eval_every=1)
    runner.run(short, str(tmp_path / "run"))
    assert json.loads((tmp_path / "run" / "plan.json").read_text()) == {"peer_chunk": 4,
                                                                         "conv_impl": ""}

    def no_timing(*args, **kwargs):
        raise AssertionError("a resumed run must not plan again")

    monkeypatch.setattr(plan, "choose", no_timing)
    resumed = runner.run(dataclasses.replace(short, max_iterations=3), str(tmp_path / "run"))
    fixed = runner.run(dataclasses.replace(short, max_iterations=3, peer_chunk=4, plan="fixed"),
                       str(tmp_path / "fixed"))
    assert [r["train_loss"] for r in resumed.metrics] == [r["train_loss"] for r in fixed.metrics]


@pytest.mark.parametrize("setting", [dict(plan="fixed"), dict(max_iterations=1)])
def test_fixed_and_short_runs_do_not_time(setting, tmp_path, monkeypatch):
    monkeypatch.setattr(plan, "choose", lambda *a, **k: pytest.fail("timed"))
    monkeypatch.setattr(plan, "MIN_PEER_STEPS", 9 if "max_iterations" in setting else 0)
    runner.run(dataclasses.replace(SMALL, **setting), str(tmp_path))
    assert json.loads((tmp_path / "plan.json").read_text())["peer_chunk"] == 0
