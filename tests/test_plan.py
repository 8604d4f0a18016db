"""The execution plan: candidates, timing within the budget, the cache, and resume."""

import dataclasses
import json

import pytest

from marfl_jax import Config, assemble, models, plan, runner
from marfl_jax.plan import Plan

SMALL = Config(model="mlp", num_peers=8, group_size=2, key_dim=3, local_batches=1, batch_size=8,
               eval_every=2, max_iterations=3, target_accuracy=1.0, checkpoint_every=0)


def test_candidates_keep_explicit_flags_and_skip_cpu_grouped_convs_in_loops():
    cnn = Config(num_peers=64)
    found = plan.candidates(cnn, "cpu")
    # The minimum set of every lowering first, narrowest first; then the other chunks.
    assert found == [Plan(1, "gather"), Plan(8, "gather"), Plan(0, "gather"),
                     Plan(1, "shift_concat"), Plan(8, "shift_concat"), Plan(0, "shift_concat"),
                     Plan(4, "gather"), Plan(4, "shift_concat")]
    on_gpu = plan.candidates(cnn, "gpu")  # Widest first, XLA's convolution first.
    assert on_gpu[:3] == [Plan(0, "lax"), Plan(8, "lax"), Plan(1, "lax")]
    assert on_gpu[9:12] == [Plan(32, "lax"), Plan(16, "lax"), Plan(4, "lax")]
    assert Plan(0, "lax") in plan.candidates(Config(num_peers=64, conv_impl="lax"), "cpu")
    assert plan.candidates(Config(num_peers=64, peer_chunk=5, conv_impl="lax"), "gpu") == [
        Plan(5, "lax")]
    assert {p.conv_impl for p in plan.candidates(SMALL, "cpu")} == {""}
    assert [p.peer_chunk for p in plan.candidates(SMALL, "cpu")] == [1, 4, 0]


def _choose(config, tmp_path, budget_s=60.0, log=print, backend="cpu", wrap=None,
            device_kind="test"):
    calls = []

    def runner_log(message):
        calls.append(message)
        log(message)

    def build_apply_fn(candidate):
        model = assemble.build_model(config, 10, candidate)
        import jax
        import jax.numpy as jnp

        params = model.init(jax.random.key(0), jnp.zeros((1, 28, 28, 1)))["params"]
        return models.make_apply_fn(model), params

    import jax.numpy as jnp

    from marfl_jax import local

    make_step = plan.local_step_factory(config, build_apply_fn, jnp.zeros((1, 28, 28, 1)),
                                        local.momentum_sgd(0.1, 0.9), 10)
    if wrap is not None:
        make_step = wrap(make_step)
    chosen, timings = plan.choose(config, make_step, backend=backend, device_kind=device_kind,
                                  input_shape=(28, 28, 1), num_classes=10, budget_s=budget_s,
                                  cache_dir=str(tmp_path), log=runner_log)
    return chosen, timings, calls


def test_choose_times_the_candidates_then_caches_the_choice(tmp_path):
    chosen, timings, calls = _choose(SMALL, tmp_path)
    assert [t.plan for t in timings] == plan.candidates(SMALL, "cpu")
    assert chosen == plan.pick(timings, lambda t: True).plan
    # One measurement for all: the same 8 peers and b steps, each through its own chunk loop.
    assert all(t.step_s > 0 and t.width == 8 and t.steps == 1 for t in timings)
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
    assert "did not cover the minimum set (missing: chunks of 8, all peers at once)" in calls[0]
    assert "rule: the fastest timed" in calls[0]


def test_on_an_accelerator_a_short_budget_keeps_all_peers_at_once(tmp_path):
    config = dataclasses.replace(SMALL, num_peers=64)
    chosen, timings, calls = _choose(config, tmp_path, budget_s=1e-9, backend="gpu")
    assert [t.plan for t in timings] == [Plan(0, "")] and chosen == Plan(0, "")
    assert "rule: all peers at once unless memory says otherwise" in calls[0]


def test_a_failing_candidate_is_skipped_with_its_reason(tmp_path):
    def failing(make_step):
        def make(candidate, width):
            if candidate.peer_chunk == 4:
                raise RuntimeError("RESOURCE_EXHAUSTED: out of memory allocating 9 GiB")
            return make_step(candidate, width)
        return make

    chosen, timings, calls = _choose(SMALL, tmp_path, wrap=failing)
    assert [t.plan.peer_chunk for t in timings] == [1, 0] and chosen.peer_chunk in (1, 0)
    assert "chunks of 4: skipped (RuntimeError: RESOURCE_EXHAUSTED: out of memory" in calls[0]


