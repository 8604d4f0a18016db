"""Figures from finished runs (matplotlib, Agg backend: works headless).

`plot_runs(workdirs, out_dir)` draws any set of finished runs together (accuracy against
iteration, accuracy against cumulative bytes, group-size and consensus-distance traces); the
launcher calls it on every run it finishes, and `python -m launch.plot` on any set.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def _save(fig, path: str, axes, which: str = "both") -> None:
    """Grids and legends on `axes`, then the figure to `path` (closed afterwards)."""
    for ax in axes:
        ax.grid(True, which=which, alpha=0.3)
        if ax.get_legend_handles_labels()[0]:  # Nothing drawn (no run reached it): no legend.
            ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def accuracy_curve(ax, x: Sequence[float], rows: Sequence[dict], **style) -> None:
    """One run's accuracy against x; with replicas (rows carry `accuracy_std`), a band of
    +- one standard deviation over the replicas around the mean."""
    line, = ax.plot(x, [r["accuracy"] for r in rows], **style)
    if rows and all("accuracy_std" in r and "replicas" in r for r in rows):
        mean = np.asarray([r["accuracy"] for r in rows])
        spread = np.asarray([r["accuracy_std"] for r in rows])
        ax.fill_between(x, mean - spread, mean + spread, color=line.get_color(), alpha=0.2,
                        lw=0)


def error_bars(ax, x: Sequence[float], rows: Sequence[dict], field: str) -> None:
    """Bars of +- the replicas' standard deviation of `field` (`<field>_std`), where rows have
    them."""
    spread = [r.get(f"{field}_std", "") for r in rows]
    if rows and all(s not in ("", None) for s in spread):
        ax.errorbar(x, [r[field] for r in rows], yerr=spread, fmt="none", ecolor="k",
                    elinewidth=0.8, capsize=2)


def plot_bytes_per_iteration(rows: Sequence[dict], path: str) -> None:
    """Log-log plot of bytes per iteration against N, one line per algorithm, with N log N and
    N^2 guides anchored at the smallest N. rows: dicts with `algorithm`, `num_peers`,
    `bytes_per_iteration`."""
    fig, ax = plt.subplots(figsize=(6.4, 4.8))
    markers = iter("osD^vP*X")
    for name in sorted({r["algorithm"] for r in rows}):  # Markers tell overlapping lines apart.
        points = sorted((r["num_peers"], r["bytes_per_iteration"]) for r in rows
                        if r["algorithm"] == name)
        ax.plot(*zip(*points, strict=True), marker=next(markers, "o"), label=name,
                markerfacecolor="none")
    peers = sorted({r["num_peers"] for r in rows})
    if len(peers) > 1:
        smallest = min(r["bytes_per_iteration"] for r in rows if r["num_peers"] == peers[0])
        base = peers[0] * math.log2(peers[0])
        ax.plot(peers, [smallest * n * math.log2(n) / base for n in peers], "k--", lw=0.8,
                label="∝ N log N")
        ax.plot(peers, [smallest * n * n / peers[0] ** 2 for n in peers], "k:", lw=0.8,
                label="∝ N²")
    ax.set(xscale="log", yscale="log", xlabel="peers N", ylabel="bytes per iteration",
           title="Communication per FL iteration")
    _save(fig, path, [ax])


def plot_churn(rows: Sequence[dict], path: str) -> None:
    """Final accuracy and bytes to the target against dropout, one line per algorithm.
    rows: dicts with `algorithm`, `dropout`, `final_accuracy`, `bytes_to_target` ('' if the
    target was not reached)."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for name in sorted({r["algorithm"] for r in rows}):
        mine = sorted((r for r in rows if r["algorithm"] == name), key=lambda r: r["dropout"])
        left.plot([r["dropout"] for r in mine], [r["final_accuracy"] for r in mine],
                  marker="o", label=name)
        error_bars(left, [r["dropout"] for r in mine], mine, "final_accuracy")
        reached = [r for r in mine if r["bytes_to_target"] != ""]
        right.plot([r["dropout"] for r in reached], [r["bytes_to_target"] for r in reached],
                   marker="o", label=name)
    left.set(xlabel="dropout probability", ylabel="final test accuracy",
             title="Accuracy under churn")
    right.set(xlabel="dropout probability", ylabel="bytes to target", yscale="log",
              title="Communication to reach the target")
    for ax in (left, right):
        ax.grid(True, alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_accuracy_vs_bytes(curves: dict[str, Sequence[dict]], path: str,
                           thresholds: Sequence[float] = (0.5, 0.95)) -> None:
    """Test accuracy against cumulative bytes, one line per run, with horizontal guides at the
    `thresholds`. curves: label -> metrics rows (evaluated rows carry `accuracy`)."""
    fig, ax = plt.subplots(figsize=(6.4, 4.8))
    for label, rows in curves.items():
        evaluated = [r for r in rows if "accuracy" in r]
        accuracy_curve(ax, [r["cumulative_bytes"] for r in evaluated], evaluated, marker=".",
                       label=label)
    for level in thresholds:
        ax.axhline(level, color="k", lw=0.6, ls=":")
    ax.set(xscale="log", xlabel="cumulative bytes", ylabel="test accuracy",
           title="Accuracy against communication")
    _save(fig, path, [ax])


def plot_accuracy_vs_sim_time(curves: dict[str, Sequence[dict]], path: str,
                              thresholds: Sequence[float] = ()) -> None:
    """Test accuracy against simulated seconds (`cumulative_sim_seconds`, runs with
    --network), one line per run. curves: label -> metrics rows."""
    fig, ax = plt.subplots(figsize=(6.4, 4.8))
    for label, rows in curves.items():
        evaluated = [r for r in rows if "accuracy" in r and "cumulative_sim_seconds" in r]
        accuracy_curve(ax, [r["cumulative_sim_seconds"] / 3600 for r in evaluated], evaluated,
                       marker=".", label=label)
    for level in thresholds:
        ax.axhline(level, color="k", lw=0.6, ls=":")
    ax.set(xscale="log", xlabel="simulated time (hours)", ylabel="test accuracy",
           title="Accuracy against simulated time")
    _save(fig, path, [ax])


def plot_time_to_target(rows: Sequence[dict], path: str) -> None:
    """Simulated hours to the target against N, one panel per profile, one line per algorithm
    (runs that missed the target are left out). rows: the network study's rows."""
    profiles = list(dict.fromkeys(r["profile"] for r in rows))
    fig, axes = plt.subplots(1, len(profiles), figsize=(4.8 * len(profiles), 4), sharey=True,
                             squeeze=False)
    for ax, profile in zip(axes[0], profiles, strict=True):
        mine = [r for r in rows if r["profile"] == profile]
        for name in sorted({r["algorithm"] for r in mine}):
            points = sorted((r["num_peers"], r["sim_seconds_to_target"] / 3600) for r in mine
                            if r["algorithm"] == name and r["sim_seconds_to_target"] != "")
            if points:
                ax.plot(*zip(*points, strict=True), marker="o", label=name)
        ax.set(xscale="log", yscale="log", xlabel="peers N", title=profile)
    axes[0][0].set(ylabel="simulated hours to target")
    _save(fig, path, axes[0])


def plot_codec_bytes(rows: Sequence[dict], path: str) -> None:
    """Bytes to the target per algorithm, one bar per codec and momentum setting (hatched:
    weights only); a run that missed the target gets an x at the axis floor instead of a bar.
    rows: the codec study's rows."""
    algorithms = list(dict.fromkeys(r["algorithm"] for r in rows))
    variants = list(dict.fromkeys((r["codec"], r["share_momentum"]) for r in rows))
    codecs = list(dict.fromkeys(codec for codec, _ in variants))
    width = 0.8 / len(variants)
    reached = [r["bytes_to_target"] for r in rows if r["bytes_to_target"] != ""]
    floor = min(reached) / 2 if reached else 1.0
    fig, ax = plt.subplots(figsize=(max(6.4, 1.6 * len(algorithms)), 4.8))
    for k, (codec, share) in enumerate(variants):
        color = f"C{codecs.index(codec)}"
        label = f"{codec}, {'momentum' if share else 'weights only'}"
        for a, name in enumerate(algorithms):
            row = next((r for r in rows if r["algorithm"] == name
                        and (r["codec"], r["share_momentum"]) == (codec, share)), None)
            if row is None:
                continue
            x = a - 0.4 + (k + 0.5) * width
            if row["bytes_to_target"] == "":
                ax.plot(x, floor, marker="x", color=color)
            else:
                ax.bar(x, row["bytes_to_target"], width, color=color,
                       hatch="" if share else "//", edgecolor="k", linewidth=0.4, label=label)
                label = None  # One legend entry per variant.
    ax.set_xticks(range(len(algorithms)), algorithms)
    ax.set(yscale="log", ylabel="bytes to target (x: target missed)",
           title="Bytes to the target by message codec")
    ax.legend(fontsize="small", ncol=2)
    ax.grid(True, axis="y", which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_accuracy_vs_iteration(curves: dict[str, Sequence[dict]], path: str) -> None:
    """Test accuracy against iteration, one line per run. curves: label -> metrics rows."""
    fig, ax = plt.subplots(figsize=(6.4, 4.8))
    for label, rows in curves.items():
        evaluated = [r for r in rows if "accuracy" in r]
        accuracy_curve(ax, [r["iteration"] for r in evaluated], evaluated, marker=".",
                       label=label)
    ax.set(xlabel="iteration", ylabel="test accuracy", title="Accuracy over iterations")
    _save(fig, path, [ax], which="major")


def plot_traces(curves: dict[str, Sequence[dict]], path: str) -> None:
    """Per-iteration traces, one line per run: mean group size, and the consensus distance (mean
    squared distance of the present peers' parameters from their mean) before and after
    aggregation (log scale). curves: label -> metrics rows."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for label, rows in curves.items():
        iterations = [r["iteration"] for r in rows]
        left.plot(iterations, [r.get("mean_group_size", 0.0) for r in rows], label=label)
        line, = right.plot(iterations, [max(r.get("consensus_before", 0.0), 1e-30) for r in rows],
                           label=f"{label}, before")
        right.plot(iterations, [max(r.get("consensus_after", 0.0), 1e-30) for r in rows],
                   ls="--", color=line.get_color(), label=f"{label}, after")
    left.set(xlabel="iteration", ylabel="mean group size", title="Group sizes")
    right.set(xlabel="iteration", ylabel="consensus distance", yscale="log",
              title="Disagreement before / after aggregation")
    for ax in (left, right):
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def read_metrics(workdir: str) -> list[dict]:
    """The rows of WORKDIR/metrics.jsonl (a torn last line is dropped)."""
    rows = []
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        for line in f:
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                break
    return rows


def plot_runs(workdirs: Sequence[str], out_dir: str, labels: Sequence[str] | None = None,
              ) -> list[str]:
    """Draws the finished runs in `workdirs` together into out_dir: accuracy.png (against
    iteration), accuracy_vs_bytes.png, traces.png and, when the runs have a simulated clock,
    accuracy_vs_time.png. Labels default to the folder names. Returns the paths written."""
    labels = list(labels or [os.path.basename(os.path.normpath(w)) for w in workdirs])
    curves = {label: read_metrics(w) for label, w in zip(labels, workdirs, strict=True)}
    os.makedirs(out_dir, exist_ok=True)
    paths = [os.path.join(out_dir, name) for name in
             ("accuracy.png", "accuracy_vs_bytes.png", "traces.png")]
    plot_accuracy_vs_iteration(curves, paths[0])
    plot_accuracy_vs_bytes(curves, paths[1], thresholds=())
    plot_traces(curves, paths[2])
    if any("cumulative_sim_seconds" in row for rows in curves.values() for row in rows):
        paths.append(os.path.join(out_dir, "accuracy_vs_time.png"))
        plot_accuracy_vs_sim_time(curves, paths[-1])
    return paths
