r"""One script for a GPU (or any accelerator): what this simulator does on it, in under 8 minutes.

    PYTHONPATH=. python -m benchmarks.device_check --markdown=$OUT/device_check.md
    python -m benchmarks.device_check --tiny --budget_s=60   # about a minute, on any machine

Each figure is one line, printed and appended to the --markdown file (flushed and fsynced) the
moment it is measured, after a header line (device, jax version, host CPU, --deterministic, the
XLA_FLAGS the sections start with, the command): a run killed half-way leaves every line it had
measured. The sections, in order:

  peaks              matmul peaks: float32 at jax's matmul precision 'highest' and 'default'
                     (TF32 on NVIDIA GPUs), and bfloat16
  main_job_auto      the main job (`python -m launch.train` defaults: MAR-FL, CNN, 64 peers,
                     embedded MNIST) for 30 iterations with --plan=auto: the plan, the wall time
                     (plan and compiles included) and the steady seconds per iteration
  main_job_fixed     the same with --plan=fixed
  deterministic_off  the same 30 iterations with main_job_auto's plan and --deterministic=false
                     (XLA_FLAGS without --xla_gpu_deterministic_ops): its seconds per iteration
                     against main_job_auto's
  determinism        deterministic ops on: a run with churn (MLP, 16 peers, dropout 0.25, 4
                     iterations) against the same run stopped half-way and resumed: identical
                     rows (apart from 'seconds') and final parameters?
  mlp_scale          MLP local-training peer-steps/s at N = 1,000 / 10,000 / 100,000, one line
                     each; an N whose path does not fit the device's memory is halved until it
                     does, and the line says why; then the largest N run and why it stopped
  mar_round          a MAR round against a copy of the state
  cnn                the CNN at N = 1,000
  torch_loop         the per-peer PyTorch loop on the same device, float32 with TF32 off (like
                     ours at 'highest'), with the ratios to the above ('skipped: torch not
                     installed' when torch does not import)

Every section runs in its own child process (`--section=NAME`; the XLA flags are read when its
backend starts) under its own time limit (`LIMIT_S`, `TINY_LIMIT_S` with --tiny, times
--limit_scale): a section that passes it is killed, however long a compile it is in, and the
line "section NAME stopped: time limit N s" stands for it. A section starts only when the time
spent plus its limit is within --budget_s (else "section NAME not started: budget"), so the check
ends within its budget; the default budget is the sum of the limits (480 s). A section that
raises becomes "section NAME failed: ExcType: message" and the next one runs. SIGTERM (and
Ctrl-C) end the run and its child with a last line saying so. `--isolation=none` runs the sections
in this process without limits (tests). It imports only what the core needs (jax, flax, optax,
chex, absl, orbax), so it runs from a working tree with PYTHONPATH=.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import threading
import time
import types
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import training_throughput as tt

# Each section's time limit on one GPU (seconds, child process start included): a section
# starts only when the time spent plus its limit is within the budget, and is killed at it.
LIMIT_S = {"peaks": 25, "main_job_auto": 110, "main_job_fixed": 55, "deterministic_off": 55,
           "determinism": 50, "mlp_scale": 75, "mar_round": 30, "cnn": 40, "torch_loop": 40}
# The same with --tiny, on a loaded 2-core CPU (a child's imports alone take ~4 s there).
TINY_LIMIT_S = {"peaks": 10, "main_job_auto": 25, "main_job_fixed": 18, "deterministic_off": 18,
                "determinism": 25, "mlp_scale": 15, "mar_round": 12, "cnn": 15, "torch_loop": 10}
SECTIONS = tuple(LIMIT_S)
DEFAULT_BUDGET_S = float(sum(LIMIT_S.values()))  # 480 s: every section fits, at its limit.
MAIN_JOB_ITERATIONS = 30
# A child's exit status when its section raised (it wrote the "failed" line itself).
FAILED_EXIT = 3
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# --------------------------------------------------------------------------------------------
# The report: every line printed and made durable the moment it is measured.
# --------------------------------------------------------------------------------------------


class Report:
    """Prints each line (flushed) and appends it to `path` as "- line", flushed and fsynced."""

    def __init__(self, path: str = ""):
        self.file = None
        if path:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            self.file = open(path, "a")  # noqa: SIM115 (closed by close()).

    def line(self, text: str) -> None:
        print(text, flush=True)
        if self.file is not None:
            self.file.write(f"- {text}\n")
            self.file.flush()
            os.fsync(self.file.fileno())

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None


class Check:
    """What the sections share: the flags, the report, the figures measured so far (JSON, so a
    child process can read its predecessors' and add its own) and the section's deadline."""

    def __init__(self, args, report: Report, results: dict | None = None):
        self.args, self.report, self.tiny = args, report, args.tiny
        self.repeats = 1 if args.tiny else 3
        self.results: dict = results if results is not None else {}
        self.deadline = float("inf")  # perf_counter seconds: the section's time limit.

    def line(self, text: str) -> None:
        self.report.line(text)


def section_limit(name: str, args) -> float:
    return (TINY_LIMIT_S if args.tiny else LIMIT_S)[name] * args.limit_scale


# --------------------------------------------------------------------------------------------
# Measurements (reused by the sections).
# --------------------------------------------------------------------------------------------


def peak(dtype, size: int, repeats: int, precision: str | None = None) -> float:
    """GFLOP/s of a jitted size x size matmul in `dtype`, traced under jax's
    `default_matmul_precision(precision)` when given."""
    a = jax.random.normal(jax.random.key(0), (size, size)).astype(dtype)
    b = jax.random.normal(jax.random.key(1), (size, size)).astype(dtype)

    def timed():
        f = jax.jit(lambda x, y: jnp.dot(x, y))  # A fresh trace under the current precision.
        return tt._median_time(lambda: jax.block_until_ready(f(a, b)), repeats)

    if precision is None:
        seconds = timed()
    else:
        with jax.default_matmul_precision(precision):
            seconds = timed()
    return 2 * size**3 / seconds / 1e9


def main_job(tiny: bool, plan: str = "auto", **overrides) -> dict:
    """The launcher's default run (or a tiny one) for MAIN_JOB_ITERATIONS iterations with
    --plan=`plan`: wall seconds (plan and compiles included), steady seconds per iteration (the
    median gap between rows), accuracy and the plan the run used."""
    from marfl_jax import Config, run

    if tiny:
        config = Config(model="mlp", num_peers=4, group_size=2, key_dim=2, max_iterations=2,
                        checkpoint_every=0, target_accuracy=0.5, plan=plan, **overrides)
    else:
        config = Config(max_iterations=MAIN_JOB_ITERATIONS, eval_every=10, checkpoint_every=0,
                        plan=plan, **overrides)
    with tempfile.TemporaryDirectory() as workdir:
        start = time.perf_counter()
        result = run(config, workdir)
        wall_s = time.perf_counter() - start
        used = _read_plan(os.path.join(workdir, "plan.json"))
    summary, seconds = result.summary, [r["seconds"] for r in result.metrics]
    gaps = np.diff(seconds) if len(seconds) > 1 else np.asarray(seconds)
    return {"wall_s": wall_s, "iterations": summary["iterations"],
            "iteration_s": float(np.median(gaps)) if len(gaps) else float("nan"),
            "reached": summary["reached_target"], "accuracy": summary["final_accuracy"],
            "target": summary["target_accuracy"], "plan": used[0], "plan_fields": used[1]}


def _read_plan(path: str) -> tuple[str, dict]:
    from marfl_jax import plan as plan_lib

    try:
        with open(path) as f:
            fields = json.load(f)
        return plan_lib.Plan(**fields).describe(), fields
    except (OSError, ValueError, TypeError):
        return "?", {}


def _args(tiny: bool, batch: int, repeats: int):
    return types.SimpleNamespace(learning_rate=0.1, momentum=0.9, local_batches=1 if tiny else 4,
                                 batch_size=batch, repeats=repeats, group_size=0)


class Figure(types.SimpleNamespace):
    """One (model, N) training figure: `asked` N, the `n` measured, `rate` (peer-steps/s) and the
    memory skips (N, tt.Skip) that halved N on the way."""


def training_figure(setup, asked: int, repeats: int) -> Figure:
    """Peer-steps/s of the vectorized local update at N = `asked`, halving N only while the path
    is skipped for memory; any other failure raises."""
    n, shortfalls = asked, []
    while True:
        path = tt.vectorized_path(setup, n)
        if not isinstance(path, str):
            break
        if not getattr(path, "memory", False):
            raise RuntimeError(f"{setup.name} N={n:,}: {path}")
        shortfalls.append((n, path))
        if n <= 1:
            return Figure(asked=asked, n=n, rate=None, shortfalls=shortfalls)
        n //= 2
    seconds = tt._median_time(path.run, repeats)
    return Figure(asked=asked, n=n, rate=n * setup.b / seconds, shortfalls=shortfalls,
                  compile_s=getattr(path, "compile_s", 0.0))


def _gib(nbytes) -> str:
    return "? GiB" if nbytes is None else f"{nbytes / 2**30:.1f} GiB"


def shortfall_text(figure: Figure) -> str:
    """Why N is smaller than asked: "(asked 100,000: needs 150.0 GiB at 100,000, 75.0 GiB at
    50,000; the device (gpu NVIDIA H200) has 60.0 GiB available)"; '' when it is not."""
    if not figure.shortfalls:
        return ""
    needs = ", ".join(f"{_gib(skip.needed)} at {n:,}" for n, skip in figure.shortfalls)
    last = figure.shortfalls[-1][1]
    return (f" (asked {figure.asked:,}: needs {needs}; the device ({last.device}) has "
            f"{_gib(last.available)} available)")


