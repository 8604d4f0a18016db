"""The runner: one run on the host around the pure simulation of `marfl_jax.core`.

    run(config, workdir) -> RunResult

It loads the data, builds the model and the `Simulation`, compiles the iteration (refusing a run
that would not fit), resumes from the last checkpoint, then loops: one jitted iteration, the
ledger's exact bytes, evaluation on schedule, one row appended to metrics.jsonl, a checkpoint
every `--checkpoint_every` iterations. Every random draw is a function of the seed and the
iteration, so a resumed run rewrites the rows after its checkpoint exactly as an uninterrupted
run would.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
import time
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from marfl_jax import (
    accounting,
    adversary,
    algorithms,
    attacks,
    clock,
    comm,
    evaluation,
    local,
    memory,
    models,
    network,
    rules,
    runtime,
    sharding,
    tracking,
    watch,
)
from marfl_jax import codec as codec_lib
from marfl_jax import data as data_lib
from marfl_jax import plan as plan_lib
from marfl_jax import workdir as files
from marfl_jax.config import Config, ConfigError
from marfl_jax.core import DeviceData, FLState, Simulation, init_state, make_iteration

# What every algorithm averages: weights and momentum (DP adds the smoothed update).
STATE_PAYLOADS = 2


class RunResult(NamedTuple):
    summary: dict
    metrics: list[dict]
    state: FLState | None = None  # The final state (peer axis first).


def load_data(config: Config):
    """The dataset, the peers' partition on the device, and the test set.

    Returns:
      (dataset, DeviceData, test images (n_test, ...) float32, test labels (n_test,) int32).
    """
    dataset = data_lib.load_dataset(
        config.dataset, config.data_dir or None, encoder=config.encoder,
        features=config.features, feature_dim=config.feature_dim,
        feature_cache=config.feature_cache or None)
    try:
        peer_index = data_lib.partition(dataset.y_train, config.num_peers, config.partition,
                                        config.dirichlet_alpha, config.seed)
    except ValueError as error:
        raise ConfigError(str(error)) from error
    data = DeviceData(jnp.asarray(dataset.x_train), jnp.asarray(dataset.y_train, jnp.int32),
                      jnp.asarray(peer_index.table), jnp.asarray(peer_index.counts))
    logging.info("data: %s; %d train / %d test examples; %d peers hold %d-%d examples",
                 dataset.source, len(dataset.y_train), len(dataset.y_test), config.num_peers,
                 peer_index.counts.min(), peer_index.counts.max())
    return (dataset, data, data_lib.preprocess(jnp.asarray(dataset.x_test)),
            jnp.asarray(dataset.y_test, jnp.int32))


def make_apply_fn(model, compute_dtype: str = "float32"):
    """(params, x, rng=None) -> float32 logits; rng None: evaluation mode, a key: training mode.

    With compute_dtype bfloat16 the parameters and inputs are cast on the way in, so the
    forward and backward matmuls run in bfloat16 while the gradients reach the float32
    parameters (the cast's transpose)."""
    dropout = models.uses_dropout(model)
    dtype = jnp.dtype(compute_dtype)

    def apply_fn(params, x, rng=None):
        if dtype != jnp.float32:
            params = jax.tree.map(lambda p: p.astype(dtype), params)
            x = jnp.asarray(x).astype(dtype)
        if rng is None or not dropout:
            logits = model.apply({"params": params}, x)
        else:
            logits = model.apply({"params": params}, x, train=True, rngs={"dropout": rng})
        return logits.astype(jnp.float32)

    return apply_fn


def make_simulation(config: Config, model, mesh=None, *, algorithm=None, clock=None,
                    apply_fn=None, num_classes: int | None = None) -> Simulation:
    """The static pieces of the run `config` describes (`algorithm`, `apply_fn`: the config's,
    when already made; `clock`: the simulated clock, see `assemble`; `num_classes`: the task's,
    for label-flipping attackers)."""
    codec = codec_lib.CODECS.get(config.codec)
    roundtrip = (None if codec.lossless else
                 functools.partial(codec_lib.roundtrip_tree, codec, block=config.codec_block))
    return Simulation(
        apply_fn=apply_fn or make_apply_fn(model, config.compute_dtype),
        optimizer=local.momentum_sgd(config.learning_rate, config.momentum),
        algorithm=algorithm or algorithms.make_algorithm(config),
        churn_model=config.churn_model(),
        local_batches=config.local_batches, batch_size=config.batch_size,
        model_dropout=models.uses_dropout(model), peer_chunk=config.peer_chunk,
        distillation=config.distillation(), privacy=config.privacy(), mesh=mesh,
        roundtrip=roundtrip, slice_unit=codec.unit(config.codec_block),
        share_momentum=config.share_momentum, clock=clock,
        aggregator=rules.get(config.aggregator, rules.Params.of(config)),
        adversary=make_adversary(config, num_classes))


def make_adversary(config: Config, num_classes: int | None) -> adversary.Adversary | None:
    """The run's Byzantine peers (`--byzantine_fraction`), or None."""
    if not config.byzantine_fraction:
        return None
    return adversary.Adversary(
        adversary.pool(config.num_peers, config.byzantine_fraction, config.seed),
        attacks.get(config.attack), attacks.Params.of(config), config.byzantine_placement,
        num_classes or 10)


class Assembly(NamedTuple):
    """A run's pieces, each built once from its config (`assemble`)."""

    sim: Simulation
    ledger: comm.Ledger
    accountant: accounting.PrivacyAccountant | None
    one_peer: Any  # One peer's params as ShapeDtypeStructs.
    model: Any  # The flax module every peer runs.


def assemble(config: Config, model, sample_input, mesh=None) -> Assembly:
    """The simulation with its clock, the ledger and the privacy accountant, in one pass: one
    peer's parameter shapes give the payload as encoded on the wire, the payload the ledger,
    the ledger the clock's message sizes, and the Simulation is made once, with its clock.

    sample_input: (1, ...) one input example (shapes only)."""
    algorithm = algorithms.make_algorithm(config)
    one_peer = jax.eval_shape(lambda: model.init(jax.random.key(0), sample_input)["params"])
    encoded = codec_lib.tree_bytes(codec_lib.CODECS.get(config.codec), one_peer,
                                   config.codec_block)
    private = config.dp
    ledger = make_ledger(algorithm, encoded, private=private,
                         share_momentum=config.share_momentum)

    apply_fn = make_apply_fn(model, config.compute_dtype)

    def flops_per_example():  # Only a trace with a gflops column asks.
        params = model.init(jax.random.key(0), sample_input)["params"]
        return train_flops_per_example(apply_fn, params, sample_input)

    run_clock = (None if config.network == "none" else
                 make_clock(config, algorithm, ledger, flops_per_example))
    num_classes = jax.eval_shape(lambda: apply_fn(
        model.init(jax.random.key(0), sample_input)["params"], sample_input)).shape[-1]
    sim = make_simulation(config, model, mesh, algorithm=algorithm, clock=run_clock,
                          apply_fn=apply_fn, num_classes=num_classes)
    accountant = None if not private else accounting.PrivacyAccountant(
        config.num_peers, config.dp_noise_multiplier, config.privacy_delta)
    return Assembly(sim, ledger, accountant, one_peer, model)


def build_model(config: Config, num_classes: int, chosen: plan_lib.Plan):
    """The run's model, with the plan's convolution lowering."""
    kwargs = {"conv_impl": chosen.conv_impl} if chosen.conv_impl else {}
    return models.get_model(config.model, num_classes, **kwargs)


def execution_plan(config: Config, workdir: str, previous, num_classes: int, sample_input,
                   mesh) -> plan_lib.Plan:
    """The plan this run keeps: the workdir's (a resumed run), the flags' (--plan=fixed, a
    sharded or short run), or the fastest measured now (`marfl_jax.plan`). The runner writes it
    to the workdir's plan.json once the run is known to fit."""
    path = os.path.join(workdir, "plan.json")
    stored = files.read_json(path) if previous is not None else None
    if stored is not None:
        chosen = plan_lib.Plan(**stored)
        logging.info("plan: %s (kept from %s)", chosen.describe(), path)
        return chosen
    request = config.settings(plan_lib.Request)
    chosen = plan_lib.fixed(request)
    peer_steps = config.num_peers * config.local_batches * config.max_iterations
    if previous is not None:  # A run from before plans existed ran the flags' plan.
        logging.info("plan: %s (the flags', as when this run started)", chosen.describe())
    elif config.plan == "auto" and mesh is None:
        device = jax.devices()[0]
        optimizer = local.momentum_sgd(config.learning_rate, config.momentum)

        def build_apply_fn(candidate):
            model = build_model(config, num_classes, candidate)
            params = model.init(jax.random.key(0), sample_input)["params"]
            return make_apply_fn(model, config.compute_dtype), params

        one_peer = jax.eval_shape(lambda: build_apply_fn(chosen)[1])
        state_bytes = config.num_peers * (memory.tree_nbytes(one_peer) + memory.tree_nbytes(
            jax.eval_shape(optimizer.init, one_peer)))
        make_step = plan_lib.local_step_factory(request, build_apply_fn, sample_input, optimizer,
                                                num_classes)
        chosen, _ = plan_lib.choose(
            request, make_step, backend=device.platform, device_kind=device.device_kind,
            input_shape=tuple(sample_input.shape[1:]), num_classes=num_classes,
            budget_s=config.plan_budget_s, log=logging.info, state_bytes=state_bytes,
            available_bytes=(int(config.memory_limit_gb * memory.GB) if config.memory_limit_gb
                             else memory.available_bytes(device)),
            time_candidates=peer_steps >= plan_lib.MIN_PEER_STEPS)
    else:
        logging.info("plan: %s (%s)", chosen.describe(), "--plan=fixed" if config.plan ==
                     "fixed" else "sharded run")
    return chosen


def make_ledger(algorithm, payload_bytes: int, *, private: bool = False,
                share_momentum: bool = True) -> comm.Ledger:
    """payload_bytes: one model-sized payload as encoded on the wire; private: DP's third
    payload and its clip indicator; share_momentum: messages carry the momentum too."""
    return comm.Ledger(payload_bytes=payload_bytes,
                       payloads_per_message=STATE_PAYLOADS - (not share_momentum) + private,
                       wire=algorithm.wire,
                       metadata_record_bytes=algorithm.metadata_record_bytes,
                       scalar_bytes=4 if private else 0)  # DP's clip indicator.


def train_flops_per_example(apply_fn, params, sample_input) -> float | None:
    """XLA's count of one example's forward + backward FLOPs (None where it reports none)."""
    import optax

    def loss(p, x, y):
        return optax.softmax_cross_entropy_with_integer_labels(apply_fn(p, x), y).mean()

    labels = jnp.zeros((1,), jnp.int32)
    cost = jax.jit(jax.grad(loss)).lower(params, sample_input[:1], labels).compile()
    cost = cost.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) and cost else cost
    flops = float((cost or {}).get("flops", 0.0))
    return flops if flops > 0 else None


