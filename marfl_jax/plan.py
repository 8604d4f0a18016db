"""The execution plan: how the local update runs, measured on this machine at start-up.

The same simulation can run its local update in several exact formulations: all N peers in one
vmap, sequential chunks of C vmapped peers (`--peer_chunk`; C = 1 is a per-peer scan), and, for
the CNN, each convolution lowering (`--conv_impl`). Which is fastest depends on the backend, the
device, the model and the shapes, so with `--plan=auto` the runner measures them:

* every candidate runs the same measurement: the run's b local SGD steps for the same K =
  min(N, `measured_peers(backend)`) peers, through its own chunk loop (all peers at once = one
  vmap of the K peers), on random inputs of the run's shapes;
* on a CPU, compilation is timed apart and is not charged to `--plan_budget_s`; the warm-up call
  and the timed calls are. On accelerators (XLA:GPU compiles take seconds a candidate) the
  budget counts compiles too, and a candidate starts only while the time spent plus the
  longest compile so far stays within it: the plan's wall time there is the budget plus at most
  one candidate's overrun;
* the lowerings that build a 9x im2col patch buffer (`IM2COL_IMPLS`, when the plan chooses the
  lowering) are timed only when memory allows (`im2col_bytes`: the buffer and its gradient for
  the run's N peers, or for a chunk, plus the state within the device's available bytes) or
  when the `lax` candidates tried so far all failed; otherwise they are listed as
  skipped with the figures;
* at least the per-peer scan, a middle chunk and all peers at once are timed for each lowering
  (`minimum_set`), narrowest first on a CPU and widest first on accelerators, then the other
  chunks while the budget lasts; a candidate that fails to compile or to run (out of memory,
  say) is listed as skipped with its reason and the next one is tried;
* the choice is the fastest per peer-step, except that a candidate within `SPEED_TOLERANCE` of
  it that needs less memory at the run's N wins (no plan costs more memory than another
  that is about as fast); a candidate whose memory at N exceeds the device's is never chosen;
* when the budget cannot cover the minimum set, the log says which were left out and the rule
  is: on an accelerator all peers at once unless memory says otherwise, on a CPU the fastest
  timed.

The table is logged, the choice cached on disk (`default_cache_dir`: beside the XLA compilation
cache) keyed by backend, device kind, versions, matmul
precision, model and shapes; the workdir keeps the plan it started with (`plan.json`), so a
resumed run uses the same one. Flags set explicitly (a nonzero `--peer_chunk`, a nonempty
`--conv_impl`) are kept as they are; `--plan=fixed` uses the flags.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import math
import os
import time
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

# Chunk sizes tried besides all peers at once; 1 is the per-peer scan (one peer per loop step).
CHUNKS = (1, 4, 8, 16, 32)
# Runs shorter than this many peer-steps (N * b * max_iterations) do not time candidates: they
# take a cached choice if there is one, else the flags' plan.
MIN_PEER_STEPS = 2_000
# A candidate this much slower than the fastest still wins when it needs less memory.
SPEED_TOLERANCE = 0.05
# Convolution lowerings that materialise the im2col patches (kh*kw times the conv's input).
IM2COL_IMPLS = ("gather", "shift_concat")
# The clock that `choose` charges to the budget (tests replace it).
_clock = time.perf_counter


class Request(NamedTuple):
    """What the plan depends on (`config.settings(plan.Request)`): the model and its local
    update at N peers, the flags that fix a formulation, and the numerics."""

    model: str
    conv_impl: str  # '' lets the plan choose.
    peer_chunk: int  # 0 lets the plan choose.
    num_peers: int
    local_batches: int
    batch_size: int
    compute_dtype: str
    matmul_precision: str
    deterministic: bool


def measured_peers(backend: str) -> int:
    """K, the peers every candidate's measurement trains: enough for chunks of 8 to loop on a
    CPU and for an accelerator's widest formulation to fill the device."""
    return 16 if backend == "cpu" else 1024