def figure_line(label: str, figure: Figure, batch: int) -> str:
    rate = (f"{figure.rate:,.0f} peer-steps/s" if figure.rate is not None
            else "did not fit at any N")
    return f"{label} N={figure.n:,} B={batch}: {rate}{shortfall_text(figure)}"


def torch_loop(model: str, args, peers: int) -> float | str:
    """Peer-steps/s of the per-peer PyTorch loop on the same kind of device (cuda if any)."""
    try:
        import torch
    except ImportError:
        return "skipped: torch not installed"
    device = "cuda" if torch.cuda.is_available() else "cpu"
    # float32 throughout, TF32 off: the same arithmetic as ours at --matmul_precision=highest.
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.set_default_dtype(torch.float32)
    setup = tt.Setup(model, args)
    torch.manual_seed(0)
    nets = [tt._torch_module(torch, model).to(device) for _ in range(peers)]
    moms = [[torch.zeros_like(p) for p in net.parameters()] for net in nets]
    images, labels = setup.data(peers)
    xs = torch.from_numpy(np.array(images).transpose(0, 1, 2, 5, 3, 4).copy()).to(device)
    ys = torch.from_numpy(np.array(labels, np.int64)).to(device)

    def one_pass():
        for i, (net, mom) in enumerate(zip(nets, moms, strict=True)):
            params = list(net.parameters())
            for s in range(setup.b):
                for p in params:
                    p.grad = None
                torch.nn.functional.cross_entropy(net(xs[i, s]), ys[i, s]).backward()
                with torch.no_grad():
                    for p, m in zip(params, mom, strict=True):
                        m.mul_(0.9).add_(p.grad, alpha=0.1)
                        p.add_(m, alpha=-0.1)
        if device == "cuda":
            torch.cuda.synchronize()

    seconds = tt._median_time(one_pass, args.repeats)
    return peers * setup.b / seconds