def _timing(chunk, ms, gib):
    return plan.Timing(Plan(chunk, ""), 0.0, ms * 1e-3, 1, 1, int(gib * 2**30))


def test_memory_decides_between_plans_about_as_fast():
    timings = [_timing(0, 10.0, 3.0), _timing(8, 10.4, 1.0), _timing(1, 12.0, 0.5)]
    # Chunks of 8 are within 5 % of all at once with a third of the memory.
    assert plan.pick(timings, lambda t: True).plan.peer_chunk == 8
    # Beyond 5 % the faster wins, and a plan that does not fit is never picked.
    assert plan.pick([_timing(0, 10.0, 3.0), _timing(8, 10.6, 1.0)],
                     lambda t: True).plan.peer_chunk == 0
    assert plan.pick(timings, lambda t: t.bytes_at_n < 2**30).plan.peer_chunk == 1
    assert plan.pick(timings, lambda t: False) is None


@pytest.mark.slow
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


@pytest.mark.slow
@pytest.mark.parametrize("setting", [dict(plan="fixed"), dict(max_iterations=1)])
def test_fixed_and_short_runs_do_not_time(setting, tmp_path, monkeypatch):
    monkeypatch.setattr(plan, "time_plan", lambda *a, **k: pytest.fail("timed"))
    monkeypatch.setattr(plan, "MIN_PEER_STEPS", 9 if "max_iterations" in setting else 0)
    monkeypatch.setenv("MARFL_PLAN_CACHE", str(tmp_path / "cache"))
    runner.run(dataclasses.replace(SMALL, **setting), str(tmp_path / "run"))
    assert json.loads((tmp_path / "run" / "plan.json").read_text())["peer_chunk"] == 0


@pytest.mark.slow
def test_a_short_run_reuses_a_cached_choice(tmp_path, monkeypatch):
    monkeypatch.setenv("MARFL_PLAN_CACHE", str(tmp_path / "cache"))
    import jax

    # A longer run on this machine timed and cached a choice; make it one the flags would not.
    _choose(SMALL, tmp_path / "cache", device_kind=jax.devices()[0].device_kind)
    (path,) = (tmp_path / "cache").glob("*.json")
    cached = Plan(4, "")
    path.write_text(json.dumps({"plan": cached._asdict()}))
    monkeypatch.setattr(plan, "time_plan", lambda *a, **k: pytest.fail("timed"))
    monkeypatch.setattr(plan, "MIN_PEER_STEPS", 10**9)
    runner.run(SMALL, str(tmp_path / "run"))
    assert Plan(**json.loads((tmp_path / "run" / "plan.json").read_text())) == cached


def _fake_timings(monkeypatch, compile_s: float, run_s: float):
    """time_plan replaced: each candidate 'compiles' for compile_s and runs for run_s seconds of
    a fake clock that choose() charges to the budget."""
    now = [0.0]
    timed = []
    monkeypatch.setattr(plan, "_clock", lambda: now[0])

    def fake_time_plan(candidate, make_step, num_peers, width, deadline=None):
        now[0] += compile_s + run_s
        timed.append(candidate)
        return plan.Timing(candidate, compile_s, run_s, width, 1, 0)

    monkeypatch.setattr(plan, "time_plan", fake_time_plan)
    return timed


@pytest.mark.parametrize("backend", ["cpu", "gpu"])
def test_on_accelerators_the_budget_counts_compiles(backend, monkeypatch, tmp_path):
    """10 s compiles, 1 s runs, a 30 s budget: a CPU charges the runs only and times all 4
    candidates; an accelerator charges the compiles too and starts a candidate only while the
    spent time plus the longest compile fits (2 candidates, 22 s)."""
    timed = _fake_timings(monkeypatch, compile_s=10.0, run_s=1.0)
    logs = []
    config = dataclasses.replace(SMALL, num_peers=64)
    chosen, timings = plan.choose(config, lambda p, w: None, backend=backend, device_kind="t",
                                  input_shape=(28, 28, 1), num_classes=10, budget_s=30.0,
                                  cache_dir=str(tmp_path), log=logs.append)
    if backend == "cpu":
        assert len(timed) == len(plan.candidates(config, "cpu")) == 4
        assert "in 4.0 s (+ 40.0 s compiling)" in logs[0]
    else:
        assert timed == [Plan(0, ""), Plan(8, "")]
        assert "in 22.0 s (20.0 s of it compiling)" in logs[0]
        assert "not timed (budget 30 s): chunks of 1" in logs[0]
        assert chosen == Plan(0, "")  # The rule without the minimum set: all peers at once.


