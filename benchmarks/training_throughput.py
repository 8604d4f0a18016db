r"""How fast does one iteration's local training and mixing run, vectorized vs per-peer loops?

Measures on the current machine, every timing the median of --repeats runs after one warm-up run
(compilation excluded and reported apart), and prints three tables:

1. Matmul peak: the median GFLOP/s of a jitted float32 --peak_size^2 jnp.dot, the machine's
   measured peak that the other GFLOP/s figures are a fraction of.
2. Local training: one full local update of all N peers (b = --local_batches steps of batch B,
   the authors' EMA momentum SGD) by each path:
   * `vectorized`: jitted `local.peers_local_sgd` over all N peers at once (params and momentum
     donated, so they update in place), or in sequential chunks of --peer_chunk peers;
   * `jax loop`: one jitted single-peer `local.local_sgd`, called for each peer in turn from
     Python (like FedJAX's jit backend), each peer's params, momentum and batches already
     separate device arrays, so the loop pays only its dispatch;
   * `torch loop` (with --torch, when torch imports): each peer its own torch.nn model of the same
     architecture, trained in turn, m.mul_(beta).add_(g, alpha=1-beta); p.add_(m, alpha=-lr).
   torch's OpenMP pool collapses when other processes hold the cores: on a 2-core machine at
   load ~6, --torch_threads=2 made a CNN step (B=4) 5-20x and an MLP step ~200x slower than
   --torch_threads=1. Check `other load` before trusting a torch row.
   Columns: compile seconds, the median seconds for all N peers, peer-steps/s (N*b / s),
   examples/s (N*b*B / s), the achieved GFLOP/s (model training FLOPs counted analytically, see
   `mlp_train_flops_per_example` and `cnn_train_flops_per_example`) and that as % of the matmul
   peak. The loops time only the first K = --loop_peers peers and scale their time by N/K
   (`peers timed` says "K of N"). A path that does not fit in memory (XLA's buffer estimate against
   what the device can give: an accelerator's own allocator figures, the CPU's MemAvailable) or
   fails is reported as "skipped: reason", a memory skip with the bytes needed and available. A
   second table gives the speed ratios measured in the same run (vectorized / jax loop,
   vectorized / torch loop, jax loop / torch loop; > 1 means the first is faster), `dloss` = max
   |first-update loss of the vectorized path - the jax loop's| over the timed peers (same initial
   params and data: should be ~1e-6), and the CPU load of other processes while the repeats ran,
   in cores (0.00 = the machine was ours).
3. MAR mixing round vs copy: for the stacked state of N peers (params + EMA momentum), one jitted
   `mixing.group_mean` round with group ids arange(N) // M (M = --group_size; default 5 when N is
   a power of 5, else 4) against a jitted plain copy of the same tree; both medians, the effective
   GB/s (2 x state bytes: read once + written once) and the ratio round / copy.

The timed paths of one (model, N) are interleaved round-robin over the repeats, so a burst of
load from another process hits them alike. With --markdown PATH the same tables are also written
as Markdown with a header giving the machine (CPU model, cores, memory, jax version, backend and
device kind, torch version) and the exact command line, for benchmarks/RESULTS.md.

Usage:
  python -m benchmarks.training_throughput                       # mlp and cnn, N = 16,125,1024
  python -m benchmarks.training_throughput --models=mlp --num_peers=16,125 --torch \
      --markdown=/tmp/throughput.md
  # a quick smoke run:
  python -m benchmarks.training_throughput --models=mlp --num_peers=8 --repeats=2 \
      --local_batches=1 --batch_size=8
"""

from __future__ import annotations

import argparse
import functools
import math
import os
import platform
import shlex
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.conv_lowering import _ForeignCpu
from marfl_jax import local, memory, mixing, models