def first_difference(first, second) -> str | None:
    """The first field where two runs' metrics rows differ (apart from 'seconds'), or None."""
    if len(first) != len(second):
        return f"row count: {len(first)} vs {len(second)}"
    for i, (a, b) in enumerate(zip(first, second, strict=True)):
        for key in sorted(set(a) | set(b)):
            if key == "seconds":
                continue
            if key not in a or key not in b or not _same(a[key], b[key]):
                return f"row {i} field '{key}': {a.get(key)!r} vs {b.get(key)!r}"
    return None


def _same(a, b) -> bool:
    if isinstance(a, float) and isinstance(b, float) and np.isnan(a) and np.isnan(b):
        return True
    return a == b


# --------------------------------------------------------------------------------------------
# The sections: each writes its own lines as it measures them.
# --------------------------------------------------------------------------------------------


def section_peaks(check: Check) -> None:
    size = 256 if check.tiny else 8192
    gpu = jax.devices()[0].platform == "gpu"
    for label, dtype, precision in (
            ("float32, precision 'highest'", jnp.float32, "highest"),
            ("float32, precision 'default'" + (" (TF32 on NVIDIA)" if gpu else ""),
             jnp.float32, "default"),
            ("bfloat16", jnp.bfloat16, None)):
        gflops = peak(dtype, size, check.repeats, precision)
        check.results.setdefault("peaks", {})[label] = gflops
        check.line(f"matmul peak {label}: {gflops:,.0f} GFLOP/s ({size}^2)")