def make_clock(config: Config, algorithm, ledger: comm.Ledger, flops_per_example):
    """The simulated clock of `--network` (None for 'none'). flops_per_example: () -> FLOPs of
    one training example, called only for a trace with a gflops column."""
    wire = comm.get_wire(algorithm.wire)
    if wire.seconds is None:
        raise ConfigError(f"--network={config.network}: the wire {comm.wire_label(algorithm.wire)}"
                          f" of --algorithm={config.algorithm} (--wire={config.wire}) has no "
                          "clock timing (marfl_jax.comm.Wire.seconds); give it one")
    links = network.make_links(config.settings(network.Settings), flops_per_example)
    if links is None:
        return None
    return clock.Clock(
        links=clock.Links(*(jnp.asarray(x) for x in links)), wire=wire,
        message_bytes=float(ledger.payloads_per_message * ledger.payload_bytes
                            + ledger.scalar_bytes),
        distill_message_bytes=float(ledger.payload_bytes),
        server_bps=config.server_mbps * clock.MBIT, timeout_s=config.round_timeout_s,
        examples=config.local_batches * config.batch_size,
        barriers_per_round=algorithm.barriers_per_round)


def format_bytes(n: int) -> str:
    """Human-readable decimal bytes: 1.234 GB."""
    for unit in ("B", "kB", "MB", "GB", "TB", "PB"):
        if n < 1000 or unit == "PB":
            return f"{n} B" if unit == "B" else f"{n:.4g} {unit}"
        n /= 1000
    raise AssertionError


