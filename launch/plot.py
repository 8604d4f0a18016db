"""Draws finished runs together: accuracy against iteration and against cumulative bytes, and the
group-size and consensus-distance traces.

    python -m launch.plot runs/n64 runs/fedavg --out=runs/plots
    python -m launch.plot runs/mkd/*              # into the first run's folder by default
"""

from __future__ import annotations

import os
import sys

from absl import app, flags

flags.DEFINE_string("out", "", "Output folder (default: the first workdir).")
flags.DEFINE_list("labels", None, "One label per workdir (default: the folder names).")
FLAGS = flags.FLAGS


def main(argv: list[str]) -> None:
    workdirs = argv[1:]
    missing = [w for w in workdirs if not os.path.exists(os.path.join(w, "metrics.jsonl"))]
    if not workdirs or missing:
        print("error: give one or more workdirs holding metrics.jsonl"
              + (f"; none in: {', '.join(missing)}" if missing else ""), file=sys.stderr)
        sys.exit(2)
    if FLAGS.labels and len(FLAGS.labels) != len(workdirs):
        print(f"error: --labels has {len(FLAGS.labels)} entries for {len(workdirs)} workdirs",
              file=sys.stderr)
        sys.exit(2)
    from marfl_jax import plotting

    for path in plotting.plot_runs(workdirs, FLAGS.out or workdirs[0], FLAGS.labels):
        print(f"wrote {path}")


if __name__ == "__main__":
    app.run(main)
