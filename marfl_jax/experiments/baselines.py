"""MAR-FL against FedAvg, AR-FL and RDFL on MNIST at N = 16, 64, 125, to the target: bytes per
iteration and to the target (section 1 of the reproduction).

    python -m launch.reproduce --experiments=baselines
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os

from marfl_jax import plotting
from marfl_jax.report import describe, pct, set_of
from marfl_jax.scales import mnist_config
from marfl_jax.sweep import RESULT_COLUMNS, ROW_FIELDS, Study

REFERENCE = "marfl"  # The algorithm the others' bytes are divided by.


def configs(scale, workdir):
    runs = []
    for n in scale.peer_counts:
        base = mnist_config(scale, n, workdir)
        for name in scale.algorithms:
            runs.append(dataclasses.replace(
                base, algorithm=name, workdir=os.path.join(workdir, f"n{n}_{name}")).validate())
    return runs


def setting(scale, configs):
    return (f"N in {set_of(scale.peer_counts)}, algorithms "
            f"{', '.join(scale.algorithms)}; {describe(configs[0])}; full participation, IID; "
            "MAR-FL on a perfect Moshpit grid (16 = 4x4, 64 = 4x4x4, 125 = 5x5x5).")


def draw(rows, curves, configs, path):
    plotting.plot_bytes_per_iteration(rows, path)
    largest = max(r["num_peers"] for r in rows)
    plotting.plot_accuracy_vs_bytes(
        {label: m for label, m in curves.items() if label.startswith(f"n{largest}_")},
        path.replace(".png", f"_accuracy_n{largest}.png"), (0.5,))


def growth(rows, name) -> float | None:
    """The exponent k of bytes per iteration ~ N^k between the smallest and largest N."""
    points = sorted((r["num_peers"], r["bytes_per_iteration"]) for r in rows
                    if r["algorithm"] == name)
    if len(points) < 2 or points[0][0] == points[-1][0]:
        return None
    (n0, b0), (n1, b1) = points[0], points[-1]
    return math.log(b1 / b0) / math.log(n1 / n0)


def add_bytes_vs_reference(rows, reference) -> None:
    """Each row's bytes to the target over the reference's at the same N ('' where either
    missed), as `bytes_vs_<reference>`."""
    theirs = {r["num_peers"]: r["bytes_to_target"] for r in rows if r["algorithm"] == reference}
    for r in rows:
        mine = theirs.get(r["num_peers"], "")
        r[f"bytes_vs_{reference}"] = ("" if "" in (mine, r["bytes_to_target"]) or not mine
                                      else r["bytes_to_target"] / mine)


def summarize(rows, reference=REFERENCE) -> str:
    parts = []
    largest = max(r["num_peers"] for r in rows)
    at_largest = [r for r in rows if r["num_peers"] == largest]
    reached = [r for r in at_largest if r["reached_target"]]
    if at_largest:
        low, high = (f(r["final_accuracy"] for r in at_largest) for f in (min, max))
        parts.append(f"At N = {largest}, {len(reached)} of {len(at_largest)} algorithms reached "
                     "the target; " + (
                         f"all ended at the same accuracy, {pct(low)} (at full participation "
                         "every one of them averages exactly, so the models are the same and "
                         "only the bytes differ)." if low == high else
                         f"final accuracies span {pct(low)} to {pct(high)}."))
    ratio = f"bytes_vs_{reference}"
    for r in at_largest:
        if r["algorithm"] != reference and r.get(ratio, "") != "":
            parts.append(f"{r['algorithm']} needed {r[ratio]:.2f}x MAR-FL's bytes to "
                         "the target.")
    growths = {name: growth(rows, name) for name in sorted({r["algorithm"] for r in rows})}
    shown = [f"{name} N^{k:.2f}" for name, k in growths.items() if k is not None]
    if shown:
        smallest = min(r["num_peers"] for r in rows)
        n_log_n = (math.log(largest * math.log(largest) / (smallest * math.log(smallest)))
                   / math.log(largest / smallest))
        parts.append(f"Bytes per iteration grew as {', '.join(shown)} between N = {smallest} "
                     f"and {largest} (N log N would be N^{n_log_n:.2f} over this range).")
    return " ".join(parts)


STUDY = Study(
    name="baselines",
    configs=configs,
    fields=(*ROW_FIELDS, f"bytes_vs_{REFERENCE}"),
    draw=draw,
    section=1,
    title="MAR-FL against FedAvg, AR-FL and RDFL on MNIST",
    claim=("MAR-FL matches the accuracy of centralized FedAvg and of the P2P baselines "
           "while its communication per iteration grows as O(N log N) instead of the "
           "O(N^2) of AR-FL and RDFL, so its advantage widens as N grows. Counting as the "
           "authors do, an AR-FL peer receives N-1 models per iteration and a MAR-FL peer "
           "G(M-1) (with momentum), e.g. (N-1)/(G(M-1)) = 10.3x fewer messages at N = 125, "
           "M = 5, G = 3."),
    setting=setting,
    columns=(("num_peers", "N"), ("algorithm", "algorithm"), *RESULT_COLUMNS,
             (f"bytes_vs_{REFERENCE}", "bytes to target / MAR-FL's")),
    summarize=summarize,
    derive=functools.partial(add_bytes_vs_reference, reference=REFERENCE))