def _job_line(label: str, job: dict) -> str:
    return (f"{label}: {job['wall_s']:.1f} s wall (plan and compiles included), "
            f"{job['iterations']} iterations, {job['iteration_s']:.3f} s/iteration steady, "
            f"final accuracy {job['accuracy']:.4f}, target {job['target']:.0%} reached: "
            f"{job['reached']}")


def _main_job(check: Check, plan: str) -> None:
    job = main_job(check.tiny, plan)
    check.results[f"main_job_{plan}"] = {k: job[k] for k in ("iteration_s", "plan_fields")}
    check.line(_job_line(f"main job (--plan={plan}: {job['plan']})", job))


def section_main_job_auto(check: Check) -> None:
    _main_job(check, "auto")


def section_main_job_fixed(check: Check) -> None:
    _main_job(check, "fixed")


def section_deterministic_off(check: Check) -> None:
    """The main job's steps with --deterministic=false (this child's XLA_FLAGS are without
    --xla_gpu_deterministic_ops), with main_job_auto's plan when it ran."""
    on = check.results.get("main_job_auto", {})
    fields = on.get("plan_fields") or {}
    plan = "fixed" if fields else "auto"
    job = main_job(check.tiny, plan, deterministic=False, **fields)
    flags = os.environ.get("XLA_FLAGS", "")
    ratio = (f"; with deterministic ops (main_job_auto) {on['iteration_s']:.3f} s/iteration, "
             f"on/off {on['iteration_s'] / job['iteration_s']:.2f}"
             if on.get("iteration_s") and job["iteration_s"] > 0 else "")
    check.line(_job_line(f"main job, --deterministic=false ({job['plan']}; XLA_FLAGS "
                         f"{flags!r})", job) + ratio)


def section_determinism(check: Check) -> None:
    """Deterministic ops on: a run straight through against the same run stopped half-way
    (checkpointed) and resumed."""
    from marfl_jax import Config, run

    size = dict(num_peers=4, group_size=2) if check.tiny else dict(num_peers=16, group_size=4)
    config = Config(model="mlp", key_dim=2, dropout=0.25, max_iterations=2 if check.tiny else 4,
                    eval_every=1, checkpoint_every=0, plan="fixed", deterministic=True, **size)
    half = config.max_iterations // 2
    with tempfile.TemporaryDirectory() as straight, tempfile.TemporaryDirectory() as resumed:
        first = run(config, straight)
        run(dataclasses.replace(config, max_iterations=half), resumed)
        second = run(config, resumed)
    what = (f"MLP {config.num_peers} peers, dropout {config.dropout}, {config.max_iterations} "
            f"iterations, deterministic ops on")
    difference = first_difference(first.metrics, second.metrics)
    if difference is None:
        leaves = [jax.tree.leaves(r.state.params) for r in (first, second)]
        same = all(np.array_equal(np.asarray(a), np.asarray(b))
                   for a, b in zip(*leaves, strict=True))
        difference = None if same else "the final parameters"
    check.line(f"determinism ({what}; straight vs stopped after {half} and resumed): " + (
        "identical (rows apart from 'seconds', and the final parameters)" if difference is None
        else f"differ: {difference}"))


def section_mlp_scale(check: Check) -> None:
    args = _args(check.tiny, 32, check.repeats)
    setup = tt.Setup("mlp", args)
    figures = check.results.setdefault("mlp", [])
    asked_ns = [4, 8] if check.tiny else [1_000, 10_000, 100_000]
    largest, why, estimate = None, "every N asked ran", None
    for asked in asked_ns:
        left = check.deadline - time.perf_counter()
        if estimate is not None and estimate(asked) > left:
            why = (f"N={asked:,} not started: ~{estimate(asked):.0f} s estimated, {left:.0f} s "
                   "of the section's time limit left")
            break
        started = time.perf_counter()
        figure = training_figure(setup, asked, args.repeats)
        spent = time.perf_counter() - started
        compile_s = min(getattr(figure, "compile_s", 0.0), spent)

        def estimate(n, spent=spent, compile_s=compile_s, done=asked):
            """The next N's time: a compile like this one's, the running scaled by N."""
            return compile_s + (spent - compile_s) * n / done

        figures.append({"n": figure.n, "rate": figure.rate})
        check.line(figure_line("MLP", figure, setup.batch))
        if figure.rate is not None:
            largest = figure.n if largest is None else max(largest, figure.n)
        if figure.shortfalls:  # The smallest N that did not fit.
            n_short, skip = figure.shortfalls[-1]
            why = (f"N={n_short:,} needs {_gib(skip.needed)}, more than "
                   f"{tt.MEMORY_FRACTION:.0%} of the {_gib(skip.available)} the device "
                   f"({skip.device}) has available; " + memory_hint())
            break
    check.line((f"MLP scale: largest N run {largest:,}" if largest is not None
                else "MLP scale: no N ran") + f"; stopped: {why}")