def run(config: Config, workdir: str | None = None) -> RunResult:
    """Runs (or resumes) the experiment described by `config`, writing its outputs to `workdir`
    (default `config.workdir`). Returns the summary, the metrics rows and the final state.

    The run holds the workdir's lock throughout (`workdir.locked`: a second run on it is refused
    at once). A non-finite train loss, evaluation loss or parameter stops it with
    `watch.DivergenceError`, after the row of the iteration that diverged and the summary are
    written. No checkpoint is written then: every checkpoint is saved only after the rows up to
    it were checked, so the latest one on disk (if any) is the last finite state saved. (The
    state before the diverging iteration is not kept: the iteration donates it.)"""
    runtime.prepare_backend(config)  # XLA_FLAGS, before anything may start the backend.
    config.validate()  # Starts no backend (tests/test_runtime.py).
    workdir = workdir or config.workdir
    config = dataclasses.replace(config, workdir=workdir)
    with (runtime.matmul_precision(config),  # What this run traces; the caller's is kept.
          files.locked(workdir) if sharding.is_primary() else contextlib.nullcontext(),
          contextlib.ExitStack() as closing):  # The tracker, closed on an error too.
        start = time.time()
        previous = files.previous_config(config, workdir)
        logging.info("numerics: %s", runtime.describe(config))
        pieces = build(config, workdir, previous)
        progress = resume(pieces, previous)
        start -= progress.elapsed_before
        recorder = Recorder(pieces, progress, start, closing)
        train(pieces, progress, recorder)
        return summarize(pieces, progress, recorder)


