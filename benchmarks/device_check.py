r"""One script for a GPU (or any accelerator): what this simulator does on it, in under 8 minutes.

    PYTHONPATH=. python -m benchmarks.device_check --markdown=$OUT/device_check.md
    python -m benchmarks.device_check --tiny          # seconds, on any machine (the tests)

Prints, for the default device: the float32 and bfloat16 matmul peaks; the main job's time to
95 % (`python -m launch.train` defaults: MAR-FL, CNN, 64 peers, embedded MNIST, --plan=auto);
MLP local-training peer-steps/s at N = 1,000 / 10,000 / 100,000 (halving N until it fits);
the CNN at N = 1,000; a MAR round against a copy of the state; and the per-peer PyTorch loop on
the same device (when torch imports), with the ratios. It imports only what the core needs
(jax, flax, optax, chex, absl, orbax), so it runs from a working tree with PYTHONPATH=.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
import types

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import training_throughput as tt


def peak(dtype, size: int, repeats: int) -> float:
    """GFLOP/s of a jitted size x size matmul in `dtype`."""
    a = jax.random.normal(jax.random.key(0), (size, size)).astype(dtype)
    b = jax.random.normal(jax.random.key(1), (size, size)).astype(dtype)
    f = jax.jit(jnp.dot)
    return 2 * size**3 / tt._median_time(lambda: jax.block_until_ready(f(a, b)), repeats) / 1e9


def main_job(tiny: bool) -> dict:
    """The launcher's default run (or a tiny one) to its target; wall seconds and iterations."""
    from marfl_jax import Config, run

    config = Config(max_iterations=500, checkpoint_every=0)
    if tiny:
        config = Config(model="mlp", num_peers=4, group_size=2, key_dim=2, max_iterations=2,
                        checkpoint_every=0, target_accuracy=0.5)
    with tempfile.TemporaryDirectory() as workdir:
        start = time.perf_counter()
        summary = run(config, workdir).summary
    return {"wall_s": time.perf_counter() - start, "iterations": summary["iterations"],
            "reached": summary["reached_target"], "accuracy": summary["final_accuracy"]}


def _args(tiny: bool, batch: int, repeats: int):
    return types.SimpleNamespace(learning_rate=0.1, momentum=0.9, local_batches=1 if tiny else 4,
                                 batch_size=batch, repeats=repeats, group_size=0)


def training(model: str, sizes: list[int], args) -> list[tuple[int, float | str]]:
    """(N, peer-steps/s) of the vectorized local update, halving N while it does not fit."""
    setup = tt.Setup(model, args)
    results = []
    for n in sizes:
        while True:
            path = tt.vectorized_path(setup, n)
            if not isinstance(path, str) or n <= 1:
                break
            n //= 2
        if isinstance(path, str):
            results.append((n, path))
            continue
        seconds = tt._median_time(path.run, args.repeats)
        results.append((n, n * setup.b / seconds))
    return results


def torch_loop(model: str, args, peers: int) -> float | str:
    """Peer-steps/s of the per-peer PyTorch loop on the same kind of device (cuda if any)."""
    try:
        import torch
    except ImportError as error:
        return f"skipped: {tt._error_text(error)}"
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


def check(tiny: bool) -> list[str]:
    repeats = 1 if tiny else 3
    device = jax.devices()[0]
    lines = [f"device: {device.platform} {device.device_kind} x{jax.device_count()}; "
             f"jax {jax.__version__}; host {platform.processor() or platform.machine()}"]
    size = 256 if tiny else 8192
    f32, bf16 = peak(jnp.float32, size, repeats), peak(jnp.bfloat16, size, repeats)
    lines.append(f"matmul peak: float32 {f32:,.0f} GFLOP/s, bfloat16 {bf16:,.0f} GFLOP/s "
                 f"({size}^2)")
    job = main_job(tiny)
    lines.append(f"main job: {job['wall_s']:.1f} s wall, {job['iterations']} iterations, "
                 f"final accuracy {job['accuracy']:.4f}, target reached: {job['reached']}")
    mlp_args = _args(tiny, 32, repeats)
    mlp_sizes = [8] if tiny else [1_000, 10_000, 100_000]
    mlp = training("mlp", mlp_sizes, mlp_args)
    torch_peers = 4 if tiny else 64
    torch_mlp = torch_loop("mlp", mlp_args, torch_peers)
    for n, rate in mlp:
        ratio = (f", {rate / torch_mlp:.1f}x the per-peer torch loop" if isinstance(rate, float)
                 and isinstance(torch_mlp, float) else "")
        shown = f"{rate:,.0f}" if isinstance(rate, float) else rate
        lines.append(f"MLP N={n:,} B=32: {shown} peer-steps/s{ratio}")
    lines.append(f"MLP per-peer torch loop ({torch_peers} peers): "
                 + (f"{torch_mlp:,.0f} peer-steps/s" if isinstance(torch_mlp, float)
                    else torch_mlp))
    cnn_args = _args(tiny, 16, repeats)
    ((n, cnn),) = training("cnn", [2 if tiny else 1_000], cnn_args)
    torch_cnn = torch_loop("cnn", cnn_args, 2 if tiny else 32)
    ratio = (f", {cnn / torch_cnn:.2f}x the per-peer torch loop" if isinstance(cnn, float)
             and isinstance(torch_cnn, float) else "")
    lines.append(f"CNN N={n:,} B=16: " + (f"{cnn:,.0f} peer-steps/s" if isinstance(cnn, float)
                                          else cnn) + ratio)
    lines.append("CNN per-peer torch loop: " + (f"{torch_cnn:,.0f} peer-steps/s"
                                                if isinstance(torch_cnn, float) else torch_cnn))
    row, note = tt.bench_mixing(tt.Setup("mlp", mlp_args), 8 if tiny else 10_000, mlp_args)
    lines.append(note if row is None else f"MAR round vs copy (MLP N={row[1]}, M={row[2]}): "
                 f"round {row[5]} ms, copy {row[6]} ms, ratio {row[9]}")
    return lines


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="seconds-sized shapes (tests, CPU)")
    parser.add_argument("--markdown", default="", help="also write the lines to this file")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    lines = check(args.tiny)
    lines.append(f"device check: {time.perf_counter() - start:.0f} s; command: "
                 + " ".join(["python", "-m", "benchmarks.device_check", *sys.argv[1:]]))
    for line in lines:
        print(line, flush=True)
    if args.markdown:
        os.makedirs(os.path.dirname(os.path.abspath(args.markdown)), exist_ok=True)
        with open(args.markdown, "w") as f:
            f.write("\n".join(f"- {line}" for line in lines) + "\n")


if __name__ == "__main__":
    main()
