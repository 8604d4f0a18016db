"""What replicas cost: the wall time of one `--replicas=R` run against R single runs of the
same command (seeds seed .. seed + R - 1), each a whole `launch.train` process, alternated
(replicas, singles, replicas, singles, ...) so both meet the machine in the same state.

    python -m benchmarks.replicas_cost                                  # MLP and CNN at N = 64
    python -m benchmarks.replicas_cost --setups=mlp --replicas=3 --iterations=30   # done-when
    python -m benchmarks.replicas_cost --steps --setups=mlp --replicas=1,3 --chunks=1,4

With --steps, only the compiled iteration is timed, in this process: milliseconds per
iteration (and per replica) of R replicas at each --chunks (the plan's peer chunk), over 10
warm iterations after the first.

Each side starts from empty caches of its own (the launchers' persistent XLA compilation cache
and the plan cache beside it, in a fresh folder per side and pair), as a user's first runs
would: the single runs after the first reuse its plan and, where the program is the same,
its compiled code; the replicated run plans and compiles once. Prints each
side's median wall seconds and their ratio per setup (results: benchmarks/RESULTS.md,
"Replicas").
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
import time

from absl import app, flags

from benchmarks.pfl_fedavg import cpu_name

flags.DEFINE_list("setups", ["mlp", "cnn"], "Models at N = 64 (MAR-FL, 4x4x4 grid).")
flags.DEFINE_list("replicas", ["4"], "R: replicas in one run against R single runs (--steps: "
                  "each R timed).")
flags.DEFINE_bool("steps", False, "Time the compiled iteration only (module docstring).")
flags.DEFINE_list("chunks", ["1", "4"], "--steps: the peer chunks timed.")
flags.DEFINE_list("iterations", ["30", "5"], "Iterations per setup (one value: all).")
flags.DEFINE_integer("repeats", 2, "Pairs (replicas, singles) timed per setup.")
FLAGS = flags.FLAGS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def command(model: str, iterations: int, workdir: str, **flags_) -> list[str]:
    return [sys.executable, "-m", "launch.train", f"--model={model}", "--num_peers=64",
            "--group_size=4", "--key_dim=3", f"--max_iterations={iterations}",
            "--eval_every=10", "--checkpoint_every=0", f"--workdir={workdir}"] + [
        f"--{name}={value}" for name, value in flags_.items()]


def timed(commands: list[list[str]], env: dict) -> float:
    """Wall seconds of running `commands` one after another."""
    start = time.perf_counter()
    for cmd in commands:
        subprocess.run(cmd, cwd=ROOT, env=env, check=True, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def time_steps(model: str, replicas: int, chunk: int) -> tuple[float, str]:
    """(warm seconds per iteration of `replicas` replicas, the plan) at peer chunk `chunk`."""
    import jax

    from marfl_jax import assemble
    from marfl_jax.config import Config

    config = Config(model=model, num_peers=64, group_size=4, key_dim=3, replicas=replicas,
                    plan="fixed", peer_chunk=chunk, workdir=tempfile.mkdtemp()).validate()
    run = assemble.assemble(config, config.workdir, None)
    state = assemble.initial_state(config, run.model, run.sim, run.test_images[:1])
    state, _, _ = run.steps(state, 0)
    jax.block_until_ready(state)
    start = time.perf_counter()
    for t in range(1, 11):
        state, _, _ = run.steps(state, t)
    jax.block_until_ready(state)
    return (time.perf_counter() - start) / 10, run.plan.describe()


def main(argv):
    del argv
    iterations = [int(i) for i in FLAGS.iterations]
    if FLAGS.steps:
        print(f"CPU: {cpu_name()} ({os.cpu_count()} cores); N = 64, MAR-FL 4x4x4")
        for model in FLAGS.setups:
            for chunk in (int(c) for c in FLAGS.chunks):
                for replicas in (int(r) for r in FLAGS.replicas):
                    seconds, plan = time_steps(model, replicas, chunk)
                    print(f"{model} R={replicas} {plan}: {1e3 * seconds:.0f} ms per iteration, "
                          f"{1e3 * seconds / replicas:.0f} ms per replica", flush=True)
        return
    replicas = int(FLAGS.replicas[0])
    env = {name: value for name, value in os.environ.items()
           if name not in ("MARFL_PLAN_CACHE", "JAX_COMPILATION_CACHE_DIR")}
    env["JAX_PLATFORMS"] = "cpu"
    print(f"CPU: {cpu_name()} ({os.cpu_count()} cores); R = {replicas}; "
          f"{FLAGS.repeats} alternated pairs per setup")
    for i, model in enumerate(FLAGS.setups):
        its = iterations[min(i, len(iterations) - 1)]
        together, apart = [], []
        for _ in range(FLAGS.repeats):
            with tempfile.TemporaryDirectory() as scratch:
                def caches(side, scratch=scratch):
                    return {**env, "JAX_COMPILATION_CACHE_DIR": os.path.join(scratch, side, "xla")}

                together.append(timed([command(model, its, os.path.join(scratch, "r"),
                                               replicas=replicas)], caches("together")))
                apart.append(timed([command(model, its, os.path.join(scratch, f"s{s}"),
                                            seed=s) for s in range(replicas)], caches("apart")))
        a, b = statistics.median(together), statistics.median(apart)
        print(f"{model} N=64, {its} iterations: --replicas={replicas} {a:.1f} s (runs "
              f"{', '.join(f'{t:.1f}' for t in together)}); {replicas} single runs {b:.1f} s "
              f"(runs {', '.join(f'{t:.1f}' for t in apart)}); ratio {a / b:.2f}x "
              f"({b / a:.2f}x faster)", flush=True)


if __name__ == "__main__":
    app.run(main)
