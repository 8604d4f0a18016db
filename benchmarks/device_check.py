r"""One script for a GPU (or any accelerator): what this simulator does on it, in under 8 minutes.

    PYTHONPATH=. python -m benchmarks.device_check --markdown=$OUT/device_check.md --budget_s=480
    python -m benchmarks.device_check --tiny          # seconds, on any machine (the tests)

Each figure is one line, printed and appended to the --markdown file (flushed and fsynced) the
moment it is measured, after a header line (device, jax version, host CPU, the command): a run
killed half-way leaves every line it had measured. The sections, in order, each guarded (an
exception becomes "section NAME failed: ExcType: message" and the next section runs):

  peaks           matmul peaks: float32 at jax's matmul precision 'highest' and 'default' (TF32
                  on NVIDIA GPUs), and bfloat16
  main_job_auto   the main job's time to 95 % (`python -m launch.train` defaults: MAR-FL, CNN,
                  64 peers, embedded MNIST, --plan=auto)
  main_job_fixed  the same with --plan=fixed
  determinism     two identical short runs with churn (MLP, 16 peers, dropout 0.25, 3
                  iterations): identical rows (apart from 'seconds') and final parameters?
  mlp_scale       MLP local-training peer-steps/s at N = 1,000 / 10,000 / 100,000, one line
                  each; an N whose path does not fit the device's memory is halved until it
                  does, and the line says why (the bytes needed at each N, the device's
                  available bytes)
  cnn             the CNN at N = 1,000
  mar_round       a MAR round against a copy of the state
  torch_loop      the per-peer PyTorch loop on the same device, with the ratios to the above
                  ('skipped: torch not installed' when torch does not import)

Before each section, if the time spent plus the section's rough estimate would pass --budget_s,
it writes "section NAME not started: budget" and moves on. SIGTERM (and Ctrl-C) end the run with
a last line saying so; the lines written stay. It imports only what the core needs (jax, flax,
optax, chex, absl, orbax), so it runs from a working tree with PYTHONPATH=.
"""

from __future__ import annotations

import argparse
import os
import shlex
import signal
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

# Rough seconds each section takes on one GPU (the budget check's estimate); --tiny scales them.
ESTIMATE_S = {"peaks": 20, "main_job_auto": 120, "main_job_fixed": 90, "determinism": 40,
              "mlp_scale": 90, "cnn": 40, "mar_round": 20, "torch_loop": 45}
TINY_SCALE = 0.1
SECTIONS = tuple(ESTIMATE_S)
DEFAULT_BUDGET_S = 420.0


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
    """What the sections share: the flags, the report and the figures measured so far."""

    def __init__(self, args, report: Report):
        self.args, self.report, self.tiny = args, report, args.tiny
        self.repeats = 1 if args.tiny else 3
        self.results: dict = {}

    def line(self, text: str) -> None:
        self.report.line(text)


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


def main_job(tiny: bool, plan: str = "auto") -> dict:
    """The launcher's default run (or a tiny one) to its target with --plan=`plan`; wall seconds,
    iterations, accuracy and the plan the run used."""
    from marfl_jax import Config, run

    if tiny:
        config = Config(model="mlp", num_peers=4, group_size=2, key_dim=2, max_iterations=2,
                        checkpoint_every=0, target_accuracy=0.5, plan=plan)
    else:
        config = Config(max_iterations=500, checkpoint_every=0, plan=plan)
    with tempfile.TemporaryDirectory() as workdir:
        start = time.perf_counter()
        summary = run(config, workdir).summary
        wall_s = time.perf_counter() - start
        used = _read_plan(os.path.join(workdir, "plan.json"))
    return {"wall_s": wall_s, "iterations": summary["iterations"],
            "reached": summary["reached_target"], "accuracy": summary["final_accuracy"],
            "target": summary["target_accuracy"], "plan": used}


def _read_plan(path: str) -> str:
    import json

    from marfl_jax import plan as plan_lib

    try:
        with open(path) as f:
            return plan_lib.Plan(**json.load(f)).describe()
    except (OSError, ValueError, TypeError):
        return "?"


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
    return Figure(asked=asked, n=n, rate=n * setup.b / seconds, shortfalls=shortfalls)


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


def _main_job(check: Check, plan: str) -> None:
    job = main_job(check.tiny, plan)
    check.line(f"main job (--plan={plan}: {job['plan']}): {job['wall_s']:.1f} s wall, "
               f"{job['iterations']} iterations, final accuracy {job['accuracy']:.4f}, "
               f"target {job['target']:.0%} reached: {job['reached']}")


def section_main_job_auto(check: Check) -> None:
    _main_job(check, "auto")


def section_main_job_fixed(check: Check) -> None:
    _main_job(check, "fixed")


def section_determinism(check: Check) -> None:
    from marfl_jax import Config, run

    if check.tiny:
        config = Config(model="mlp", num_peers=4, group_size=2, key_dim=2, dropout=0.25,
                        max_iterations=2, eval_every=1, checkpoint_every=0, plan="fixed")
    else:
        config = Config(model="mlp", num_peers=16, group_size=4, key_dim=2, dropout=0.25,
                        max_iterations=3, eval_every=1, checkpoint_every=0, plan="fixed")
    results = []
    for _ in range(2):
        with tempfile.TemporaryDirectory() as workdir:
            results.append(run(config, workdir))
    what = (f"MLP {config.num_peers} peers, dropout {config.dropout}, "
            f"{config.max_iterations} iterations")
    difference = first_difference(results[0].metrics, results[1].metrics)
    if difference is None:
        leaves = [jax.tree.leaves(r.state.params) for r in results]
        same = all(np.array_equal(np.asarray(a), np.asarray(b))
                   for a, b in zip(*leaves, strict=True))
        difference = None if same else "the final parameters"
    check.line(f"determinism ({what}, two runs): " + (
        "identical (rows apart from 'seconds', and the final parameters)" if difference is None
        else f"differ: {difference}"))


