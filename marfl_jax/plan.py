"""The execution plan: how the local update runs, measured on this machine at start-up.

The same simulation can run its local update in several exact formulations: all N peers in one
vmap, sequential chunks of C vmapped peers (`--peer_chunk`; C = 1 is a per-peer scan), and, for
the CNN, each convolution lowering (`--conv_impl`). Which is fastest depends on the backend, the
device, the model and the shapes. With `--plan=auto` the runner times the candidates on the real
compiled local SGD step (one step of a chunk's width, random inputs of the run's shapes) within
`--plan_budget_s`, picks the fastest per peer, logs the table, and caches the choice on disk
keyed by backend, device kind, versions, model and shapes; the workdir keeps the plan it started
with (`plan.json`), so a resumed run uses the same one. Flags set explicitly (a nonzero
`--peer_chunk`, a nonempty `--conv_impl`) are kept as they are; `--plan=fixed` uses the flags.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import time
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

# Chunk sizes tried besides all peers at once; 1 is the per-peer scan (one peer per loop step).
CHUNKS = (1, 4, 8, 16, 32)
# Runs shorter than this many peer-steps (N * b * max_iterations) keep the flags' plan: timing
# would cost more than it could save.
MIN_PEER_STEPS = 20_000


class Plan(NamedTuple):
    peer_chunk: int  # 0 = all peers at once.
    conv_impl: str  # '' for models without convolutions.

    def describe(self) -> str:
        chunk = f"chunks of {self.peer_chunk}" if self.peer_chunk else "all peers at once"
        return chunk + (f", conv {self.conv_impl}" if self.conv_impl else "")


def fixed(config) -> Plan:
    """The plan the flags name (the model's default lowering when --conv_impl is '')."""
    from marfl_jax import layers

    conv = config.conv_impl or (layers.DEFAULT_CONV_IMPL if config.model == "cnn" else "")
    return Plan(config.peer_chunk, conv)


def candidates(config, backend: str) -> list[Plan]:
    """The formulations worth timing, narrowest chunks first for each lowering (the default
    lowering first); explicitly set flags stay fixed."""
    from marfl_jax import layers

    n = config.num_peers
    chunks = ([config.peer_chunk] if config.peer_chunk
              else [0] + [c for c in CHUNKS if c < n])
    if config.model != "cnn":
        convs = [""]
    elif config.conv_impl:
        convs = [config.conv_impl]
    else:
        convs = list(layers.CONV_IMPLS)
    plans = []
    for conv in convs:
        # Narrow chunks first: they are the cheapest to time, so the budget covers most of them.
        for chunk in sorted(chunks, key=lambda c: c or n):
            # XLA:CPU runs the vmapped convolution as one grouped convolution, ~100x slower than
            # gather here (910 vs 8.5 ms per peer-step, benchmarks/RESULTS.md): not worth a
            # timing that alone would outlast the budget.
            if backend == "cpu" and conv == "lax" and conv != config.conv_impl:
                continue
            plans.append(Plan(chunk, conv))
    return plans


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return ""


def cache_key(config, backend: str, device_kind: str, input_shape, num_classes: int) -> str:
    fields = dict(backend=backend, device=device_kind, jax=jax.__version__,
                  jaxlib=_version("jaxlib"),
                  model=config.model, conv_impl=config.conv_impl, peer_chunk=config.peer_chunk,
                  num_peers=config.num_peers, local_batches=config.local_batches,
                  batch_size=config.batch_size, input=list(input_shape),
                  classes=num_classes, dtype=config.compute_dtype, devices=jax.device_count(),
                  matmul_precision=config.matmul_precision,
                  deterministic=config.deterministic)
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:20]


def default_cache_dir() -> str:
    return os.environ.get("MARFL_PLAN_CACHE") or os.path.join(
        os.path.expanduser("~"), ".cache", "marfl_jax", "plans")


class Timing(NamedTuple):
    plan: Plan
    compile_s: float
    step_s: float  # One local update (b steps) of `width` peers (median of the repeats).
    width: int
    steps: int = 1  # b.

    @property
    def per_peer_s(self) -> float:
        """Seconds per peer-step."""
        return self.step_s / (self.width * self.steps)


