r"""Which convolution lowering makes the vmapped CNN step fastest on this CPU?

Times one jitted, vmapped SGD step (forward + backward + parameter update) of the paper's MNIST
CNN over N peers (each with its own parameters and its own batch of B examples) for every
lowering of `benchmarks.conv_variants.VariantCNN` (the CNN's `conv_impl`s and those not kept),
and prints, per formulation: the median seconds per step over the repeats (after compile and one
warm-up step), the minimum, examples/s, the achieved GFLOP/s (model FLOPs counted analytically:
forward = 2 x MACs, training step = 3 x forward), that as a percentage of this machine's float32
matmul peak measured in the same run (median of a jitted 2048x2048 jnp.dot), and the speed ratio
against flax `nn.Conv` (the `flax` row: nn.Conv layers, same pooling as the others;
`flax:reduce_window` is the fully stock network with nn.max_pool).

Repeats are interleaved round-robin over the formulations, so a burst of load from another
process hits all of them alike; the header reports the CPU time other processes used while the
timed steps ran, in cores (0.00 = the machine was ours; 1.00 = another process held a whole core).
`dloss` checks that every formulation computed the same first-step loss.

Usage:
  python -m benchmarks.conv_lowering --num_peers=16 --batch_size=62 --repeats=5
  # add the stock-flax row, and lax.map over chunks of 8 vmapped peers:
  python -m benchmarks.conv_lowering --num_peers=64 --impls=gather,flax,flax:reduce_window \
      --peer_chunk=8
  # XLA / allocator options must be set before jax is imported, so they run in a child process:
  python -m benchmarks.conv_lowering --num_peers=16 --impls=gather,flax \
      --variant_impls=gather,flax \
      --variant='XLA_FLAGS=--xla_cpu_experimental_ynn_fusion_type=dot' \
      --variant='GLIBC_TUNABLES=glibc.malloc.hugetlb=1:glibc.malloc.arena_max=1:glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=100000000000'
A --variant is one or more ENV=VALUE assignments separated by ';'.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

# Spec = conv_impl[:pool_impl] (pool defaults to conv_variants.DEFAULT_POOL_IMPL). The `flax` row
# is the baseline of the ratios. One spec per conv_impl keeps a default run near 3 minutes here.
DEFAULT_SPECS = (
    "flax",
    "lax",
    "lax_patches",
    "shift_sum",
    "shift_concat",
    "fused",
    "gather",
)


def _parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--num_peers", type=int, default=16, help="peers N on the vmapped axis")
    p.add_argument("--batch_size", type=int, default=62, help="examples per peer per step (B)")
    p.add_argument("--repeats", type=int, default=5, help="timed steps per formulation")
    p.add_argument(
        "--impls",
        default=",".join(DEFAULT_SPECS),
        help="comma-separated conv_impl[:pool_impl] specs to time (default: %(default)s)",
    )
    p.add_argument(
        "--peer_chunk",
        type=int,
        default=0,
        help="0: one vmap over all N peers; K>0: lax.map over N/K chunks of K vmapped peers",
    )
    p.add_argument("--peak_size", type=int, default=2048, help="side of the square peak matmul")
    p.add_argument(
        "--variant",
        action="append",
        default=[],
        help="rerun --variant_impls in a child process with these env assignments ('K=V;K=V')",
    )
    p.add_argument("--variant_impls", default="shift_concat,flax", help="specs for the variants")
    p.add_argument("--json", default="", help="also write the rows as JSON to this path")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    for name in ("num_peers", "batch_size", "repeats", "peak_size"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.peer_chunk < 0 or (args.peer_chunk and args.num_peers % args.peer_chunk):
        p.error(f"--peer_chunk must be 0 or divide --num_peers={args.num_peers}, "
                f"got {args.peer_chunk}")
    return args


class _ForeignCpu:
    """CPU seconds that *other* processes used between start() and stop() (from /proc/stat)."""

    def __init__(self):
        self._tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
        self.foreign_s = 0.0

    def _busy(self):
        try:
            with open("/proc/stat") as f:
                vals = [int(v) for v in f.readline().split()[1:]]
        except OSError:
            return None
        idle = vals[3] + (vals[4] if len(vals) > 4 else 0)
        return (sum(vals) - idle) / self._tick

    def start(self):
        self._b0, self._o0 = self._busy(), _own_cpu()

    def stop(self):
        b1, o1 = self._busy(), _own_cpu()
        if b1 is not None and self._b0 is not None:
            self.foreign_s += max(0.0, (b1 - self._b0) - (o1 - self._o0))


def _own_cpu():
    t = os.times()
    return t.user + t.system


def cnn_train_flops_per_example(num_classes: int = 10) -> int:
    """FLOPs of one training example of the MNIST CNN: 3 x forward, forward = 2 x MACs."""
    macs = (
        26 * 26 * 32 * 9 * 1  # conv1 3x3, 1 -> 32, VALID
        + 24 * 24 * 64 * 9 * 32  # conv2 3x3, 32 -> 64, VALID
        + 9216 * 128  # dense1
        + 128 * num_classes  # dense2
    )
    return 3 * 2 * macs


def _measure_peak(jax, jnp, n: int, repeats: int) -> float:
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
    f = jax.jit(jnp.dot)
    jax.block_until_ready(f(a, b))
    ts = []
    for _ in range(max(5, repeats)):
        t0 = time.perf_counter()
        jax.block_until_ready(f(a, b))
        ts.append(time.perf_counter() - t0)
    return 2 * n**3 / statistics.median(ts) / 1e9


def _peer_step(jax, one_peer, n: int, chunk: int):
    """vmap over all peers, or lax.map over n // chunk chunks of `chunk` vmapped peers."""
    step = jax.vmap(one_peer)
    if not chunk or chunk == n:
        return step

    def chunked(params, x, y):
        split = lambda a: a.reshape((n // chunk, chunk) + a.shape[1:])  # noqa: E731
        merge = lambda a: a.reshape((n,) + a.shape[2:])  # noqa: E731
        out = jax.lax.map(lambda a: step(*a), jax.tree.map(split, (params, x, y)))
        return jax.tree.map(merge, out)

    return chunked


def _run_specs(args, specs):
    import jax
    import jax.numpy as jnp
    import optax

    from benchmarks.conv_variants import DEFAULT_POOL_IMPL, VariantCNN

    n, b = args.num_peers, args.batch_size
    x = jax.random.uniform(jax.random.key(1), (n, b, 28, 28, 1), jnp.float32)
    y = jax.random.randint(jax.random.key(2), (n, b), 0, 10)
    keys = jax.random.split(jax.random.key(0), n)

    entries = []
    for spec in specs:
        conv_impl, _, pool_impl = spec.partition(":")
        model = VariantCNN(num_classes=10, conv_impl=conv_impl,
                           pool_impl=pool_impl or DEFAULT_POOL_IMPL)
        params = jax.vmap(lambda k, m=model: m.init(k, jnp.zeros((1, 28, 28, 1))))(keys)

        def one_peer(p, xb, yb, m=model):
            def loss_fn(q):
                logits = m.apply(q, xb)
                return optax.softmax_cross_entropy_with_integer_labels(logits, yb).mean()

            loss, g = jax.value_and_grad(loss_fn)(p)
            return jax.tree.map(lambda w, d: w - 0.1 * d, p, g), loss

        step = jax.jit(_peer_step(jax, one_peer, n, args.peer_chunk), donate_argnums=0)
        t0 = time.perf_counter()
        compiled = step.lower(params, x, y).compile()
        compile_s = time.perf_counter() - t0
        params, loss0 = compiled(params, x, y)  # warm-up step (first touch of all buffers)
        jax.block_until_ready(params)
        entries.append(dict(spec=spec, step=compiled, params=params, loss0=loss0,
                            compile_s=compile_s, times=[]))

    fc = _ForeignCpu()
    for _ in range(args.repeats):
        for e in entries:
            fc.start()
            t0 = time.perf_counter()
            e["params"], _ = e["step"](e["params"], x, y)
            jax.block_until_ready(e["params"])
            e["times"].append(time.perf_counter() - t0)
            fc.stop()
    total_t = sum(sum(e["times"]) for e in entries)

    peak = _measure_peak(jax, jnp, args.peak_size, args.repeats)
    ref_loss = entries[0]["loss0"]
    flops = cnn_train_flops_per_example() * n * b
    rows = []
    for e in entries:
        med = statistics.median(e["times"])
        rows.append(dict(
            spec=e["spec"],
            median_s=med,
            min_s=min(e["times"]),
            examples_per_s=n * b / med,
            gflops=flops / med / 1e9,
            pct_peak=100 * flops / med / 1e9 / peak,
            compile_s=e["compile_s"],
            loss_diff=float(jnp.max(jnp.abs(e["loss0"] - ref_loss))),
        ))
    return dict(
        rows=rows,
        peak_gflops=peak,
        busy_cores=fc.foreign_s / max(total_t, 1e-9),
        num_peers=n,
        batch_size=b,
        peer_chunk=args.peer_chunk,
        repeats=args.repeats,
        env={k: os.environ[k] for k in ("XLA_FLAGS", "GLIBC_TUNABLES") if k in os.environ},
    )


def _run_variant(args, assignments: str):
    env = dict(os.environ)
    for item in assignments.split(";"):
        if not item.strip():
            continue
        key, sep, value = item.strip().partition("=")
        if not sep:
            raise SystemExit(f"--variant item {item!r} is not ENV=VALUE")
        env[key] = value
    cmd = [
        sys.executable, "-m", "benchmarks.conv_lowering", "--child",
        f"--num_peers={args.num_peers}", f"--batch_size={args.batch_size}",
        f"--repeats={args.repeats}", f"--impls={args.variant_impls}",
        f"--peak_size={args.peak_size}", f"--peer_chunk={args.peer_chunk}",
    ]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        print(f"variant {assignments!r} failed:\n{out.stderr[-2000:]}", file=sys.stderr)
        return None
    return json.loads(out.stdout.strip().splitlines()[-1])


def _print_table(result, baseline_s, label=""):
    n, b = result["num_peers"], result["batch_size"]
    chunk = result.get("peer_chunk") or 0
    how = f"lax.map over chunks of {chunk} vmapped peers" if chunk else "one vmap"
    print(
        f"\n{label}N={n} peers x B={b} ({how}), {result['repeats']} repeats; float32 matmul peak "
        f"{result['peak_gflops']:.0f} GFLOP/s (jnp.dot median); other processes' load during "
        f"timing: {result['busy_cores']:.2f} cores"
    )
    if result["env"]:
        print("  env: " + " ".join(f"{k}={v}" for k, v in result["env"].items()))
    hdr = (f"{'conv_impl[:pool]':22s} {'median s':>9s} {'min s':>8s} {'ex/s':>8s} "
           f"{'GFLOP/s':>8s} {'%peak':>6s} {'vs flax':>8s} {'compile':>8s} {'dloss':>8s}")
    print(hdr)
    print("-" * len(hdr))
    for r in result["rows"]:
        ratio = baseline_s / r["median_s"] if baseline_s else float("nan")
        print(f"{r['spec']:22s} {r['median_s']:9.3f} {r['min_s']:8.3f} {r['examples_per_s']:8.0f} "
              f"{r['gflops']:8.1f} {r['pct_peak']:6.1f} {ratio:7.2f}x {r['compile_s']:7.1f}s "
              f"{r['loss_diff']:8.1e}")


def _baseline(result):
    for r in result["rows"]:
        if r["spec"] == "flax":
            return r["median_s"]
    return None


def main(argv=None):
    args = _parse_args(argv)
    specs = [s.strip() for s in args.impls.split(",") if s.strip()]
    result = _run_specs(args, specs)
    if args.child:
        print(json.dumps(result))
        return
    baseline = _baseline(result)
    _print_table(result, baseline)
    print("vs flax = median of the nn.Conv row / median of this row (higher is faster); "
          "dloss = |first-step loss - first row's| (same params and data).")
    results = [result]
    for v in args.variant:
        vr = _run_variant(args, v)
        if vr is None:
            continue
        vr["variant"] = v
        results.append(vr)
        _print_table(vr, _baseline(vr) or baseline, label=f"[{v}] ")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
