"""Figures from finished runs (matplotlib, Agg backend: works headless)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def plot_bytes_per_iteration(rows: Sequence[dict], path: str) -> None:
    """Log-log plot of bytes per iteration against N, one line per algorithm, with N log N and
    N^2 guides anchored at the smallest N. rows: dicts with `algorithm`, `num_peers`,
    `bytes_per_iteration`."""
    fig, ax = plt.subplots(figsize=(6.4, 4.8))
    algorithms = sorted({r["algorithm"] for r in rows})
    for name in algorithms:
        points = sorted((r["num_peers"], r["bytes_per_iteration"]) for r in rows
                        if r["algorithm"] == name)
        ax.plot(*zip(*points, strict=True), marker="o", label=name)
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
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