class Pieces(NamedTuple):
    """What a run is made of, each built once from its config (`build`)."""

    config: Config
    workdir: str
    plan: plan_lib.Plan
    mesh: Any  # The device mesh over the peer axis, or None on one device.
    sim: Simulation
    assembly: Assembly
    data: DeviceData
    test_images: jax.Array  # (n_test, ...) float32.
    test_labels: jax.Array  # (n_test,) int32.
    abstract_state: FLState  # Shapes only.
    steps: Steps
    evaluate_peers: Any  # Jitted (params (K, ...), images, labels) -> (accuracy, loss) (K,).


class Steps:
    """The compiled iterations of a run, compiled once each for the state's shapes (MKD's
    variant takes lambda as a fourth argument), and the iterations' keys."""

    def __init__(self, sim: Simulation, abstract_state, data: DeviceData, seed: int, mesh):
        self._sim, self._abstract_state, self._data, self._mesh = sim, abstract_state, data, mesh
        self._iteration_key = jax.random.fold_in(jax.random.key(seed), 1)
        self._compiled = {}

    def key_at(self, t: int):
        """Iteration t's key, replicated over the mesh when there is one."""
        key = jax.random.fold_in(self._iteration_key, t)
        if self._mesh is None:
            return key
        return jax.random.wrap_key_data(sharding.replicate(jax.random.key_data(key),
                                                           self._mesh))

    def compiled(self, distilling: bool):
        if distilling not in self._compiled:
            step = jax.jit(make_iteration(self._sim, distilling), donate_argnums=0)
            weight = (jax.ShapeDtypeStruct((), jnp.float32),) if distilling else ()
            self._compiled[distilling] = step.lower(
                sharding.abstract_by_peer(self._abstract_state, self._mesh), self.key_at(0),
                self._data, *weight).compile()
        return self._compiled[distilling]

    def __call__(self, state: FLState, t: int, distillation) -> tuple[FLState, dict, bool]:
        """Runs iteration t: (the new state, its info, whether it distilled)."""
        distilling = distillation is not None and distillation.active(t)
        weight = (np.float32(distillation.weight(t)),) if distilling else ()
        state, info = self.compiled(distilling)(state, self.key_at(t), self._data, *weight)
        return state, info, distilling


