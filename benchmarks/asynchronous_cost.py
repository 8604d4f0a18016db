"""What asynchrony costs in wall time: seconds per local phase, asynchronous (waves over
buckets, waves over all peers with masks) vs synchronous, on the MLP with lognormal peers.

For each N the runs train the same peers (`--iterations` local phases per peer on average) in
one process, one after another; a run's warm wall time is over its second half of rows (from
the end of the middle row to the end of the last; the first half meets each bucket size and
compiles it), divided by the local phases done in between.

    python -m benchmarks.asynchronous_cost                  # N = 64 and 1,024 (~15 minutes)
    python -m benchmarks.asynchronous_cost --num_peers=64   # ~2 minutes

Prints one table per N with the ratios to the synchronous run (results: benchmarks/RESULTS.md,
"Asynchronous waves").
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile

import jax
from absl import app, flags, logging

from benchmarks.pfl_fedavg import cpu_name
from marfl_jax import runner
from marfl_jax.config import Config

flags.DEFINE_list("num_peers", ["64", "1024"], "Peer counts N (M = 4, d = log4 N).")
flags.DEFINE_integer("iterations", 20, "Local phases per peer (the synchronous iterations).")
flags.DEFINE_list("layouts", ["buckets", "masks"], "Wave layouts timed.")
FLAGS = flags.FLAGS


def config_for(num_peers: int, iterations: int, **changes) -> Config:
    key_dim = {16: 2, 64: 3, 256: 4, 1024: 5, 4096: 6}.get(num_peers, 3)
    return dataclasses.replace(Config(
        model="mlp", num_peers=num_peers, group_size=4, key_dim=key_dim, network="lognormal",
        compute_sigma=1.0, matchmaking_window_s=2.0, row_every_s=10.0,
        max_iterations=iterations,
        eval_every=10_000, eval_peers="8", target_accuracy=1.0, checkpoint_every=0),
        **changes)  # --plan=auto: one plan per N, measured once and cached for every run.


def seconds_per_phase(rows: list[dict]) -> tuple[float, int]:
    """(warm wall seconds per local phase, phases timed) over a run's second half of rows
    (the first half meets the new bucket sizes, each traced and compiled once)."""
    half = len(rows) // 2
    first, last = rows[half], rows[-1]
    if "cumulative_local_phases" in first:
        phases = last["cumulative_local_phases"] - first["cumulative_local_phases"]
    else:
        phases = sum(r["updating_peers"] for r in rows[half + 1:])
    return (last["seconds"] - first["seconds"]) / max(phases, 1), phases


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)
    cache = tempfile.mkdtemp(prefix="asynchronous_cost_xla_")  # The second runs' compilations.
    jax.config.update("jax_compilation_cache_dir", cache)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    print(f"CPU: {cpu_name()}, {os.cpu_count()} cores")
    for num_peers in map(int, FLAGS.num_peers):
        timings = {}
        runs = [("synchronous", {})] + [
            (f"asynchronous, {layout}", dict(asynchronous=True, wave_layout=layout))
            for layout in FLAGS.layouts]
        for name, changes in runs:
            config = config_for(num_peers, FLAGS.iterations, **changes)
            # Buckets: the second run finds every bucket size compiled (on disk).
            for _ in range(2 if config.asynchronous and config.wave_layout == "buckets" else 1):
                with tempfile.TemporaryDirectory() as workdir:
                    rows = runner.run(config, workdir).metrics
            per_phase, phases = seconds_per_phase(rows)
            extra = ({} if not config.asynchronous else {
                "wave_size_mean": round(sum(r["wave_size_mean"] for r in rows) / len(rows), 1),
                "waves_per_row": round(sum(r["waves"] for r in rows) / len(rows), 1)})
            timings[name] = per_phase
            print(json.dumps({"num_peers": num_peers, "run": name,
                              "ms_per_local_phase": round(per_phase * 1e3, 3),
                              "phases_timed": phases, "rows": len(rows), **extra}), flush=True)
        baseline = timings["synchronous"]
        print(f"N = {num_peers}: wall time per local phase relative to the synchronous run's "
              f"({baseline * 1e3:.3f} ms): " + ", ".join(
                  f"{name} {timings[name] / baseline:.2f}x" for name, _ in runs[1:]))


if __name__ == "__main__":
    app.run(main)
