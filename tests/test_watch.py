"""A run watching itself: divergence stops it, strict JSON rows, the progress line's estimates."""

import json
import math
import os

import pytest

from marfl_jax import Config, DivergenceError, runner, watch, workdir

DIVERGING = Config(model="mlp", num_peers=16, group_size=4, key_dim=2, learning_rate=1e4,
                   eval_every=2, eval_peers="3", max_iterations=10, target_accuracy=1.0,
                   checkpoint_every=2)


def _refuse(constant):
    raise ValueError(f"not strict JSON: {constant}")


def strict_rows(path) -> list[dict]:
    """metrics.jsonl parsed strictly: NaN / Infinity refused."""
    with open(path) as f:
        return [json.loads(line, parse_constant=_refuse) for line in f]


def test_divergence_names_the_iteration_the_quantity_and_what_to_try():
    row = {"iteration": 5, "train_loss": 1.0, "loss": 2.0}
    assert watch.divergence(row, 0.1) is None
    assert watch.divergence({**row, "train_loss": math.nan}, 1e4) == (
        "iteration 5: train_loss is nan: the run diverged; try a lower --learning_rate "
        "(now 10000) in another --workdir")
    assert "iteration 5: the evaluation loss is inf:" in watch.divergence(
        {**row, "loss": math.inf}, 0.1)
    assert "iteration 5: a parameter is not finite:" in watch.divergence(
        {**row, "params_finite": False}, 0.1)
    # A row read back from disk holds null where the number was not finite.
    assert watch.divergence({**row, "loss": None}, 0.1) is None


def test_rows_and_summaries_are_strict_json(tmp_path):
    value = {"a": math.nan, "b": [math.inf, -math.inf, 1.5], "c": {"d": math.nan}, "e": 1}
    assert workdir.dumps(value) == '{"a": null, "b": [null, null, 1.5], "c": {"d": null}, "e": 1}'
    rows = workdir.Rows(str(tmp_path / "metrics.jsonl"), [{"iteration": 0, "loss": math.inf}])
    rows.append({"iteration": 1, "loss": math.nan})
    rows.close()
    assert strict_rows(tmp_path / "metrics.jsonl") == [{"iteration": 0, "loss": None},
                                                       {"iteration": 1, "loss": None}]
    workdir.write_json(str(tmp_path / "summary.json"), {"best": math.nan})
    assert json.loads((tmp_path / "summary.json").read_text(), parse_constant=_refuse) == {
        "best": None}


def _evaluations(accuracy, iterations):
    return [{"iteration": t, "accuracy": accuracy(t)} for t in iterations]


def test_expected_iteration_follows_the_log_trend():
    # accuracy = 0.1 log(t + 1): 0.6 is reached at t = e^6 - 1 ~ 402.4.
    rows = _evaluations(lambda t: 0.1 * math.log(t + 1), range(0, 100, 5))
    assert watch.expected_iteration(rows, 0.6) == pytest.approx(math.exp(6) - 1)
    # Only the last 5 evaluations count: an early plateau does not change the estimate.
    plateau = [{"iteration": t, "accuracy": 0.0} for t in range(3)]
    rows_after = [r for r in rows if r["iteration"] > 10]
    assert watch.expected_iteration(plateau + rows_after, 0.6) == pytest.approx(math.exp(6) - 1)
    # Rows without an evaluation are skipped.
    sparse = [r if r["iteration"] % 10 == 0 else {"iteration": r["iteration"]} for r in rows]
    assert watch.expected_iteration(sparse, 0.6) == pytest.approx(math.exp(6) - 1)


def test_expected_iteration_needs_a_rising_trend():
    assert watch.expected_iteration(_evaluations(lambda t: 0.5, range(10)), 0.9) is None
    assert watch.expected_iteration(_evaluations(lambda t: 0.9 - t / 100, range(10)), 0.95) is None
    assert watch.expected_iteration(_evaluations(lambda t: t / 10, range(2)), 0.95) is None
    assert watch.expected_iteration([], 0.95) is None
    # Far beyond any run: no estimate.
    assert watch.expected_iteration(_evaluations(lambda t: 1e-9 * t, range(1, 6)), 0.9) is None


def test_progress_line_says_which_estimate_is_which():
    rows = _evaluations(lambda t: 0.1 * math.log(t + 1), range(0, 100, 5))  # Target 0.6: ~403.
    assert watch.progress(100, 500, 1.0, rows, 0.6) == (
        "ETA 6m40s to --max_iterations=500; target 60 % expected near iteration 403 (~5m04s)")
    assert watch.progress(100, 300, 1.0, rows, 0.6) == (
        "ETA 3m20s to --max_iterations=300; target 60 % expected near iteration 403 "
        "(after --max_iterations)")
    assert watch.progress(100, 500, 1.0, rows[:2], 0.6) == "ETA 6m40s to --max_iterations=500"


@pytest.mark.smoke
def test_learning_rate_1e4_stops_the_run(tmp_path):
    with pytest.raises(DivergenceError) as raised:
        runner.run(DIVERGING, str(tmp_path))
    message = str(raised.value)
    assert "\n" not in message
    assert " is nan: the run diverged; try a lower --learning_rate (now 10000)" in message or (
        "not finite: the run diverged" in message), message
    rows = strict_rows(tmp_path / "metrics.jsonl")
    last = rows[-1]["iteration"]
    assert message.startswith(f"iteration {last}: ") and last < 10
    assert [r["iteration"] for r in rows] == list(range(last + 1))
    summary = json.loads((tmp_path / "summary.json").read_text(), parse_constant=_refuse)
    assert summary["diverged"] == message and summary["iterations"] == last + 1
    # The latest checkpoint was saved before the divergence, and is finite.
    checkpoints = sorted(int(s) for s in os.listdir(tmp_path / "checkpoints") if s.isdigit())
    if checkpoints:
        assert checkpoints[-1] <= last
        assert f"the latest checkpoint (after iteration {checkpoints[-1] - 1})" in message
    else:
        assert "no checkpoint was saved" in message