def section_mlp_scale(check: Check) -> None:
    args = _args(check.tiny, 32, check.repeats)
    setup = tt.Setup("mlp", args)
    figures = check.results.setdefault("mlp", [])
    for asked in ([4, 8] if check.tiny else [1_000, 10_000, 100_000]):
        figure = training_figure(setup, asked, args.repeats)
        figures.append(figure)
        check.line(figure_line("MLP", figure, setup.batch))


def section_cnn(check: Check) -> None:
    args = _args(check.tiny, 16, check.repeats)
    setup = tt.Setup("cnn", args)
    figure = training_figure(setup, 2 if check.tiny else 1_000, args.repeats)
    check.results["cnn"] = figure
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


def _ratios(figures: list[Figure], torch_rate: float) -> str:
    parts = [f"{f.rate / torch_rate:.1f}x at N={f.n:,}" for f in figures if f.rate is not None]
    return f"; the vectorized path: {', '.join(parts)} its rate" if parts else ""


def section_torch_loop(check: Check) -> None:
    mlp_args = _args(check.tiny, 32, check.repeats)
    peers = 4 if check.tiny else 64
    rate = torch_loop("mlp", mlp_args, peers)
    if isinstance(rate, str):
        check.line(f"MLP per-peer torch loop: {rate}")
        check.line(f"CNN per-peer torch loop: {rate}")
        return
    check.line(f"MLP per-peer torch loop ({peers} peers): {rate:,.0f} peer-steps/s"
               + _ratios(check.results.get("mlp", []), rate))
    cnn_args = _args(check.tiny, 16, check.repeats)
    peers = 2 if check.tiny else 32
    rate = torch_loop("cnn", cnn_args, peers)
    cnn = check.results.get("cnn")
    check.line(f"CNN per-peer torch loop ({peers} peers): {rate:,.0f} peer-steps/s"
               + _ratios([cnn] if cnn is not None else [], rate))


SECTION_FUNCTIONS: dict[str, Callable[[Check], None]] = {
    name: globals()[f"section_{name}"] for name in SECTIONS}


# --------------------------------------------------------------------------------------------
# Main: the header, the guarded sections within the budget, the closing line.
# --------------------------------------------------------------------------------------------


def _parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="seconds-sized shapes (tests, CPU)")
    parser.add_argument("--markdown", default="",
                        help="append each line to this file as it is measured")
    parser.add_argument("--budget_s", type=float, default=DEFAULT_BUDGET_S,
                        help="seconds: a section whose rough estimate would end past this is "
                             "not started")
    parser.add_argument("--sections", default=",".join(SECTIONS),
                        help="comma-separated subset of: " + ", ".join(SECTIONS))
    parser.add_argument("--fail_section", default="",
                        help="testing hook, not for measuring: make this section raise, to "
                             "check that a failing section is reported and the rest still run")
    args = parser.parse_args(argv)
    args.sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    bad = [s for s in args.sections + ([args.fail_section] if args.fail_section else [])
           if s not in SECTIONS]
    if bad:
        parser.error(f"unknown section(s) {bad}; the sections are {', '.join(SECTIONS)}")
    return args


def _raise_interrupt(signum, frame):
    del frame
    raise KeyboardInterrupt(f"signal {signal.Signals(signum).name}")


def run_sections(check: Check, start: float) -> dict[str, str]:
    """Runs the chosen sections in order, each guarded and within the budget; their outcomes."""
    args = check.args
    outcome = {}
    for name in args.sections:
        estimate = ESTIMATE_S[name] * (TINY_SCALE if check.tiny else 1.0)
        spent = time.perf_counter() - start
        if spent + estimate > args.budget_s:
            check.line(f"section {name} not started: budget ({spent:.0f} s spent + ~"
                       f"{estimate:.0f} s estimated > --budget_s={args.budget_s:g})")
            outcome[name] = "not started"
            continue
        check.results["current"] = name
        try:
            if name == args.fail_section:
                raise RuntimeError(f"made to fail by --fail_section={name}")
            SECTION_FUNCTIONS[name](check)
            outcome[name] = "ran"
        except Exception as error:  # noqa: BLE001 (every section is guarded).
            message = (str(error).strip().splitlines() or [""])[0][:300]
            check.line(f"section {name} failed: {type(error).__name__}: {message}")
            outcome[name] = "failed"
    return outcome


def main(argv=None) -> None:
    args = _parse_args(argv)
    raw = sys.argv[1:] if argv is None else list(argv)
    command = shlex.join(["python", "-m", "benchmarks.device_check", *raw])
    start = time.perf_counter()
    report = Report(args.markdown)
    check = Check(args, report)
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _raise_interrupt) if in_main_thread else None
    # Before the backend starts: the runs' deterministic GPU ops and float32 matmuls (the peaks
    # section sets its own precision for each figure).
    from marfl_jax import Config, runtime

    runtime.configure(Config())
    try:
        device = jax.devices()[0]
        report.line(f"device check: {device.platform} {device.device_kind} "
                    f"x{jax.device_count()}; jax {jax.__version__}; host {tt._cpu_model()}; "
                    f"{time.strftime('%Y-%m-%d %H:%M:%S %Z')}; command: {command}")
        outcome = run_sections(check, start)
        counts = ", ".join(f"{sum(v == k for v in outcome.values())} {k}"
                           for k in ("ran", "failed", "not started"))
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