def initial_state(pieces: Pieces) -> FLState:
    """Iteration 0's state, every peer from the seed (sharded over the mesh, if any)."""
    config, sim = pieces.config, pieces.sim
    state = init_state(pieces.assembly.model, sim.optimizer, pieces.test_images[:1],
                       config.num_peers, jax.random.fold_in(jax.random.key(config.seed), 0),
                       sim.churn_model, sim.privacy)
    return sharding.shard_peers(state, pieces.mesh)


def build(config: Config, workdir: str, previous) -> Pieces:
    """The data, the plan, the model and the simulation with its ledger and accountant; the
    iteration compiled for the state's shapes, refusing a run that would not fit."""
    dataset, data, test_images, test_labels = load_data(config)
    mesh = sharding.peer_mesh(config.num_peers)  # None on one device.
    if mesh is None and jax.process_count() > 1:
        raise ConfigError(f"--num_peers={config.num_peers} must be divisible by the "
                          f"{jax.device_count()} devices of a multi-process run")
    chosen = execution_plan(config, workdir, previous, dataset.num_classes, test_images[:1],
                            mesh)
    if mesh is not None:
        data = DeviceData(*sharding.replicate((data.x_train, data.y_train), mesh),
                          *sharding.shard_peers((data.table, data.counts), mesh))
        test_images, test_labels = sharding.replicate((test_images, test_labels), mesh)
    assembly = assemble(dataclasses.replace(config, peer_chunk=chosen.peer_chunk),
                        build_model(config, dataset.num_classes, chosen), test_images[:1], mesh)
    sim = assembly.sim
    pieces = Pieces(config, workdir, chosen, mesh, sim, assembly, data, test_images, test_labels,
                    None, None, jax.jit(functools.partial(local.evaluate_peers,
                                                          apply_fn=sim.apply_fn)))
    abstract_state = jax.eval_shape(lambda: initial_state(pieces._replace(mesh=None)))
    pieces = pieces._replace(abstract_state=abstract_state,
                             steps=Steps(sim, abstract_state, data, config.seed, mesh))
    algorithm = sim.algorithm
    logging.info("model %s: %d parameters, payload %d bytes; algorithm %s (%s): %d rounds%s%s",
                 config.model, models.count_params(assembly.one_peer),
                 assembly.ledger.payload_bytes, algorithm.name, algorithm.description,
                 algorithm.num_rounds, ", exact at full participation" if algorithm.exact else "",
                 f"; peers sharded over {mesh.size} devices" if mesh is not None else "")
    estimate = memory.MemoryEstimate(
        memory.tree_nbytes(abstract_state) // (mesh.size if mesh is not None else 1),
        memory.tree_nbytes((data, test_images, test_labels)),
        memory.step_bytes(pieces.steps.compiled(sim.distillation is not None)))
    logging.info("memory estimate: %s", estimate.describe())
    memory.check_fits(estimate, (int(config.memory_limit_gb * memory.GB)
                                 if config.memory_limit_gb else memory.available_bytes()),
                      num_peers=config.num_peers, peer_chunk=sim.peer_chunk)
    return pieces


