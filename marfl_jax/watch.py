"""A run watching itself: divergence, and the progress line's estimates (pure host code).

    divergence(row, config) -> message or None       # a non-finite loss or parameter
    expected_iteration(rows, target) -> float | None   # when the accuracy trend meets the target
    progress(t, max_iterations, rate, rows, target) -> "ETA ... to --max_iterations=...; ..."
"""

from __future__ import annotations

import math
from collections.abc import Sequence

# The quantities checked, in the order they are named: (row field, how the message names it).
CHECKED = (("train_loss", "train_loss"), ("loss", "the evaluation loss"))
# Evaluations the target's trend is fitted over, and the fewest that give one.
TREND_WINDOW = 5
TREND_MIN_POINTS = 3


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
    """The iteration at which the evaluated accuracy is expected to reach `target`, from a
    least-squares line of accuracy against log(iteration + 1) through the last `window`
    evaluations (rows with an `accuracy`); None while fewer than 3 are there or the trend is
    not rising. The log makes the estimate a conservative one for accuracy that saturates.

    Scans `rows` backwards, stopping after `window` evaluations (cheap at every evaluation)."""
    points = []
    for row in reversed(rows):
        if row.get("accuracy") is not None:
            points.append((math.log(row["iteration"] + 1.0), row["accuracy"]))
            if len(points) == window:
                break
    if len(points) < TREND_MIN_POINTS:
        return None
    n = len(points)
    mean_x = sum(x for x, _ in points) / n
    mean_y = sum(y for _, y in points) / n
    spread = sum((x - mean_x) ** 2 for x, _ in points)
    if spread == 0:
        return None
    slope = sum((x - mean_x) * (y - mean_y) for x, y in points) / spread
    if not slope > 0:
        return None
    last_x, last_y = points[0]
    if last_y >= target:
        return math.exp(last_x) - 1.0
    log_t = mean_x + (target - mean_y) / slope
    if log_t > 50:  # Beyond any run (e^50 iterations).
        return None
    return max(math.exp(log_t) - 1.0, math.exp(last_x) - 1.0)


def format_duration(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}h{rest // 60:02d}m" if hours else f"{rest // 60}m{rest % 60:02d}s"


def progress(t: int, max_iterations: int, rate: float, rows: Sequence[dict], target: float
             ) -> str:
    """The progress line's estimates after `t` iterations done at `rate` iterations/s: the time
    to --max_iterations, and where the accuracy trend allows, the iteration (and time) at which
    the target is expected, e.g.
    'ETA 1h58m to --max_iterations=500; target 95 % expected near iteration 31 (~3m10s)'."""
    text = (f"ETA {format_duration((max_iterations - t) / rate)} to "
            f"--max_iterations={max_iterations}")
    expected = expected_iteration(rows, target)
    if expected is None:
        return text
    at = math.ceil(expected)
    goal = f"; target {100 * target:g} % expected near iteration {at}"
    if at >= max_iterations:
        return text + goal + " (after --max_iterations)"
    return text + goal + f" (~{format_duration(max(at + 1 - t, 0) / rate)})"