def _cnn_options(monkeypatch, tmp_path, backend, *, available, patch_bytes=2**30,
                 failing=("lax",)):
    """choose() for a 64-peer CNN whose im2col buffer is `patch_bytes` a peer; the lowerings in
    `failing` fail to compile. Returns (timed plans, skipped reasons by plan, log)."""
    monkeypatch.setattr(plan, "_clock", lambda: 0.0)
    timed = []

    def fake_time_plan(candidate, make_step, num_peers, width, deadline=None):
        if candidate.conv_impl in failing:
            raise RuntimeError("RESOURCE_EXHAUSTED")
        timed.append(candidate)
        return plan.Timing(candidate, 0.0, 1.0, width, 1, 0)

    monkeypatch.setattr(plan, "time_plan", fake_time_plan)

    def make_step(p, w):
        raise AssertionError("not called")

    make_step.patch_bytes = lambda: patch_bytes
    logs = []
    plan.choose(Config(num_peers=64), make_step, backend=backend, device_kind="t",
                input_shape=(28, 28, 1), num_classes=10, budget_s=1e9, cache_dir=str(tmp_path),
                log=logs.append, state_bytes=2**30, available_bytes=available)
    return timed, logs[0]


def test_im2col_lowerings_are_tried_only_when_memory_allows_or_lax_fails(monkeypatch, tmp_path):
    # 1 GiB of patches a peer, 1 GiB of state, 10 GiB available: chunks of up to 8 peers fit.
    timed, log = _cnn_options(monkeypatch, tmp_path / "a", "gpu", available=10 * 2**30,
                              failing=())
    im2col = {p for p in timed if p.conv_impl in plan.IM2COL_IMPLS}
    assert {p.peer_chunk for p in im2col} == {1, 4, 8}
    assert "all peers at once, conv gather: skipped (memory: its im2col buffer 64.00 GiB for " \
           "64 peers + state 1.00 GiB > 10.00 GiB available; tried only if lax fails)" in log
    assert "chunks of 16, conv shift_concat: skipped (memory: " in log
    # Every lax candidate failed: the im2col lowerings are tried whatever the memory says.
    timed, log = _cnn_options(monkeypatch, tmp_path / "b", "gpu", available=10 * 2**30)
    assert Plan(0, "gather") in timed and "memory:" not in log
    # Enough memory: all are timed; unknown memory: all are timed.
    timed, _ = _cnn_options(monkeypatch, tmp_path / "c", "gpu", available=2**50, failing=())
    assert len(timed) == len(plan.candidates(Config(num_peers=64), "gpu"))
    timed, _ = _cnn_options(monkeypatch, tmp_path / "d", "cpu", available=None, failing=())
    assert len(timed) == len(plan.candidates(Config(num_peers=64), "cpu"))


def test_im2col_bytes_counts_every_convolutions_patches():
    import jax
    import jax.numpy as jnp

    model = assemble.build_model(Config(), 10, Plan(0, "lax"))
    sample = jnp.zeros((1, 28, 28, 1))
    params = model.init(jax.random.key(0), sample)["params"]
    # conv1: 26x26 pixels x 9x1 taps, conv2: 24x24 x 9x32; x2 (patches and their gradient).
    expected = 2 * 4 * 16 * (26 * 26 * 9 * 1 + 24 * 24 * 9 * 32)
    assert plan.im2col_bytes(models.make_apply_fn(model), params, sample, 16) == expected


def test_the_plan_cache_lives_beside_the_compile_cache(monkeypatch, tmp_path):
    monkeypatch.delenv("MARFL_PLAN_CACHE", raising=False)
    monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", str(tmp_path / "cache" / "xla"))
    assert plan.default_cache_dir() == str(tmp_path / "cache" / "plans")
    monkeypatch.setenv("MARFL_PLAN_CACHE", str(tmp_path / "mine"))
    assert plan.default_cache_dir() == str(tmp_path / "mine")