class Progress:
    """Where the run stands on the host: the state, the next iteration, the ledger's and the
    accountant's totals, the rows so far and the iteration that reached the target."""

    def __init__(self, state: FLState, first_iteration: int, elapsed_before: float, ledger,
                 accountant, metrics: list[dict], target_accuracy: float,
                 checkpoints: files.Checkpoints):
        self.state, self.first_iteration, self.elapsed_before = (state, first_iteration,
                                                                 elapsed_before)
        self.checkpoints = checkpoints
        self.t = first_iteration
        self.ledger, self.accountant, self.metrics = ledger, accountant, metrics
        self.reached_at = next((r["iteration"] for r in metrics
                                if r.get("accuracy", -1.0) >= target_accuracy), None)
        self.diverged: str | None = None  # The message, once a row is not finite.


def resume(pieces: Pieces, previous) -> Progress:
    """Writes the plan and config to the workdir, then restores the last checkpoint and the
    rows before it, if any. (In a multi-process run the first process writes the files; the
    barriers keep the others from reading a file being rewritten.)"""
    config, workdir, assembly = pieces.config, pieces.workdir, pieces.assembly
    sharding.barrier("workdir checked")
    if sharding.is_primary():
        os.makedirs(workdir, exist_ok=True)
        files.write_json(os.path.join(workdir, "plan.json"), pieces.plan._asdict())
        files.write_atomically(os.path.join(workdir, "config.json"), config.to_json())
    sharding.barrier("workdir written")
    checkpoints = files.Checkpoints(os.path.join(workdir, "checkpoints"))
    ledger, accountant = assembly.ledger, assembly.accountant
    if previous is not None and checkpoints.latest() is not None:
        leaves, host = checkpoints.restore(pieces.abstract_state, pieces.mesh)
        state, first_iteration, elapsed = FLState(*leaves), host["iteration"], host["elapsed"]
        ledger = ledger.restore(host["ledger"])
        if accountant is not None:
            accountant = accounting.PrivacyAccountant.from_state(
                config.num_peers, config.dp_noise_multiplier, config.privacy_delta,
                host["privacy"])
        logging.info("resuming %s after iteration %d", workdir, first_iteration - 1)
    else:
        state, first_iteration, elapsed = initial_state(pieces), 0, 0.0
    metrics = files.read_rows(os.path.join(workdir, "metrics.jsonl"), first_iteration)
    sharding.barrier("metrics read")
    return Progress(state, first_iteration, elapsed, ledger, accountant, metrics,
                    config.target_accuracy, checkpoints)


def stage_metrics(info: dict) -> dict:
    """The fields the stages' metrics give a row: every 0-d entry of `info`, converted by type
    (a float, an int or a bool); entries with a peer or round axis are the host's inputs."""
    row = {}
    for name, value in info.items():
        value = np.asarray(value)
        if value.ndim:
            continue
        if np.issubdtype(value.dtype, np.bool_):
            row[name] = bool(value)
        elif np.issubdtype(value.dtype, np.integer):
            row[name] = int(value)
        else:
            row[name] = float(value)
    return row