class Plan(NamedTuple):
    peer_chunk: int  # 0 = all peers at once.
    conv_impl: str  # '' for models without convolutions.
    wave_layout: str = ""  # Asynchronous runs: 'masks' or 'buckets' ('' synchronous).

    def fields(self) -> dict:
        """The plan as a workdir's plan.json holds it (`wave_layout` only when set, so a
        synchronous run's file and the flags it gives back are as before)."""
        return {k: v for k, v in self._asdict().items() if k != "wave_layout" or v}

    def describe(self) -> str:
        chunk = f"chunks of {self.peer_chunk}" if self.peer_chunk else "all peers at once"
        return (chunk + (f", conv {self.conv_impl}" if self.conv_impl else "")
                + (f", waves in {self.wave_layout}" if self.wave_layout else ""))


def wave_layout(flag: str, num_peers: int) -> str:
    """--wave_layout, with 'auto' resolved: buckets, measured faster than masks at N = 64 and
    N = 1,024 on a CPU (benchmarks/RESULTS.md, "Asynchronous waves"; not yet measured on an
    accelerator, where masks avoid a compilation per bucket size)."""
    del num_peers
    return "buckets" if flag == "auto" else flag


def fixed(request) -> Plan:
    """The plan the flags name (the model's default lowering when --conv_impl is '')."""
    from marfl_jax import layers

    conv = request.conv_impl or (layers.DEFAULT_CONV_IMPL if request.model == "cnn" else "")
    return Plan(request.peer_chunk, conv)


def candidates(request, backend: str) -> list[Plan]:
    """The formulations worth timing, in the order they are timed: the minimum set of each
    lowering (the default first), then the other chunks; narrowest first on a CPU, widest
    first on accelerators. Explicitly set flags stay fixed. Chunks as wide as the measured K
    peers or wider are all peers at once for the measurement, so they are left out."""
    from marfl_jax import layers

    width = min(request.num_peers, measured_peers(backend))
    chunks = ([request.peer_chunk] if request.peer_chunk
              else [0] + [c for c in CHUNKS if c < width])
    if request.model != "cnn":
        convs = [""]
    elif request.conv_impl:
        convs = [request.conv_impl]
    else:  # The backend's natural lowering first: XLA's own convolution on accelerators.
        first = layers.DEFAULT_CONV_IMPL if backend == "cpu" else "lax"
        convs = [first] + [c for c in layers.CONV_IMPLS if c != first]
    # XLA:CPU runs the vmapped convolution as one grouped convolution, ~100x slower than gather
    # here (benchmarks/RESULTS.md): not worth a timing that alone would outlast the budget.
    convs = [c for c in convs if not (backend == "cpu" and c == "lax" and c != request.conv_impl)]
    core = minimum_set(chunks, width)
    rest = sorted((c for c in chunks if c not in core), key=lambda c: c or width,
                  reverse=backend != "cpu")
    if backend != "cpu":
        core = sorted(core, key=lambda c: c or width, reverse=True)
    return ([Plan(chunk, conv) for conv in convs for chunk in core]
            + [Plan(chunk, conv) for conv in convs for chunk in rest])


def minimum_set(chunks: list[int], width: int) -> list[int]:
    """The chunks always timed: the per-peer scan, a middle chunk (8 where it loops, else the
    widest that does) and all peers at once (0), of those in `chunks`, narrowest first."""
    looping = [c for c in chunks if 1 < c < width]
    middle = 8 if 8 in looping else max(looping, default=None)
    return [c for c in (1, middle, 0) if c in chunks and c is not None]


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return ""


def cache_key(request, backend: str, device_kind: str, input_shape, num_classes: int) -> str:
    fields = dict(backend=backend, device=device_kind, jax=jax.__version__,
                  jaxlib=_version("jaxlib"),
                  model=request.model, conv_impl=request.conv_impl, peer_chunk=request.peer_chunk,
                  num_peers=request.num_peers, local_batches=request.local_batches,
                  batch_size=request.batch_size, input=list(input_shape),
                  classes=num_classes, dtype=request.compute_dtype, devices=jax.device_count(),
                  measured_peers=measured_peers(backend), rule=2,
                  matmul_precision=request.matmul_precision,
                  deterministic=request.deterministic)
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:20]