MODELS = ("mlp", "cnn")
DEFAULT_BATCH_SIZE = {"mlp": 32, "cnn": 62}  # The paper's B for each task.
INPUT_SHAPE = (28, 28, 1)
NUM_CLASSES = 10
# A path is skipped when XLA's buffer estimate exceeds this fraction of what the device it runs on
# can still give (`memory.available_bytes`: an accelerator's allocator limit less what is in use,
# the CPU's MemAvailable).
MEMORY_FRACTION = 0.8
GiB = 2**30


def _int_list(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def _parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--models", default=",".join(MODELS), help="comma-separated: mlp, cnn")
    p.add_argument("--num_peers", default="16,125,1024", help="comma-separated peer counts N")
    p.add_argument("--repeats", type=int, default=5, help="timed runs per measurement (median)")
    p.add_argument("--local_batches", type=int, default=4, help="local SGD steps b per peer")
    p.add_argument("--batch_size", type=int, default=0,
                   help="examples per step B (default 0: 32 for mlp, 62 for cnn)")
    p.add_argument("--loop_peers", type=int, default=16,
                   help="peers K the per-peer loops time, scaled by N/K (0: all N)")
    p.add_argument("--peer_chunk", type=int, default=0,
                   help="vectorized path: peers_local_sgd(peer_chunk=K), K peers at a time "
                        "(0: all N at once; K > 0 needs a marfl_jax with that argument)")
    p.add_argument("--group_size", type=int, default=0,
                   help="MAR group size M of the mixing round (0: 5 if N is a power of 5, else 4)")
    p.add_argument("--learning_rate", type=float, default=0.1, help="momentum SGD eta")
    p.add_argument("--momentum", type=float, default=0.9, help="EMA momentum beta")
    p.add_argument("--peak_size", type=int, default=2048, help="side of the square peak matmul")
    p.add_argument("--torch", action="store_true", help="also time the per-peer PyTorch loop")
    p.add_argument("--torch_threads", type=int, default=2, help="torch.set_num_threads")
    p.add_argument("--markdown", default="", help="also write the tables as Markdown to this path")
    args = p.parse_args(argv)
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    bad = [m for m in args.models if m not in MODELS]
    if bad or not args.models:
        p.error(f"--models must be a comma-separated subset of {', '.join(MODELS)}; got {bad}")
    try:
        args.num_peers = _int_list(args.num_peers)
    except ValueError:
        p.error(f"--num_peers must be comma-separated integers, got {args.num_peers!r}")
    if not args.num_peers or min(args.num_peers) < 1:
        p.error(f"--num_peers must be integers >= 1, got {args.num_peers}")
    for name in ("repeats", "local_batches", "peak_size", "torch_threads"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    for name in ("batch_size", "loop_peers", "peer_chunk"):
        if getattr(args, name) < 0:
            p.error(f"--{name} must be >= 0, got {getattr(args, name)}")
    if args.group_size == 1 or args.group_size < 0:
        p.error(f"--group_size must be 0 (auto) or >= 2, got {args.group_size}")
    return args


# --------------------------------------------------------------------------------------------
# FLOP counts, machine facts, formatting.
# --------------------------------------------------------------------------------------------


def mlp_train_flops_per_example(in_dim: int = 784, hidden: int = 200,
                                num_classes: int = NUM_CLASSES) -> int:
    """Training FLOPs of one example of the MLP: 3 x forward (backward = 2 x forward), forward
    = 2 x MACs = 2 * (in_dim*hidden + hidden*num_classes); 784-200-10: 3 * 2 * 158,800 = 952,800.
    Bias adds, ReLU, softmax and the optimizer update are not counted."""
    return 3 * 2 * (in_dim * hidden + hidden * num_classes)


def cnn_train_flops_per_example(num_classes: int = NUM_CLASSES) -> int:
    """Training FLOPs of one example of the paper's CNN: 3 x forward, forward = 2 x MACs =
    2 * (26*26*32*9*1 [conv1 3x3, 1->32, VALID] + 24*24*64*9*32 [conv2 3x3, 32->64, VALID]
    + 9216*128 [dense1] + 128*num_classes [dense2]) = 2 * 11,992,448 with 10 classes, so
    71,954,688 per example. im2col, pooling, bias adds, ReLU and the optimizer are not counted
    (nor that conv1 needs no input gradient: 3 x forward is the usual convention)."""
    macs = 26 * 26 * 32 * 9 * 1 + 24 * 24 * 64 * 9 * 32 + 9216 * 128 + 128 * num_classes
    return 3 * 2 * macs


TRAIN_FLOPS = {"mlp": mlp_train_flops_per_example, "cnn": cnn_train_flops_per_example}


def _meminfo(field: str) -> int | None:
    """A /proc/meminfo field in bytes, or None."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _machine_lines(torch_version: str | None, torch_threads: int, command: str) -> list[str]:
    dev = jax.devices()[0]
    total = _meminfo("MemTotal")
    mem = f", {total / 2**30:.0f} GiB memory" if total else ""
    torch_text = (f"torch {torch_version} ({torch_threads} threads)" if torch_version
                  else "torch not used")
    return [
        f"Machine: {_cpu_model()}, {os.cpu_count()} cores{mem}; Python {platform.python_version()}",
        f"jax {jax.__version__}, backend {jax.default_backend()}, device kind "
        f"{dev.device_kind} ({jax.device_count()} device(s)); {torch_text}",
        f"Command: {command}",
    ]


def _sig(x: float, digits: int = 3) -> str:
    """x with `digits` significant digits, no exponent (12345 -> '12345', 0.01234 -> '0.0123')."""
    if x is None or not math.isfinite(x):
        return "-"
    if x == 0:
        return "0"
    decimals = max(0, digits - 1 - math.floor(math.log10(abs(x))))
    return f"{x:.{decimals}f}"


def _render(headers: list[str], rows: list[list[str]], align: str, markdown: bool) -> str:
    """A table as aligned text or Markdown; align has one 'l' or 'r' per column."""
    if markdown:
        lines = ["| " + " | ".join(headers) + " |",
                 "|" + "|".join("---:" if a == "r" else ":---" for a in align) + "|"]
        lines += ["| " + " | ".join(r) + " |" for r in rows]
        return "\n".join(lines)
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]

    def line(cells):
        return "  ".join(c.rjust(w) if a == "r" else c.ljust(w)
                         for c, w, a in zip(cells, widths, align, strict=True)).rstrip()

    out = [line(headers), "-" * len(line(["-" * w for w in widths]))]
    return "\n".join(out + [line(r) for r in rows])


def _median_time(fn, repeats: int) -> float:
    """Median seconds of fn() over `repeats` calls after one warm-up call; fn must block."""
    fn()
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def _error_text(error: BaseException) -> str:
    first = (str(error).strip().splitlines() or [""])[0]
    return f"{type(error).__name__}: {first[:160]}"


# --------------------------------------------------------------------------------------------
# 1. Matmul peak.
# --------------------------------------------------------------------------------------------


def measure_peak(size: int, repeats: int) -> tuple[float, float]:
    """(median seconds, GFLOP/s) of a jitted float32 size x size @ size x size matmul."""
    a = jax.random.normal(jax.random.key(0), (size, size), jnp.float32)
    b = jax.random.normal(jax.random.key(1), (size, size), jnp.float32)
    f = jax.jit(jnp.dot)
    seconds = _median_time(lambda: jax.block_until_ready(f(a, b)), repeats)
    return seconds, 2 * size**3 / seconds / 1e9


# --------------------------------------------------------------------------------------------
# Models, peers, data.
# --------------------------------------------------------------------------------------------


class Setup:
    """One model's flax module, apply_fn, optimizer and per-peer initial state and data."""

    def __init__(self, name: str, args):
        self.name = name
        self.module = models.get_model(name, NUM_CLASSES)
        self.optimizer = local.momentum_sgd(args.learning_rate, args.momentum)
        self.b = args.local_batches
        self.batch = args.batch_size or DEFAULT_BATCH_SIZE[name]
        self.flops_per_example = TRAIN_FLOPS[name]()

    def apply_fn(self, params, x, rng=None):
        del rng  # Neither model has dropout.
        return self.module.apply({"params": params}, x)

    def init_peers(self, count: int):
        """Stacked (params, opt_state) of peers 0..count-1 (peer i's init key is fold_in(0, i),
        so any prefix of peers is the same whatever count is)."""
        x0 = jnp.zeros((1,) + INPUT_SHAPE, jnp.float32)

        def one(i):
            params = self.module.init(jax.random.fold_in(jax.random.key(0), i), x0)["params"]
            return params, self.optimizer.init(params)

        return jax.jit(jax.vmap(one))(jnp.arange(count))

    def abstract_peers(self, count: int):
        return jax.eval_shape(functools.partial(self.init_peers, count))

    def data(self, count: int):
        """images (count, b, B, 28, 28, 1) uniform in [0, 1), labels (count, b, B) int32; per-peer
        keys, so a prefix of peers gets the same data whatever count is."""

        def one(i):
            kx, ky = jax.random.split(jax.random.fold_in(jax.random.key(1), i))
            shape = (self.b, self.batch)
            return (jax.random.uniform(kx, shape + INPUT_SHAPE, jnp.float32),
                    jax.random.randint(ky, shape, 0, NUM_CLASSES, jnp.int32))

        return jax.jit(jax.vmap(one))(jnp.arange(count))

    def abstract_data(self, count: int):
        return jax.eval_shape(functools.partial(self.data, count))


def _needed_bytes(compiled) -> int | None:
    """Bytes XLA's buffers need for one call: arguments + outputs not aliased to them + temps."""
    try:
        m = compiled.memory_analysis()
    except Exception:  # Not every backend reports it.
        return None
    if m is None:
        return None
    return (m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes
            + m.temp_size_in_bytes)


class Skip(str):
    """Why a path was not timed ("skipped: ..."), a str as before. When it was skipped for memory
    (the estimate does not fit, or the device ran out), `memory` is True, `needed` and
    `available` are the bytes (None where unknown) and `device` names the device."""

    memory: bool = False
    needed: int | None = None
    available: int | None = None
    device: str = ""

    def with_prefix(self, prefix: str) -> Skip:
        """The same skip, its text prefixed."""
        return _skip(prefix + self, memory_=self.memory, needed=self.needed,
                     available=self.available, device=self.device)


def _skip(text: str, *, memory_: bool = False, needed: int | None = None,
          available: int | None = None, device: str = "") -> Skip:
    skip = Skip(text)
    skip.memory, skip.needed, skip.available, skip.device = memory_, needed, available, device
    return skip


def _gib(nbytes: int | None) -> str:
    return "?" if nbytes is None else f"{nbytes / GiB:.1f} GiB"


def _memory_skip(needed: int | None, device: jax.Device | None = None) -> Skip | None:
    """A skip reason when `needed` bytes exceed MEMORY_FRACTION of what `device` (default: the
    first device, where the paths run) can still give, judged by the device's own figures
    (`memory.available_bytes`), else None (also when either figure is unknown)."""
    device = device or jax.devices()[0]
    available = memory.available_bytes(device)
    if needed is None or available is None or needed <= MEMORY_FRACTION * available:
        return None
    label = memory.device_label(device)
    return _skip(f"skipped: needs {_gib(needed)} (XLA buffers), the device ({label}) has "
                 f"{_gib(available)} available (a path may use {MEMORY_FRACTION:.0%} of it)",
                 memory_=True, needed=needed, available=available, device=label)


def _out_of_memory(error: BaseException) -> bool:
    text = str(error)
    return "RESOURCE_EXHAUSTED" in text or "out of memory" in text.lower()


def _error_skip(error: BaseException, needed: int | None = None,
                device: jax.Device | None = None) -> Skip:
    """"skipped: ExcType: message"; a memory skip (with the estimate and the device's available
    bytes) when the device ran out of memory."""
    if not _out_of_memory(error):
        return _skip("skipped: " + _error_text(error))
    device = device or jax.devices()[0]
    label = memory.device_label(device)
    available = memory.available_bytes(device)
    return _skip(f"skipped: out of memory on the device ({label}; needs {_gib(needed)}, "
                 f"{_gib(available)} available): {_error_text(error)}", memory_=True,
                 needed=needed, available=available, device=label)


# --------------------------------------------------------------------------------------------
# 2. Local training: the timed paths.
# --------------------------------------------------------------------------------------------


class Path:
    """One timed path: run() does the timed unit (peers_timed peers' full local updates) and
    blocks until its results are ready; loss0 is the per-peer loss of the warm-up update."""

    def __init__(self, name, run, peers_timed, compile_s=None, loss0=None, label=None):
        self.name, self.run, self.peers_timed = name, run, peers_timed
        self.label = label or name
        self.compile_s, self.loss0 = compile_s, loss0
        self.times: list[float] = []


def vectorized_path(setup: Setup, n: int, peer_chunk: int = 0) -> Path | Skip:
    """The vectorized local update of n peers, or why it was skipped: a `Skip` whose `memory` is
    True when XLA's estimate exceeds what the device (the first one, where it runs) can give or
    the device ran out of memory."""
    chunk = {"peer_chunk": peer_chunk} if 0 < peer_chunk < n else {}
    step = jax.jit(functools.partial(local.peers_local_sgd, apply_fn=setup.apply_fn,
                                     optimizer=setup.optimizer, **chunk), donate_argnums=(0, 1))
    params_s, state_s = setup.abstract_peers(n)
    images_s, labels_s = setup.abstract_data(n)
    active = jnp.ones((n,), bool)
    needed = None
    try:
        t0 = time.perf_counter()
        compiled = step.lower(params_s, state_s, images_s, labels_s, active).compile()
        compile_s = time.perf_counter() - t0
        needed = _needed_bytes(compiled)
        skip = _memory_skip(needed)
        if skip:
            return skip
        params, state = setup.init_peers(n)
        images, labels = setup.data(n)
        params, state, loss0 = compiled(params, state, images, labels, active)  # Warm-up.
        jax.block_until_ready((params, state, loss0))
    except Exception as error:  # E.g. XLA RESOURCE_EXHAUSTED.
        return _error_skip(error, needed)
    carry = {"params": params, "state": state}

    def run():
        carry["params"], carry["state"], _ = compiled(
            carry["params"], carry["state"], images, labels, active)
        jax.block_until_ready((carry["params"], carry["state"]))

    label = f"vectorized, chunks of {peer_chunk}" if chunk else None
    return Path("vectorized", run, n, compile_s, np.asarray(loss0), label)


def _peer(tree, i):
    return jax.tree.map(lambda x: x[i], tree)


def jax_loop_path(setup: Setup, k: int) -> Path | str:
    step = jax.jit(functools.partial(local.local_sgd, apply_fn=setup.apply_fn,
                                     optimizer=setup.optimizer), donate_argnums=(0, 1))
    try:
        params, state = setup.init_peers(k)
        images, labels = setup.data(k)
        peers = [[_peer(params, i), _peer(state, i)] for i in range(k)]
        xs, ys = [images[i] for i in range(k)], [labels[i] for i in range(k)]
        del params, state, images, labels
        t0 = time.perf_counter()
        compiled = step.lower(peers[0][0], peers[0][1], xs[0], ys[0]).compile()
        compile_s = time.perf_counter() - t0
        losses = []
        for i, peer in enumerate(peers):  # Warm-up.
            peer[0], peer[1], loss = compiled(peer[0], peer[1], xs[i], ys[i])
            losses.append(loss)
        jax.block_until_ready((peers, losses))
    except Exception as error:
        return "skipped: " + _error_text(error)

    def run():
        for i, peer in enumerate(peers):
            peer[0], peer[1], _ = compiled(peer[0], peer[1], xs[i], ys[i])
        jax.block_until_ready(peers)

    return Path("jax loop", run, k, compile_s, np.asarray(jnp.stack(losses)))


def _torch_module(torch, name: str):
    nn = torch.nn
    if name == "mlp":
        return nn.Sequential(nn.Flatten(), nn.Linear(784, 200), nn.ReLU(), nn.Linear(200, 10))
    return nn.Sequential(
        nn.Conv2d(1, 32, 3), nn.ReLU(), nn.Conv2d(32, 64, 3), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(9216, 128), nn.ReLU(), nn.Linear(128, NUM_CLASSES))


def torch_loop_path(torch, setup: Setup, k: int, lr: float, beta: float) -> Path | str:
    """The per-peer PyTorch loop with the authors' EMA momentum update done by hand."""
    torch.manual_seed(0)
    try:
        nets = [_torch_module(torch, setup.name) for _ in range(k)]
        moms = [[torch.zeros_like(p) for p in net.parameters()] for net in nets]
        images, labels = setup.data(k)
        # NHWC -> NCHW, one contiguous (b, B, 1, 28, 28) tensor per peer.
        xs = [torch.from_numpy(np.array(images[i]).transpose(0, 1, 4, 2, 3).copy())
              for i in range(k)]
        ys = [torch.from_numpy(np.array(labels[i], np.int64)) for i in range(k)]
    except Exception as error:
        return "skipped: " + _error_text(error)
    functional = torch.nn.functional

    def one_pass(losses=None):
        for net, mom, x, y in zip(nets, moms, xs, ys, strict=True):
            params = list(net.parameters())
            for s in range(setup.b):
                for p in params:
                    p.grad = None
                loss = functional.cross_entropy(net(x[s]), y[s])
                loss.backward()
                with torch.no_grad():
                    for p, m in zip(params, mom, strict=True):
                        m.mul_(beta).add_(p.grad, alpha=1 - beta)
                        p.add_(m, alpha=-lr)
                if losses is not None:
                    losses.append(float(loss.detach()))

    losses = []
    try:
        one_pass(losses)  # Warm-up.
    except Exception as error:
        return "skipped: " + _error_text(error)
    loss0 = np.asarray(losses).reshape(k, setup.b).mean(axis=1)
    return Path("torch loop", one_pass, k, None, loss0)


def _import_torch(threads: int):
    try:
        import torch
    except ImportError as error:
        return None, f"torch loop skipped: {_error_text(error)} (pip install torch)"
    torch.set_num_threads(threads)
    return torch, None


def bench_training(setup: Setup, n: int, args, torch, peak_gflops: float):
    """Times the paths for one model and N, interleaved. Returns (rows, ratio_row, notes)."""
    k = min(n, args.loop_peers) if args.loop_peers else n
    candidates = [("vectorized", lambda: vectorized_path(setup, n, args.peer_chunk)),
                  ("jax loop", lambda: jax_loop_path(setup, k))]
    if torch is not None:
        candidates.append(("torch loop", lambda: torch_loop_path(
            torch, setup, k, args.learning_rate, args.momentum)))
    paths, notes = [], []
    for name, make in candidates:
        path = make()
        if isinstance(path, str):
            notes.append(f"{setup.name} N={n} {name}: {path}")
        else:
            paths.append(path)

    foreign = _ForeignCpu()
    for _ in range(args.repeats):
        for path in paths:
            foreign.start()
            t0 = time.perf_counter()
            path.run()
            path.times.append(time.perf_counter() - t0)
            foreign.stop()
    timed_s = sum(sum(p.times) for p in paths)

    steps, examples = n * setup.b, n * setup.b * setup.batch
    rows, full_s = [], {}
    for path in paths:
        seconds = statistics.median(path.times) * n / path.peers_timed
        full_s[path.name] = seconds
        gflops = setup.flops_per_example * examples / seconds / 1e9
        timed = str(n) if path.peers_timed == n else f"{path.peers_timed} of {n}"
        rows.append([setup.name, str(n), str(setup.batch), path.label, timed,
                     _sig(path.compile_s) if path.compile_s is not None else "-",
                     _sig(seconds), _sig(steps / seconds), _sig(examples / seconds),
                     _sig(gflops), f"{100 * gflops / peak_gflops:.1f}"])

    def ratio(a, b):
        return f"{full_s[b] / full_s[a]:.2f}x" if a in full_s and b in full_s else "-"

    by_name = {p.name: p for p in paths}
    dloss = "-"
    if "vectorized" in by_name and "jax loop" in by_name:
        loop_loss = by_name["jax loop"].loss0
        dloss = f"{np.max(np.abs(by_name['vectorized'].loss0[:k] - loop_loss)):.1e}"
    ratio_row = [setup.name, str(n), ratio("vectorized", "jax loop"),
                 ratio("vectorized", "torch loop"), ratio("jax loop", "torch loop"), dloss,
                 f"{foreign.foreign_s / max(timed_s, 1e-9):.2f}"]
    return rows, ratio_row, notes


# --------------------------------------------------------------------------------------------
# 3. MAR mixing round vs copy.
# --------------------------------------------------------------------------------------------


def _group_size(n: int, requested: int) -> int:
    if requested:
        return requested
    power = 1
    while power < n:
        power *= 5
    return 5 if power == n and n > 1 else 4


def bench_mixing(setup: Setup, n: int, args):
    """One group_mean round vs a copy of the stacked (params, opt_state). Returns (row, note):
    note (a `Skip`, its text prefixed with the model and N) when it was skipped."""
    m = _group_size(n, args.group_size)
    num_groups = -(-n // m)
    ids = jnp.arange(n, dtype=jnp.int32) // m
    mix_round = jax.jit(functools.partial(mixing.group_mean, num_groups=num_groups))
    copy = jax.jit(lambda tree: jax.tree.map(lambda x: x + 0, tree))
    abstract = setup.abstract_peers(n)
    needed = None
    state_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(abstract))
    try:
        round_c = mix_round.lower(abstract, ids).compile()
        copy_c = copy.lower(abstract).compile()
        needs = [_needed_bytes(c) for c in (round_c, copy_c)]
        needed = None if None in needs else max(needs)
        skip = _memory_skip(needed)
        if skip:
            return None, skip.with_prefix(f"{setup.name} N={n} mixing: ")
        tree = setup.init_peers(n)
        fns = {"round": lambda: jax.block_until_ready(round_c(tree, ids)),
               "copy": lambda: jax.block_until_ready(copy_c(tree))}
        for fn in fns.values():  # Warm-up.
            fn()
        times = {name: [] for name in fns}
        for _ in range(args.repeats):
            for name, fn in fns.items():
                t0 = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t0)
    except Exception as error:
        return None, _error_skip(error, needed).with_prefix(f"{setup.name} N={n} mixing: ")
    round_s, copy_s = statistics.median(times["round"]), statistics.median(times["copy"])
    row = [setup.name, str(n), str(m), str(num_groups), _sig(state_bytes / 2**20),
           _sig(1e3 * round_s), _sig(1e3 * copy_s), _sig(2 * state_bytes / round_s / 1e9),
           _sig(2 * state_bytes / copy_s / 1e9), f"{round_s / copy_s:.2f}"]
    return row, None


# --------------------------------------------------------------------------------------------
# Main.
# --------------------------------------------------------------------------------------------

TRAIN_HEADERS = ["model", "N", "B", "path", "peers timed", "compile s", "median s", "peer-steps/s",
                 "examples/s", "GFLOP/s", "% peak"]
RATIO_HEADERS = ["model", "N", "vec / jax loop", "vec / torch", "jax loop / torch", "dloss",
                 "other load"]
MIX_HEADERS = ["model", "N", "M", "groups", "state MiB", "round ms", "copy ms", "round GB/s",
               "copy GB/s", "round / copy"]


def _sections(args, peak, train_rows, ratio_rows, mix_rows, notes, markdown: bool):
    """(title, table, footnotes) of each section."""
    peak_s, peak_gflops = peak
    b = args.local_batches
    return [
        ("Matmul peak",
         _render(["matmul", "median s", "GFLOP/s"],
                 [[f"float32 {args.peak_size}^2 jnp.dot", _sig(peak_s), _sig(peak_gflops)]],
                 "lrr", markdown), []),
        (f"Local training: one local update of all N peers (b={b} steps of batch B, momentum "
         f"SGD), medians of {args.repeats}",
         _render(TRAIN_HEADERS, train_rows, "lrrllrrrrrr", markdown) if train_rows else "(none)",
         ["median s: seconds for all N peers (a loop's time over K peers x N/K when 'K of N'); "
          "GFLOP/s: analytic training FLOPs / s; % peak: of the matmul peak above."]
         + notes["train"]),
        ("Ratios measured in the same run (speedup of the first over the second)",
         _render(RATIO_HEADERS, ratio_rows, "lrrrrrr", markdown),
         ["dloss: max |first-update loss, vectorized - jax loop| over the timed peers; other "
          "load: other processes' CPU use while the repeats ran, in cores."]),
        (f"MAR mixing round vs copy of the stacked state (params + momentum), medians of "
         f"{args.repeats}",
         _render(MIX_HEADERS, mix_rows, "lrrrrrrrrr", markdown) if mix_rows else "(none)",
         ["GB/s: 2 x state bytes (read once + written once) / median; round: mixing.group_mean "
          "with group ids arange(N) // M; copy: jitted tree_map(x + 0)."] + notes["mix"]),
    ]


def _write_markdown(path, machine, sections):
    lines = ["### Training throughput (`benchmarks/training_throughput.py`)", ""]
    lines += [f"- {line}" for line in machine[:-1]]
    lines += [f"- Command: `{machine[-1].removeprefix('Command: ')}`", ""]
    for title, table, footnotes in sections:
        lines += [f"#### {title}", "", table, ""]
        lines += [f"- {f}" for f in footnotes] + ([""] if footnotes else [])
    with open(path, "w") as f:
        f.write("\n".join(lines).rstrip() + "\n")


def main(argv=None):
    args = _parse_args(argv)
    raw = sys.argv[1:] if argv is None else list(argv)
    command = shlex.join(["python", "-m", "benchmarks.training_throughput", *raw])
    torch, torch_note = _import_torch(args.torch_threads) if args.torch else (None, None)
    machine = _machine_lines(torch.__version__ if torch else None, args.torch_threads, command)
    print("\n".join(machine))
    if torch_note:
        print(torch_note)

    peak = measure_peak(args.peak_size, args.repeats)
    print(f"matmul peak: {_sig(peak[1])} GFLOP/s", flush=True)
    train_rows, ratio_rows, mix_rows = [], [], []
    notes = {"train": [torch_note] if torch_note else [], "mix": []}
    for name in args.models:
        setup = Setup(name, args)
        for n in args.num_peers:
            print(f"... {name} N={n}: local training", flush=True)
            rows, ratio_row, train_notes = bench_training(setup, n, args, torch, peak[1])
            train_rows += rows
            ratio_rows.append(ratio_row)
            notes["train"] += train_notes
            print(f"... {name} N={n}: mixing round", flush=True)
            row, note = bench_mixing(setup, n, args)
            if row:
                mix_rows.append(row)
            if note:
                notes["mix"].append(note)

    sections = _sections(args, peak, train_rows, ratio_rows, mix_rows, notes, markdown=False)
    for title, table, footnotes in sections:
        print(f"\n{title}\n{table}")
        for f in footnotes:
            print(f"  {f}")
    if args.markdown:
        _write_markdown(args.markdown, machine, _sections(
            args, peak, train_rows, ratio_rows, mix_rows, notes, markdown=True))
        print(f"\nwrote {args.markdown}")


if __name__ == "__main__":
    main()