class Recorder:
    """Iteration rows on the host: the ledger's exact bytes, the stages' metrics, the simulated
    clock's running total and the accountant's budget, appended to metrics.jsonl and the
    trackers (TensorBoard in WORKDIR/tb/, W&B with --wandb_project)."""

    def __init__(self, pieces: Pieces, progress: Progress, start: float,
                 closing: contextlib.ExitStack):
        self.config, self.sim, self.progress, self.start = (pieces.config, pieces.sim, progress,
                                                            start)
        metrics = progress.metrics
        self.sim_elapsed = metrics[-1].get("cumulative_sim_seconds", 0.0) if metrics else 0.0
        primary = sharding.is_primary()
        self.rows = files.Rows(os.path.join(pieces.workdir, "metrics.jsonl"), metrics,
                               write=primary)
        self.tracker = closing.enter_context(tracking.open(
            pieces.config, pieces.workdir, primary, progress.first_iteration))

    def row(self, t: int, info, distilling: bool) -> dict:
        """Iteration t's row from its info (gathered to the host here). The host reads the
        group sizes (the ledger), who took part, whether the parameters stayed finite and, under
        DP, how many peers aggregated (the accountant); every other 0-d entry is a field."""
        info = dict(sharding.to_host(info))
        sizes, present = np.asarray(info["member_sizes"]), np.asarray(info["present"])
        finite, aggregating = info.pop("params_finite"), info.pop("aggregating", None)
        algorithm, progress = self.sim.algorithm, self.progress
        if sizes.max(initial=0) > algorithm.max_group_size:
            raise RuntimeError(f"a group of {sizes.max()} peers exceeds the bound of "
                               f"{algorithm.max_group_size} that the group sums "
                               "(mixing.segment_scan) and MKD's mates table assumed")
        row = {"iteration": t, **progress.ledger.record(sizes, distilled=distilling),
               "present_peers": int(present.sum()),
               "mean_group_size": comm.mean_group_size(sizes), **stage_metrics(info)}
        if not finite:
            row["params_finite"] = False  # Only in a row that diverged.
        if "sim_seconds" in row:
            self.sim_elapsed += row["sim_seconds"]
            row["cumulative_sim_seconds"] = self.sim_elapsed
        if distilling:
            distillation = self.sim.distillation
            row["distill_weight"] = 1.0 if not distillation.blend else distillation.weight(t)
        if progress.accountant is not None:
            progress.accountant.record(int(aggregating))
        if row["present_peers"] == 0 and row["updating_peers"] == 0:
            logging.info("iteration %d: no peer present; nothing trained or exchanged", t)
        row["present"] = present  # Popped before the row is written.
        return row

    def finish(self, row: dict) -> None:
        """Writes a row; stops the run (`progress.diverged`) when it is not finite."""
        row.pop("present")
        row["seconds"] = round(time.time() - self.start, 3)
        self.progress.metrics.append(row)
        self.rows.append(row)
        self.tracker.log(row)
        self.progress.diverged = watch.divergence(row, self.config.learning_rate)

    def close(self) -> None:
        self.rows.close()
        self.tracker.close()


def train(pieces: Pieces, progress: Progress, recorder: Recorder) -> None:
    """The loop: one jitted iteration, then the ledger, evaluation and logging on the host.

    An iteration whose state the host does not need (no evaluation, no checkpoint after it) is
    recorded only after the next one is dispatched, so the device never waits for the host's
    bookkeeping; rows are the same either way."""
    config, steps = pieces.config, pieces.steps
    distillation = pieces.sim.distillation
    loop_start = time.time()
    pending = None  # (t, info, distilling) of an iteration not yet recorded.
    while progress.reached_at is None and progress.t < config.max_iterations:
        t = progress.t
        progress.state, info, distilling = steps(progress.state, t, distillation)
        if pending is not None:
            recorder.finish(recorder.row(*pending))
            pending = None
            if progress.diverged:
                break
        evaluating = t % config.eval_every == 0 or t == config.max_iterations - 1
        checkpointing = config.checkpoint_every and (t + 1) % config.checkpoint_every == 0
        if not (evaluating or checkpointing):
            pending = (t, info, distilling)
            progress.t += 1
            continue
        row = recorder.row(t, info, distilling)
        if evaluating:
            evaluate(pieces, progress, row, t)
        recorder.finish(row)
        if progress.diverged:
            break  # Before any checkpoint of this state.
        progress.t += 1
        if evaluating:
            log_progress(pieces, progress, row, loop_start)
            if row["accuracy"] >= config.target_accuracy:
                progress.reached_at = t
        if progress.reached_at is not None or progress.t == config.max_iterations or checkpointing:
            save_checkpoint(progress, recorder)
    recorder.close()