def default_cache_dir() -> str:
    """$MARFL_PLAN_CACHE, else `plans` beside the XLA compilation cache (the folder that holds
    `$JAX_COMPILATION_CACHE_DIR` / jax's `jax_compilation_cache_dir`; the launchers' default
    is ~/.cache/marfl_jax/xla), else ~/.cache/marfl_jax/plans: a plan and the compiled code it
    chose live and go together."""
    if os.environ.get("MARFL_PLAN_CACHE"):
        return os.environ["MARFL_PLAN_CACHE"]
    compile_dir = (os.environ.get("JAX_COMPILATION_CACHE_DIR")
                   or getattr(jax.config, "jax_compilation_cache_dir", None))
    if compile_dir:
        return os.path.join(os.path.dirname(os.path.abspath(os.path.expanduser(
            str(compile_dir).rstrip("/")))), "plans")
    return os.path.join(os.path.expanduser("~"), ".cache", "marfl_jax", "plans")


def im2col_bytes(apply_fn, params, sample_input, batch_size: int) -> int:
    """Bytes one peer's im2col lowering holds per local step: for every convolution of the
    model's forward (traced, nothing run), its kh*kw*Cin x Ho*Wo patches of `batch_size`
    examples, twice (the patches kept for the backward and their gradient)."""
    x = jnp.zeros((batch_size,) + tuple(sample_input.shape[1:]), sample_input.dtype)
    jaxpr = jax.make_jaxpr(apply_fn)(params, x)
    total = 0

    def walk(closed):
        nonlocal total
        for eqn in closed.eqns:
            if eqn.primitive.name == "conv_general_dilated":
                out, kernel = eqn.outvars[0].aval, eqn.invars[1].aval
                spec = eqn.params["dimension_numbers"]
                k_spatial = [kernel.shape[d] for d in spec.rhs_spec[2:]]
                cin = kernel.shape[spec.rhs_spec[1]]
                o_spatial = [out.shape[d] for d in spec.out_spec[2:]]
                total += (2 * out.shape[spec.out_spec[0]] * math.prod(o_spatial)
                          * math.prod(k_spatial) * cin * out.dtype.itemsize)
            for value in eqn.params.values():
                for sub in value if isinstance(value, (tuple, list)) else (value,):
                    inner = getattr(sub, "jaxpr", None)
                    if inner is not None:
                        walk(inner if hasattr(inner, "eqns") else sub)

    walk(jaxpr.jaxpr)
    return total


class Timing(NamedTuple):
    """One candidate's measurement: b local steps of `width` peers through its chunk loop."""

    plan: Plan
    compile_s: float
    step_s: float  # One local update (b steps) of `width` peers (median of the timed calls).
    width: int
    steps: int = 1  # b.
    bytes_at_n: int = 0  # Beyond the state: the plan's temporaries at the run's N peers.

    @property
    def per_peer_s(self) -> float:
        """Seconds per peer-step."""
        return self.step_s / (self.width * self.steps)


class Skipped(NamedTuple):
    plan: Plan
    reason: str


def temporary_bytes(compiled) -> int:
    """What a compiled step allocates beyond its (donated) arguments; 0 if not reported."""
    analysis = compiled.memory_analysis()
    if analysis is None:
        return 0
    return max(0, int(analysis.output_size_in_bytes) + int(analysis.temp_size_in_bytes)
               - int(analysis.alias_size_in_bytes))


def time_plan(plan: Plan, make_step, num_peers: int, width: int, *,
              deadline: float = math.inf, repeats: int = 3) -> Timing:
    """Compiles and times one local update (b SGD steps) of `width` peers by the plan's
    formulation, its state donated and carried from call to call as in the run: a warm-up
    call, then up to `repeats` timed calls while they stay short (0.5 s in all) and before
    `deadline` (perf_counter seconds; at least one is timed).

    make_step(plan, width) -> (jitted step (params, opt_state, x, y) -> (params, opt_state,
    losses), args) for `width` peers.
    """
    step, (params, opt_state, *inputs) = make_step(plan, width)
    start = time.perf_counter()
    compiled = step.lower(params, opt_state, *inputs).compile()
    compile_s = time.perf_counter() - start
    temporaries = temporary_bytes(compiled)
    # All peers at once: the temporaries grow with the peers; a chunk's do not.
    bytes_at_n = temporaries * num_peers // width if not plan.peer_chunk else temporaries
    params, opt_state, losses = compiled(params, opt_state, *inputs)  # Warm-up.
    jax.block_until_ready(losses)
    times = []
    while len(times) < repeats and (not times or (sum(times) < 0.5
                                                  and time.perf_counter() < deadline)):
        start = time.perf_counter()
        params, opt_state, losses = compiled(params, opt_state, *inputs)
        jax.block_until_ready((params, opt_state, losses))
        times.append(time.perf_counter() - start)
    return Timing(plan, compile_s, float(np.median(times)), width, inputs[0].shape[1],
                  bytes_at_n)