def time_plan(plan: Plan, make_step, num_peers: int, repeats: int = 3) -> Timing:
    """Compiles and times one local update (b SGD steps) of the plan's width (a chunk, or all
    peers), its state donated and carried from call to call as in the run.

    make_step(plan, width) -> (jitted step (params, opt_state, x, y) -> (params, opt_state,
    losses), args) for `width` peers.
    """
    width = min(plan.peer_chunk or num_peers, num_peers)
    step, (params, opt_state, *inputs) = make_step(plan, width)
    start = time.perf_counter()
    compiled = step.lower(params, opt_state, *inputs).compile()
    compile_s = time.perf_counter() - start
    # Warm-up (first touch of buffers, thread pools), then the timed calls.
    params, opt_state, losses = compiled(params, opt_state, *inputs)
    jax.block_until_ready(losses)
    times = []
    while len(times) < repeats and (not times or sum(times) < 0.5):  # Slow steps: one timing.
        start = time.perf_counter()
        params, opt_state, losses = compiled(params, opt_state, *inputs)
        jax.block_until_ready((params, opt_state, losses))
        times.append(time.perf_counter() - start)
    return Timing(plan, compile_s, float(np.median(times)), width, inputs[0].shape[1])


def local_step_factory(config, build_apply_fn, sample_input, optimizer, num_classes: int):
    """make_step for `time_plan`: the run's local update (b SGD steps) of the model with the
    plan's lowering, on random inputs of the run's shapes, for `width` peers."""
    from marfl_jax import local

    def make_step(plan: Plan, width: int):
        apply_fn, params = build_apply_fn(plan)
        def stack(tree):  # Copies: the step donates them.
            return jax.tree.map(lambda x: jnp.array(jnp.broadcast_to(x, (width,) + x.shape)),
                                tree)

        stacked, opt_state = stack(params), stack(optimizer.init(params))
        key = jax.random.key(0)
        # The run's b steps: a one-step scan compiles differently (XLA inlines it and, for a
        # 64-wide CNN step, ran it 5x slower per peer-step than inside the 4-step scan).
        batches = (width, config.local_batches, config.batch_size)
        images = jax.random.normal(key, batches + sample_input.shape[1:])
        labels = jax.random.randint(key, batches, 0, num_classes)
        active = jnp.ones(width, bool)

        def step(p, s, x, y):
            return local.peers_local_sgd(p, s, x, y, active, apply_fn=apply_fn,
                                         optimizer=optimizer)

        return jax.jit(step, donate_argnums=(0, 1)), (stacked, opt_state, images, labels)

    return make_step


def choose(config, make_step, *, backend: str, device_kind: str, input_shape, num_classes: int,
           budget_s: float, cache_dir: str | None = None, log=print) -> tuple[Plan, list]:
    """The fastest plan per peer among `candidates`, timed until the budget is spent (the first
    is always timed; a candidate whose predicted cost, from the fastest per-peer time so far,
    would overrun the budget is skipped), or the cached choice for this key.

    Returns:
      (plan, timings): timings empty when the choice came from the cache.
    """
    cache_dir = cache_dir or default_cache_dir()
    path = os.path.join(cache_dir, cache_key(config, backend, device_kind, input_shape,
                                             num_classes) + ".json")
    if os.path.exists(path):
        with open(path) as f:
            cached = json.load(f)
        plan = Plan(**cached["plan"])
        log(f"plan: {plan.describe()} (cached in {path})")
        return plan, []
    timings, start = [], time.perf_counter()
    options = candidates(config, backend)
    skipped = []
    for plan in options:
        width = min(plan.peer_chunk or config.num_peers, config.num_peers)
        if timings:
            best_so_far = min(t.per_peer_s for t in timings)
            compile_s = max(t.compile_s for t in timings)
            steps = timings[0].steps
            predicted = compile_s + 3 * best_so_far * width * steps  # Warm-up, timings, at best.
            if time.perf_counter() - start + predicted > budget_s:
                skipped.append(plan)
                continue
        timings.append(time_plan(plan, make_step, config.num_peers))
    best = min(timings, key=lambda t: t.per_peer_s)
    lines = [f"{t.plan.describe():>32}: {1e3 * t.per_peer_s:8.3f} ms/peer-step "
             f"(compile {t.compile_s:.1f} s)" for t in timings]
    not_timed = (f"\n  not timed (budget {budget_s:g} s): "
                 + ", ".join(p.describe() for p in skipped) if skipped else "")
    log(f"plan: timed in {time.perf_counter() - start:.1f} s, chose {best.plan.describe()}"
        + "".join("\n  " + line for line in lines) + not_timed)
    os.makedirs(cache_dir, exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump({"plan": best.plan._asdict(),
                   "timings": [dict(t.plan._asdict(), per_peer_s=t.per_peer_s,
                                    compile_s=t.compile_s) for t in timings]}, f, indent=1)
    os.replace(path + ".tmp", path)
    return best.plan, timings