def evaluate(pieces: Pieces, progress: Progress, row: dict, t: int) -> None:
    """Adds the evaluation's fields (and DP's budget so far) to iteration t's row: over the
    peers that took part, honest ones only when there are attackers."""
    present = row["present"]
    if pieces.sim.adversary is not None:
        present = present & pieces.sim.adversary.honest
    row.update(evaluation.evaluate(pieces.config.settings(evaluation.Settings),
                                   progress.state.params, present, t,
                                   pieces.evaluate_peers, pieces.test_images,
                                   pieces.test_labels))
    if progress.accountant is not None:
        row.update(progress.accountant.epsilons())


def log_progress(pieces: Pieces, progress: Progress, row: dict, loop_start: float) -> None:
    config, t = pieces.config, progress.t
    rate = (t - progress.first_iteration) / max(time.time() - loop_start, 1e-9)
    simulated = ("" if pieces.sim.clock is None else
                 f" | {row['cumulative_sim_seconds'] / 3600:.3g} h simulated")
    logging.info("iteration %d/%d | accuracy %.4f | loss %.4f | %s%s | %.3g it/s | %s", t - 1,
                 config.max_iterations, row["accuracy"], row["loss"],
                 format_bytes(row["cumulative_bytes"]), simulated, rate,
                 watch.progress(t, config.max_iterations, rate, progress.metrics,
                                config.target_accuracy))


def save_checkpoint(progress: Progress, recorder: Recorder) -> None:
    """The state after iteration t - 1 with the host's totals (rows already checked finite)."""
    accountant = progress.accountant
    progress.checkpoints.save(progress.t, progress.state, {
        "iteration": progress.t, "elapsed": time.time() - recorder.start,
        "ledger": progress.ledger.state(),
        **({} if accountant is None else {"privacy": accountant.state()})})


def summarize(pieces: Pieces, progress: Progress, recorder: Recorder) -> RunResult:
    """Writes summary.json; raises `watch.DivergenceError` for a run that diverged."""
    config, metrics, reached_at = pieces.config, progress.metrics, progress.reached_at
    diverged = progress.diverged
    wall_seconds = round(time.time() - recorder.start, 3)
    summary_path = os.path.join(pieces.workdir, "summary.json")
    finished_before = (files.read_json(summary_path)
                       if progress.t == progress.first_iteration and not diverged else None)
    if finished_before is not None:  # Its time is the one it took then, not this restore's.
        wall_seconds = finished_before.get("wall_seconds", wall_seconds)
    evaluated = [r for r in metrics if "accuracy" in r]
    summary = {
        "final_accuracy": evaluated[-1]["accuracy"] if evaluated else None,
        "best_accuracy": max((r["accuracy"] for r in evaluated), default=None),
        "iterations": len(metrics),
        "cumulative_bytes": progress.ledger.cumulative_bytes,
        "reached_target": reached_at is not None,
        "target_accuracy": config.target_accuracy,
        "iteration_reached_target": reached_at,
        "bytes_to_target": (metrics[reached_at]["cumulative_bytes"]
                            if reached_at is not None else None),
        "wall_seconds": wall_seconds,
    }
    if pieces.sim.clock is not None:
        summary.update(cumulative_sim_seconds=recorder.sim_elapsed,
                       sim_seconds_to_target=(metrics[reached_at]["cumulative_sim_seconds"]
                                              if reached_at is not None else None))
    if progress.accountant is not None:
        summary.update(dp_delta=config.privacy_delta, **progress.accountant.epsilons())
    if diverged:
        latest = progress.checkpoints.latest()
        diverged += ("; no checkpoint was saved" if latest is None else
                     f"; the latest checkpoint (after iteration {latest - 1}) holds a finite state")
        summary["diverged"] = diverged
    if sharding.is_primary():
        files.write_json(summary_path, summary)
    if diverged:
        raise watch.DivergenceError(diverged)
    logging.info("done: %s", summary)
    return RunResult(summary, metrics, progress.state)