def memory_hint() -> str:
    from marfl_jax import memory

    return memory.mem_fraction_hint()


def section_cnn(check: Check) -> None:
    args = _args(check.tiny, 16, check.repeats)
    setup = tt.Setup("cnn", args)
    figure = training_figure(setup, 2 if check.tiny else 1_000, args.repeats)
    check.results["cnn"] = {"n": figure.n, "rate": figure.rate}
    check.line(figure_line("CNN", figure, setup.batch))


def section_mar_round(check: Check) -> None:
    args = _args(check.tiny, 32, check.repeats)
    n = 8 if check.tiny else 10_000
    row, note = tt.bench_mixing(tt.Setup("mlp", args), n, args)
    if row is None:
        if not getattr(note, "memory", False):
            raise RuntimeError(note)
        check.line(f"MAR round vs copy (MLP N={n:,}): {note}")
        return
    check.line(f"MAR round vs copy (MLP N={row[1]}, M={row[2]}): round {row[5]} ms, "
               f"copy {row[6]} ms, ratio {row[9]}")


def _ratios(figures: list[dict], torch_rate: float) -> str:
    parts = [f"{f['rate'] / torch_rate:.1f}x at N={f['n']:,}" for f in figures
             if f.get("rate") is not None]
    return f"; the vectorized path: {', '.join(parts)} its rate" if parts else ""


def section_torch_loop(check: Check) -> None:
    mlp_args = _args(check.tiny, 32, check.repeats)
    peers = 4 if check.tiny else 64
    rate = torch_loop("mlp", mlp_args, peers)
    if isinstance(rate, str):
        check.line(f"MLP per-peer torch loop: {rate}")
        check.line(f"CNN per-peer torch loop: {rate}")
        return
    check.line(f"MLP per-peer torch loop ({peers} peers, float32, TF32 off): {rate:,.0f} "
               "peer-steps/s" + _ratios(check.results.get("mlp", []), rate))
    cnn_args = _args(check.tiny, 16, check.repeats)
    peers = 2 if check.tiny else 32
    rate = torch_loop("cnn", cnn_args, peers)
    cnn = check.results.get("cnn")
    check.line(f"CNN per-peer torch loop ({peers} peers, float32, TF32 off): {rate:,.0f} "
               "peer-steps/s" + _ratios([cnn] if cnn is not None else [], rate))


SECTION_FUNCTIONS: dict[str, Callable[[Check], None]] = {
    name: globals()[f"section_{name}"] for name in SECTIONS}


# --------------------------------------------------------------------------------------------
# Main: the header, the guarded sections within the budget, the closing line.
# --------------------------------------------------------------------------------------------


def _bool(text: str) -> bool:
    if text.lower() not in ("true", "false", "1", "0"):
        raise argparse.ArgumentTypeError(f"true or false, not {text!r}")
    return text.lower() in ("true", "1")


