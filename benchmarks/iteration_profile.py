r"""Where one FL iteration's time goes on this machine: each layer's forward and backward, the
optimizer, the local update, mixing, the consensus metrics, evaluation and the host's work.

    python -m benchmarks.iteration_profile                       # the main job: CNN, N = 64
    python -m benchmarks.iteration_profile --model=mlp --algorithm=fedavg

Prints two tables, every figure the median of --repeats calls after a warm-up, each part
jitted on its own (so the parts of a peer-step do not add up exactly to the fused step):

1. One peer-step (b = 1 step of B examples, vmapped over the plan's chunk of C peers, or all
   N peers at once): each layer's forward and backward, the loss, the optimizer's update, and
   the whole step; FLOPs are XLA's own count (`cost_analysis`) and GFLOP/s is set against the
   float32 matmul peak measured in the same run.
2. One iteration of the run (`runner.run` with --plan=fixed at the given chunk, --eval_every
   as given): the local update alone, mixing (the grid mean of weights and momentum), the two
   consensus metrics, one evaluation (divided by --eval_every), the whole compiled iteration,
   and the run's own wall time per iteration (its rows' `seconds` over iterations 1 to T-1,
   evaluations included), whose excess over the compiled iteration and the evaluations is the
   host's bookkeeping and dispatch. The last line gives the share of
   the run's iteration spent outside the local update.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import tempfile
import time

import jax
import jax.numpy as jnp
import optax

from benchmarks import training_throughput as tt
from marfl_jax import Config, assemble, layers, local, mixing, models, runner
from marfl_jax import data as data_lib
from marfl_jax import plan as plan_lib
from marfl_jax.core import make_iteration


def _parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="cnn", choices=("cnn", "mlp"))
    p.add_argument("--algorithm", default="marfl")
    p.add_argument("--num_peers", type=int, default=64)
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--local_batches", type=int, default=4)
    p.add_argument("--peer_chunk", type=int, default=1,
                   help="the plan to profile (0 = all peers at once)")
    p.add_argument("--conv_impl", default="", help="CNN lowering ('' = the default)")
    p.add_argument("--eval_every", type=int, default=5)
    p.add_argument("--iterations", type=int, default=11,
                   help="iterations of the timed run (11: evaluations at 0, 5 and 10)")
    p.add_argument("--repeats", type=int, default=5)
    return p.parse_args(argv)


def _time(fn, *args, repeats: int) -> float:
    """Median seconds of the jitted fn(*args) after a warm-up."""
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _flops(fn, *args) -> float:
    cost = fn.lower(*args).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) and cost else cost
    return float((cost or {}).get("flops", 0.0))


def _part(name, fn, args, width, repeats):
    """(name, ms, GFLOP) of a jitted part vmapped over `width` peers (width 1: no vmap)."""
    batched = jax.jit(fn if width == 1 else jax.vmap(fn))
    if width > 1:
        args = jax.tree.map(lambda x: jnp.broadcast_to(x, (width,) + x.shape), args)
    seconds = _time(batched, *args, repeats=repeats)
    return name, seconds, _flops(batched, *args)


def _grad(fn, argnums):
    """The backward of fn: the gradient of <fn(...), cotangent> with respect to argnums."""
    def backward(*args):
        *inputs, cotangent = args
        return jax.grad(lambda *a: jnp.vdot(fn(*a), cotangent), argnums)(*inputs)
    return backward


def cnn_parts(params, x, y, conv_impl, width, repeats):
    """Each CNN layer forward and backward for one peer-step of B examples."""
    p = params
    k1, b1, k2, b2 = (p["conv1"]["kernel"], p["conv1"]["bias"], p["conv2"]["kernel"],
                      p["conv2"]["bias"])
    w1, c1, w2, c2 = (p["dense1"]["kernel"], p["dense1"]["bias"], p["dense2"]["kernel"],
                      p["dense2"]["bias"])

    def conv1(k, b, x):
        return jax.nn.relu(layers.conv_valid(x, k, conv_impl) + b)

    def conv2(h, k):
        return layers.conv_valid(h, k, conv_impl)

    def pool(z, b):
        return jax.nn.relu(layers.max_pool_2x2(z) + b).reshape(z.shape[0], -1)

    def dense1(f, w, c):
        return jax.nn.relu(f @ w + c)

    def dense2(h, w, c):
        return h @ w + c

    def loss(logits, y):
        return local.cross_entropy(logits, y)

    h1 = conv1(k1, b1, x)
    z2 = conv2(h1, k2)
    f = pool(z2, b2)
    h3 = dense1(f, w1, c1)
    logits = dense2(h3, w2, c2)
    parts = [
        ("conv1 forward", conv1, (k1, b1, x)),
        ("conv1 backward", _grad(conv1, (0, 1)), (k1, b1, x, h1)),
        ("conv2 forward", conv2, (h1, k2)),
        ("conv2 backward", _grad(conv2, (0, 1)), (h1, k2, z2)),
        ("pool+bias+relu fwd", pool, (z2, b2)),
        ("pool+bias+relu bwd", _grad(pool, (0, 1)), (z2, b2, f)),
        ("dense1 forward", dense1, (f, w1, c1)),
        ("dense1 backward", _grad(dense1, (0, 1, 2)), (f, w1, c1, h3)),
        ("dense2 forward", dense2, (h3, w2, c2)),
        ("dense2 backward", _grad(dense2, (0, 1, 2)), (h3, w2, c2, logits)),
        ("loss fwd+bwd", jax.value_and_grad(loss), (logits, y)),
    ]
    return [_part(name, fn, args, width, repeats) for name, fn, args in parts]


def mlp_parts(params, x, y, width, repeats):
    w1, c1 = params["dense1"]["kernel"], params["dense1"]["bias"]
    w2, c2 = params["dense2"]["kernel"], params["dense2"]["bias"]
    f = x.reshape(x.shape[0], -1)

    def dense1(f, w, c):
        return jax.nn.relu(f @ w + c)

    def dense2(h, w, c):
        return h @ w + c

    h = dense1(f, w1, c1)
    logits = dense2(h, w2, c2)
    parts = [
        ("dense1 forward", dense1, (f, w1, c1)),
        ("dense1 backward", _grad(dense1, (1, 2)), (f, w1, c1, h)),
        ("dense2 forward", dense2, (h, w2, c2)),
        ("dense2 backward", _grad(dense2, (0, 1, 2)), (h, w2, c2, logits)),
        ("loss fwd+bwd", jax.value_and_grad(local.cross_entropy), (logits, y)),
    ]
    return [_part(name, fn, args, width, repeats) for name, fn, args in parts]


def step_parts(config, model, params, apply_fn, optimizer, width, repeats):
    """Table 1's rows: (name, seconds, flops) per peer-step part, then the optimizer and the
    whole step."""
    key = jax.random.key(0)
    x = jax.random.normal(key, (config.batch_size, 28, 28, 1))
    y = jax.random.randint(key, (config.batch_size,), 0, 10)
    rows = (cnn_parts(params, x, y, model.conv_impl, width, repeats) if config.model == "cnn"
            else mlp_parts(params, x, y, width, repeats))
    opt_state = optimizer.init(params)

    def update(params, opt_state, grads):
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    rows.append(_part("optimizer update", update, (params, opt_state, params), width, repeats))

    def whole(params, opt_state, x, y):
        return local.local_sgd(params, opt_state, x[None], y[None], apply_fn=apply_fn,
                               optimizer=optimizer)

    rows.append(_part("whole peer-step (fused)", whole, (params, opt_state, x, y), width,
                      repeats))
    return rows


def iteration_parts(config, repeats):
    """Table 2's rows: (name, seconds per iteration) of the run's pieces, and the run's own
    wall seconds per iteration (iterations 1 to T-1, evaluations included)."""
    dataset, data, test_images, test_labels = assemble.load_data(config)
    model = assemble.build_model(config, dataset.num_classes, plan_lib.fixed(config))
    sim = assemble.simulation(config, model)
    key = jax.random.key(config.seed)
    state = assemble.initial_state(config, model, sim, test_images[:1])
    iteration = jax.jit(make_iteration(sim), donate_argnums=0)
    keys = iter(jax.random.split(key, 10_000))

    def run_iteration():
        nonlocal state
        state, info = iteration(state, next(keys), data)
        return state, info

    whole = _time(run_iteration, repeats=repeats)

    def local_update(params, opt_state, k):
        index = data_lib.sample_peer_batches(jax.random.split(k, config.num_peers), data.table,
                                             data.counts, config.local_batches,
                                             config.batch_size)
        return local.peers_local_sgd(
            params, opt_state, data_lib.preprocess(data.x_train[index]), data.y_train[index],
            jnp.ones(config.num_peers, bool), apply_fn=sim.apply_fn, optimizer=sim.optimizer,
            peer_chunk=config.peer_chunk)

    update = jax.jit(local_update, donate_argnums=(0, 1))

    def run_update():
        nonlocal state
        params, opt_state, losses = update(state.params, state.opt_state, next(keys))
        state = state._replace(params=params, opt_state=opt_state)
        return losses

    local_s = _time(run_update, repeats=repeats)
    shared = (state.params, state.opt_state)
    grid = getattr(sim.algorithm, "grid", None)
    schedule = sim.algorithm.schedule(jnp.ones((sim.algorithm.num_rounds, config.num_peers),
                                               bool), key)
    mixer = mixing.mixer(sim.algorithm.num_groups, grid=grid)
    mix = jax.jit(lambda tree: mixing.mix(tree, schedule, mixer))
    mixing_s = _time(mix, shared, repeats=repeats)
    present = jnp.ones(config.num_peers, bool)
    consensus = jax.jit(mixing.consensus_distance)
    # After one exact mean over the whole grid the run knows consensus_after is 0 (no pass).
    passes = 1 + (grid is None or set(grid.axes) != set(range(len(grid.radices))))
    consensus_s = passes * _time(consensus, state.params, present, repeats=repeats)
    evaluate = jax.jit(lambda p: local.evaluate(p, test_images, test_labels,
                                                apply_fn=sim.apply_fn))
    one_model = jax.tree.map(lambda x: x[0], state.params)
    evaluation_s = _time(evaluate, one_model, repeats=repeats) / config.eval_every
    with tempfile.TemporaryDirectory() as workdir:
        result = runner.run(dataclasses.replace(config, workdir=workdir), workdir)
    seconds = [r["seconds"] for r in result.metrics]
    rows = [("local update (alone)", local_s), ("mixing (alone)", mixing_s),
            (f"consensus metrics, {passes} pass(es) (alone)", consensus_s),
            (f"one evaluation / {config.eval_every}", evaluation_s),
            ("compiled iteration", whole)]
    # Iterations 1..T-1 (iteration 0 carries the compilation): evaluations included.
    return rows, (seconds[-1] - seconds[0]) / (len(seconds) - 1)


def _cpu_line(peak) -> str:
    return (f"{tt._cpu_model()}, {os.cpu_count()} cores; jax {jax.__version__} "
            f"({jax.devices()[0].platform}); float32 matmul peak {peak:.0f} GFLOP/s")


def main(argv=None) -> None:
    args = _parse_args(argv)
    config = Config(model=args.model, algorithm=args.algorithm, num_peers=args.num_peers,
                    batch_size=args.batch_size, local_batches=args.local_batches,
                    peer_chunk=args.peer_chunk, conv_impl=args.conv_impl, plan="fixed",
                    eval_every=args.eval_every, max_iterations=args.iterations,
                    checkpoint_every=0, target_accuracy=1.0).validate()
    _, peak = tt.measure_peak(2048, args.repeats)
    print(_cpu_line(peak))
    dataset_classes = 10
    model = assemble.build_model(config, dataset_classes, plan_lib.fixed(config))
    params = model.init(jax.random.key(0), jnp.zeros((1, 28, 28, 1)))["params"]
    apply_fn = models.make_apply_fn(model)
    optimizer = local.momentum_sgd(config.learning_rate, config.momentum)
    width = min(config.peer_chunk or config.num_peers, config.num_peers)
    rows = step_parts(config, model, params, apply_fn, optimizer, width, args.repeats)
    total = rows[-1][1]
    print(f"\n1. One peer-step, {config.model} B={config.batch_size}, vmapped over {width} "
          f"peer(s) ({plan_lib.fixed(config).describe()}); per peer:")
    print(f"{'part':34s} {'ms':>8s} {'GFLOP':>8s} {'GFLOP/s':>8s} {'% peak':>7s} {'% step':>7s}")
    for name, seconds, flops in rows:
        rate = flops / seconds / 1e9 if seconds else 0.0
        print(f"{name:34s} {1e3 * seconds / width:8.3f} {flops / width / 1e9:8.4f} "
              f"{rate:8.1f} {100 * rate / peak:6.1f}% {100 * seconds / total:6.1f}%")
    parts, run_s = iteration_parts(config, args.repeats)
    print(f"\n2. One iteration, {config.algorithm} N={config.num_peers} b={config.local_batches}"
          f" B={config.batch_size} ({plan_lib.fixed(config).describe()}), seconds:")
    for name, seconds in parts + [("the run's wall time per iteration", run_s)]:
        print(f"{name:40s} {seconds:8.4f} {100 * seconds / run_s:6.1f}% of the run's")
    local_s = parts[0][1]
    print(f"outside the local update: {run_s - local_s:.4f} s = "
          f"{100 * (run_s - local_s) / run_s:.1f} % of the run's iteration "
          f"(its evaluation every {config.eval_every} included)")
    print(json.dumps({"run_s": run_s, "local_s": local_s}))


if __name__ == "__main__":
    main()
