"""A run watching itself: divergence, and the progress line's estimates (pure host code).

    divergence(row, config) -> message or None       # a non-finite loss or parameter
    expected_iteration(rows, target) -> float | None   # when the error's trend meets the target
    progress(t, max_iterations, rate, rows, target) -> "ETA ... to --max_iterations=...; ..."
"""

from __future__ import annotations

import math
from collections.abc import Sequence

# The quantities checked, in the order they are named: (row field, how the message names it).
CHECKED = (("train_loss", "train_loss"), ("loss", "the evaluation loss"))
# Evaluations the target's trend is fitted over, and the fewest that give one; the smallest
# error fitted (log(1 - accuracy) of an accuracy of 1).
TREND_WINDOW = 5
TREND_MIN_POINTS = 3
MIN_ERROR = 1e-6


class DivergenceError(RuntimeError):
    """The run diverged: a loss or a parameter stopped being finite. Its rows are written up to
    and including the iteration that diverged; the latest checkpoint holds a finite state."""


def divergence(row: dict, learning_rate: float) -> str | None:
    """What diverged in this metrics row (None: nothing), as the start of a one-line message.

    row: the row as the runner writes it, with `params_finite` False when some peer's parameter
    after the iteration is NaN or infinite (the field is absent when every one is finite)."""
    problem = None
    for field, name in CHECKED:
        value = row.get(field)
        if value is not None and not math.isfinite(value):
            problem = f"{name} is {value}"
            break
    if problem is None and row.get("params_finite", True) is False:
        problem = "a parameter is not finite"
    if problem is None:
        return None
    return (f"iteration {row['iteration']}: {problem}: the run diverged; try a lower "
            f"--learning_rate (now {learning_rate:g}) in another --workdir")


def expected_iteration(rows: Sequence[dict], target: float, window: int = TREND_WINDOW
                       ) -> float | None:
    """The iteration at which the evaluated accuracy is expected to reach `target`:

    - None while fewer than 3 evaluations after iteration 0 are there (no trend yet);
    - the latest evaluated iteration when its accuracy already reaches `target`;
    - math.inf when the trend does not reach it (the error is not falling, or would reach the
      target only beyond e^50 iterations, or the target is 100 %): not in sight;
    - otherwise the fitted iteration, never earlier than the next evaluation (the latest
      evaluated iteration plus the spacing of the last two evaluations).

    The fit: the error 1 - accuracy as a power of the iterations, error ~ a (t + 1)^-b, i.e. a
    least-squares line of log(1 - accuracy) against log(iteration + 1) through the last
    `window` evaluations after iteration 0 (rows with an `accuracy`). An error that decays as
    a power slows down as it goes, so the estimate does not jump to 'now' when the accuracy
    only creeps up; the evaluation at iteration 0 (after one iteration from the initial
    parameters) is left out, its error far above the trend of those after it.

    Scans `rows` backwards, stopping after `window` evaluations (cheap at every evaluation)."""
    evaluated = []  # (iteration, accuracy), the latest first.
    for row in reversed(rows):
        if row.get("accuracy") is not None:
            evaluated.append((row["iteration"], row["accuracy"]))
            if len(evaluated) > window:
                break
    if not evaluated:
        return None
    last_t, last_accuracy = evaluated[0]
    if last_accuracy >= target:
        return float(last_t)
    points = [(math.log(t + 1.0), math.log(max(1.0 - accuracy, MIN_ERROR)))
              for t, accuracy in evaluated[:window] if t > 0]
    if len(points) < TREND_MIN_POINTS:
        return None
    n = len(points)
    mean_x = sum(x for x, _ in points) / n
    mean_y = sum(y for _, y in points) / n
    spread = sum((x - mean_x) ** 2 for x, _ in points)
    if spread == 0 or target >= 1.0:
        return math.inf
    slope = sum((x - mean_x) * (y - mean_y) for x, y in points) / spread
    if not slope < 0:
        return math.inf  # The error is not falling.
    log_t = mean_x + (math.log(1.0 - target) - mean_y) / slope
    if log_t > 50:  # Beyond any run (e^50 iterations).
        return math.inf
    next_evaluation = last_t + (last_t - evaluated[1][0])
    return max(math.exp(log_t) - 1.0, float(next_evaluation))


def format_duration(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}h{rest // 60:02d}m" if hours else f"{rest // 60}m{rest % 60:02d}s"


def progress(t: int, max_iterations: int, rate: float, rows: Sequence[dict], target: float
             ) -> str:
    """The progress line's estimates after `t` iterations done at `rate` iterations/s: the time
    to --max_iterations, and once there is a trend (`expected_iteration`), the iteration (and
    time) at which the target is expected, e.g.
    'ETA 1h58m to --max_iterations=500; target 95 % expected near iteration 31 (~3m10s)',
    or '...; target 95 % not in sight on the trend of the last 5 evaluations', or
    '...; target 95 % reached at iteration 30'. A target of 100 % (run every iteration) gives
    only the ETA."""
    text = (f"ETA {format_duration((max_iterations - t) / rate)} to "
            f"--max_iterations={max_iterations}")
    if target >= 1.0:  # A 100 % target runs every iteration (the studies' way): no estimate.
        return text
    expected = expected_iteration(rows, target)
    if expected is None:
        return text
    goal = f"; target {100 * target:g} %"
    if math.isinf(expected):
        return text + goal + f" not in sight on the trend of the last {TREND_WINDOW} evaluations"
    at = math.ceil(expected)
    if at < t:
        return text + goal + f" reached at iteration {at}"
    goal += f" expected near iteration {at}"
    if at >= max_iterations:
        return text + goal + " (after --max_iterations)"
    return text + goal + f" (~{format_duration(max(at + 1 - t, 0) / rate)})"