def _parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="seconds-sized shapes (tests, CPU)")
    parser.add_argument("--markdown", default="",
                        help="append each line to this file as it is measured")
    parser.add_argument("--budget_s", type=float, default=DEFAULT_BUDGET_S,
                        help="seconds: a section starts only when the time spent plus its "
                             "time limit is within this (default: the sum of the limits)")
    parser.add_argument("--sections", default=",".join(SECTIONS),
                        help="comma-separated subset of: " + ", ".join(SECTIONS))
    parser.add_argument("--deterministic", type=_bool, default=True,
                        help="true|false: --xla_gpu_deterministic_ops in the sections' XLA_FLAGS "
                             "(determinism always on, deterministic_off always off)")
    parser.add_argument("--limit_scale", type=float, default=1.0,
                        help="multiplies every section's time limit (a slower device)")
    parser.add_argument("--isolation", choices=("process", "none"), default="process",
                        help="process: each section in a child process under its time limit; "
                             "none: in this process, no limit (tests)")
    parser.add_argument("--fail_section", default="",
                        help="testing hook, not for measuring: make this section raise, to "
                             "check that a failing section is reported and the rest still run")
    parser.add_argument("--hang_section", default="",
                        help="testing hook: make this section sleep past its time limit")
    # A child's own flags (set by the parent).
    parser.add_argument("--section", default="", help=argparse.SUPPRESS)
    parser.add_argument("--results", default="", help=argparse.SUPPRESS)
    parser.add_argument("--limit_s", type=float, default=0.0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    bad = [s for s in args.sections + [args.fail_section, args.hang_section, args.section]
           if s and s not in SECTIONS]
    if bad:
        parser.error(f"unknown section(s) {bad}; the sections are {', '.join(SECTIONS)}")
    return args


def _raise_interrupt(signum, frame):
    del frame
    raise KeyboardInterrupt(f"signal {signal.Signals(signum).name}")


def section_deterministic(name: str, deterministic: bool) -> bool:
    """The --deterministic a section runs with: determinism on, deterministic_off off."""
    return {"determinism": True, "deterministic_off": False}.get(name, deterministic)


def run_guarded(check: Check, name: str) -> str:
    """One section, an exception becoming its "failed" line: 'ran' or 'failed'."""
    args = check.args
    check.results["current"] = name
    try:
        if name == args.fail_section:
            raise RuntimeError(f"made to fail by --fail_section={name}")
        if name == args.hang_section:
            time.sleep(10**6)
        SECTION_FUNCTIONS[name](check)
        return "ran"
    except Exception as error:  # noqa: BLE001 (every section is guarded).
        message = (str(error).strip().splitlines() or [""])[0][:300]
        check.line(f"section {name} failed: {type(error).__name__}: {message}")
        return "failed"


def _die_with_parent() -> None:
    """In the child, first thing: SIGKILL when the parent dies (Linux), so a killed check
    leaves no section running."""
    try:
        import ctypes

        ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _child_command(args, name: str, results_path: str) -> list[str]:
    command = [sys.executable, "-m", "benchmarks.device_check", f"--section={name}",
               f"--results={results_path}", f"--limit_s={section_limit(name, args):g}",
               f"--deterministic={str(args.deterministic).lower()}"]
    command += ["--tiny"] if args.tiny else []
    command += [f"--markdown={os.path.abspath(args.markdown)}"] if args.markdown else []
    for hook in ("fail_section", "hang_section"):
        if getattr(args, hook) == name:
            command.append(f"--{hook}={name}")
    return command


def run_child(check: Check, name: str, env: dict) -> str:
    """The section in a child process, killed (its process group) at its time limit: 'ran',
    'failed' or 'stopped'; the child writes its own lines, this one the "stopped" line."""
    limit = section_limit(name, check.args)
    path = check.results["path"]
    with open(path, "w") as f:
        json.dump({k: v for k, v in check.results.items() if k != "path"}, f)
    proc = subprocess.Popen(_child_command(check.args, name, path), env=env,
                            start_new_session=True)
    try:
        code = proc.wait(timeout=limit)
    except subprocess.TimeoutExpired:
        _kill(proc)
        code = None
    except BaseException:  # SIGTERM / Ctrl-C: the child goes too.
        _kill(proc)
        raise
    try:
        with open(path) as f:
            check.results.update(json.load(f))
    except (OSError, ValueError):
        pass
    finished = check.results.pop("finished", None)
    if finished is not None and finished[0] == name:  # Done, then killed while exiting.
        return finished[1]
    if code is None:
        check.line(f"section {name} stopped: time limit {limit:g} s")
        return "stopped"
    if code == 0:
        return "ran"
    if code != FAILED_EXIT:
        how = (f"signal {signal.Signals(-code).name}" if code < 0 else f"exit status {code}")
        check.line(f"section {name} failed: its process ended with {how}")
    return "failed"


def _kill(proc) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def run_sections(check: Check, start: float, env: dict | None = None) -> dict[str, str]:
    """Runs the chosen sections in order, each guarded and, in a child process, under its time
    limit; a section starts only when the time spent plus its limit is within the budget."""
    args = check.args
    outcome = {}
    with tempfile.TemporaryDirectory(prefix="device_check_") as scratch:
        check.results["path"] = os.path.join(scratch, "results.json")
        for name in args.sections:
            limit = section_limit(name, args)
            spent = time.perf_counter() - start
            if spent + limit > args.budget_s:
                check.line(f"section {name} not started: budget ({spent:.0f} s spent + "
                           f"{limit:g} s limit > --budget_s={args.budget_s:g})")
                outcome[name] = "not started"
                continue
            check.results["current"] = name
            if args.isolation == "none":
                check.deadline = time.perf_counter() + limit
                outcome[name] = run_guarded(check, name)
            else:
                outcome[name] = run_child(check, name, env if env is not None else os.environ)
        check.results.pop("path")
    return outcome


def child_main(args) -> None:
    """One section (`--section=NAME`), started by the check: its deterministic setting in
    XLA_FLAGS before its backend starts, the figures so far from --results, its own lines."""
    start = time.perf_counter()
    _die_with_parent()
    from marfl_jax import Config, runtime

    runtime.configure(Config(deterministic=section_deterministic(args.section,
                                                                 args.deterministic)))
    results = {}
    if args.results and os.path.exists(args.results):
        with open(args.results) as f:
            results = json.load(f)
    report = Report(args.markdown)
    check = Check(args, report, results)
    check.deadline = start + (args.limit_s or float("inf"))
    try:
        outcome = run_guarded(check, args.section)
    finally:
        report.close()
    check.results.pop("current", None)
    check.results["finished"] = [args.section, outcome]
    if args.results:
        with open(args.results + ".tmp", "w") as f:
            json.dump(check.results, f)
        os.replace(args.results + ".tmp", args.results)
    sys.stdout.flush()
    sys.stderr.flush()
    # Now, without the interpreter's teardown (seconds with a backend up): the section is done.
    os._exit(0 if outcome == "ran" else FAILED_EXIT)


def header(args, command: str) -> str:
    device = jax.devices()[0]
    flags = os.environ.get("XLA_FLAGS", "")
    where = ("each in a child process under its time limit" if args.isolation == "process"
             else "in this process")
    return (f"device check: {device.platform} {device.device_kind} x{jax.device_count()}; "
            f"jax {jax.__version__}; host {tt._cpu_model()}; --deterministic="
            f"{str(args.deterministic).lower()} (determinism on, deterministic_off off); "
            f"XLA_FLAGS {flags!r}; sections {where}; "
            f"{time.strftime('%Y-%m-%d %H:%M:%S %Z')}; command: {command}")


def main(argv=None) -> None:
    args = _parse_args(argv)
    if args.section:
        child_main(args)
        return
    raw = sys.argv[1:] if argv is None else list(argv)
    command = shlex.join(["python", "-m", "benchmarks.device_check", *raw])
    start = time.perf_counter()
    report = Report(args.markdown)
    check = Check(args, report)
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _raise_interrupt) if in_main_thread else None
    # Before the backend starts: the runs' deterministic GPU ops and float32 matmuls (the peaks
    # section sets its own precision for each figure); the children inherit XLA_FLAGS.
    from marfl_jax import Config, runtime

    runtime.configure(Config(deterministic=args.deterministic))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [REPO] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])}
    # The launchers' persistent compilation cache: the sections that run the same program
    # (main_job_auto and its deterministic_off twin on a CPU, a rerun) compile it once.
    env.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(
        os.path.expanduser("~"), ".cache", "marfl_jax", "xla"))
    if args.isolation == "process" and not runtime.backends_started():
        # This process only names the device: it leaves the GPU's memory to the sections.
        os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    try:
        report.line(header(args, command))
        outcome = run_sections(check, start, env)
        counts = ", ".join(f"{sum(v == k for v in outcome.values())} {k}"
                           for k in ("ran", "failed", "stopped", "not started"))
        report.line(f"device check done: {time.perf_counter() - start:.0f} s; sections: "
                    f"{counts}")
    except KeyboardInterrupt as interrupt:
        report.line(f"device check interrupted ({interrupt or 'KeyboardInterrupt'}) in section "
                    f"{check.results.get('current', '-')} after "
                    f"{time.perf_counter() - start:.0f} s; the lines above stand")
        raise SystemExit(130) from None
    finally:
        report.close()
        if in_main_thread:
            signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    main()