def local_step_factory(request, build_apply_fn, sample_input, optimizer, num_classes: int):
    """make_step for `time_plan`: the run's local update (b SGD steps) of the model with the
    plan's lowering and chunking, on random inputs of the run's shapes, for `width` peers."""
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
        batches = (width, request.local_batches, request.batch_size)
        images = jax.random.normal(key, batches + sample_input.shape[1:])
        labels = jax.random.randint(key, batches, 0, num_classes)
        active = jnp.ones(width, bool)
        chunk = plan.peer_chunk if plan.peer_chunk < width else 0

        def step(p, s, x, y):
            return local.peers_local_sgd(p, s, x, y, active, apply_fn=apply_fn,
                                         optimizer=optimizer, peer_chunk=chunk)

        return jax.jit(step, donate_argnums=(0, 1)), (stacked, opt_state, images, labels)

    def patch_bytes() -> int:  # One peer's im2col buffer per step (`im2col_bytes`).
        return im2col_bytes(*build_apply_fn(Plan(0, "lax")), sample_input, request.batch_size)

    if request.model == "cnn":
        make_step.patch_bytes = patch_bytes
    return make_step


def _error_text(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return f"{type(error).__name__}: {text[:160]}"


def pick(timings: list[Timing], fits) -> Timing | None:
    """The fastest per peer-step of the timings that fit, or a slower one within
    SPEED_TOLERANCE of it that needs less memory (the least such); None if none fits."""
    usable = [t for t in timings if fits(t)]
    if not usable:
        return None
    fastest = min(t.per_peer_s for t in usable)
    close = [t for t in usable if t.per_peer_s <= fastest * (1 + SPEED_TOLERANCE)]
    return min(close, key=lambda t: (t.bytes_at_n, t.per_peer_s))


def _im2col_rule(request, make_step, state_bytes: int, available_bytes: int | None):
    """plan -> None (time it) or why an im2col lowering is not timed: its patch buffer at the
    run's N (all peers at once) or at its chunk, with the state, exceeds the available bytes.
    Explicit --conv_impl and an unknown device memory time everything."""
    patch_bytes = getattr(make_step, "patch_bytes", None)
    if request.conv_impl or available_bytes is None or patch_bytes is None:
        return lambda plan: None
    per_peer = []

    def reason(plan: Plan) -> str | None:
        if plan.conv_impl not in IM2COL_IMPLS:
            return None
        if not per_peer:
            per_peer.append(patch_bytes())
        peers = min(plan.peer_chunk or request.num_peers, request.num_peers)
        needed = state_bytes + per_peer[0] * peers
        if needed <= available_bytes:
            return None
        return (f"memory: its im2col buffer {per_peer[0] * peers / 2**30:.2f} GiB for {peers:,} "
                f"peers + state {state_bytes / 2**30:.2f} GiB > {available_bytes / 2**30:.2f} "
                "GiB available; tried only if lax fails")

    return reason


def choose(request, make_step, *, backend: str, device_kind: str, input_shape, num_classes: int,
           budget_s: float, cache_dir: str | None = None, log=print,
           state_bytes: int = 0, available_bytes: int | None = None,
           time_candidates: bool = True) -> tuple[Plan, list]:
    """The plan for this run: the cached choice for this key, else (with `time_candidates`) the
    candidates measured as the module docstring says; without it the flags' plan.

    state_bytes: the run's state (params, optimizer, data) at N peers, added to each plan's own
        memory to judge whether it fits; available_bytes: the device's (None: unknown).
    Returns:
      (plan, timings): timings empty when the choice came from the cache or nothing was timed.
    """
    cache_dir = cache_dir or default_cache_dir()
    path = os.path.join(cache_dir, cache_key(request, backend, device_kind, input_shape,
                                             num_classes) + ".json")
    if os.path.exists(path):
        with open(path) as f:
            cached = json.load(f)
        plan = Plan(**cached["plan"])
        log(f"plan: {plan.describe()} (cached in {path})")
        return plan, []
    if not time_candidates:
        log(f"plan: {fixed(request).describe()} (a short run: nothing cached, nothing timed)")
        return fixed(request), []
    width = min(request.num_peers, measured_peers(backend))
    options = candidates(request, backend)
    core = {Plan(c, p.conv_impl) for p in options
            for c in minimum_set(sorted({q.peer_chunk for q in options}), width)}
    # On accelerators compiles count (seconds each on XLA:GPU): start-up stays bounded.
    counts_compiles = backend != "cpu"
    memory_rule = _im2col_rule(request, make_step, state_bytes, available_bytes)
    timings, skipped, spent, compiling = [], [], 0.0, 0.0
    for plan in options:
        longest_compile = max((t.compile_s for t in timings), default=0.0)
        if timings and (spent >= budget_s or (
                counts_compiles and spent + longest_compile > budget_s)):
            skipped.append(Skipped(plan, "budget"))
            continue
        lax_failed = (any(s.plan.conv_impl == "lax" and s.reason != "budget" for s in skipped)
                      and not any(t.plan.conv_impl == "lax" for t in timings))
        reason = None if lax_failed else memory_rule(plan)
        if reason:
            skipped.append(Skipped(plan, reason))
            continue
        started = _clock()
        try:
            timing = time_plan(plan, make_step, request.num_peers, width,
                               deadline=time.perf_counter() + max(budget_s - spent, 0.0))
        except Exception as error:  # noqa: BLE001 - a candidate may fail in any way (OOM, ...)
            skipped.append(Skipped(plan, _error_text(error)))
            spent += _clock() - started
            continue
        timings.append(timing)
        compiling += timing.compile_s
        spent += _clock() - started - (0.0 if counts_compiles else timing.compile_s)

    def fits(t: Timing) -> bool:
        return available_bytes is None or state_bytes + t.bytes_at_n <= available_bytes

    missing = [s.plan for s in skipped if s.plan in core]
    if not timings:
        raise RuntimeError("plan: no candidate compiled and ran: "
                           + "; ".join(f"{s.plan.describe()}: {s.reason}" for s in skipped))
    if missing and backend != "cpu":  # The stated rule: all peers at once unless memory...
        widest = sorted(timings, key=lambda t: t.plan.peer_chunk or math.inf, reverse=True)
        best = next((t for t in widest if fits(t)), None) or pick(timings, lambda t: True)
    else:
        best = pick(timings, fits) or min(timings, key=lambda t: t.bytes_at_n)
    lines = [f"{t.plan.describe():>32}: {1e3 * t.per_peer_s:8.3f} ms/peer-step, "
             f"{t.bytes_at_n / 2**30:6.2f} GiB at N={request.num_peers} (compile "
             f"{t.compile_s:.1f} s){'' if fits(t) else ', does not fit'}" for t in timings]
    lines += [f"{s.plan.describe():>32}: skipped ({s.reason})" for s in skipped
              if s.reason != "budget"]
    budget_note = (f"\n  not timed (budget {budget_s:g} s): "
                   + ", ".join(s.plan.describe() for s in skipped if s.reason == "budget")
                   if any(s.reason == "budget" for s in skipped) else "")
    if missing:
        budget_note += ("\n  the budget did not cover the minimum set (missing: "
                        + ", ".join(p.describe() for p in missing) + "); rule: "
                        + ("all peers at once unless memory says otherwise" if backend != "cpu"
                           else "the fastest timed"))
    spent_text = (f"in {spent:.1f} s ({compiling:.1f} s of it compiling)" if counts_compiles
                  else f"in {spent:.1f} s (+ {compiling:.1f} s compiling)")
    log(f"plan: {len(timings)} candidates timed on {width} peers x {request.local_batches} "
        f"steps {spent_text}, chose {best.plan.describe()}"
        + "".join("\n  " + line for line in lines) + budget_note)
    os.makedirs(cache_dir, exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump({"plan": best.plan._asdict(),
                   "timings": [dict(t.plan._asdict(), per_peer_s=t.per_peer_s,
                                    compile_s=t.compile_s, bytes_at_n=t.bytes_at_n)
                               for t in timings],
                   "skipped": [dict(s.plan._asdict(), reason=s.reason) for s in skipped]},
                  f, indent=1)
    os.replace(path + ".tmp", path)
    return best.plan, timings
