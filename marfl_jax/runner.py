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
    algorithms,
    clock,
    comm,
    evaluation,
    local,
    memory,
    models,
    network,
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
SIM_SECONDS = ("sim_seconds", "sim_compute_seconds", "sim_comm_seconds",
               "sim_coordination_seconds")


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


def make_simulation(config: Config, model, mesh=None, *, algorithm=None,
                    clock=None) -> Simulation:
    """The static pieces of the run `config` describes (`algorithm`: the config's, when already
    made; `clock`: the simulated clock, see `assemble`)."""
    codec = codec_lib.CODECS.get(config.codec)
    roundtrip = (None if codec.lossless else
                 functools.partial(codec_lib.roundtrip_tree, codec, block=config.codec_block))
    return Simulation(
        apply_fn=make_apply_fn(model, config.compute_dtype),
        optimizer=local.momentum_sgd(config.learning_rate, config.momentum),
        algorithm=algorithm or algorithms.make_algorithm(config),
        churn_model=config.churn_model(),
        local_batches=config.local_batches, batch_size=config.batch_size,
        model_dropout=models.uses_dropout(model), peer_chunk=config.peer_chunk,
        distillation=config.distillation(), privacy=config.privacy(), mesh=mesh,
        roundtrip=roundtrip, slice_unit=codec.unit(config.codec_block),
        share_momentum=config.share_momentum, aggregator=config.aggregator, clock=clock)


class Assembly(NamedTuple):
    """A run's pieces, each built once from its config (`assemble`)."""

    sim: Simulation
    ledger: comm.Ledger
    accountant: accounting.PrivacyAccountant | None
    one_peer: Any  # One peer's params as ShapeDtypeStructs.


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

    def flops_per_example():  # Only a trace with a gflops column asks.
        params = model.init(jax.random.key(0), sample_input)["params"]
        return train_flops_per_example(make_apply_fn(model, config.compute_dtype), params,
                                       sample_input)

    run_clock = (None if config.network == "none" else
                 make_clock(config, algorithm, ledger, flops_per_example))
    sim = make_simulation(config, model, mesh, algorithm=algorithm, clock=run_clock)
    accountant = None if not private else accounting.PrivacyAccountant(
        config.num_peers, config.dp_noise_multiplier, config.privacy_delta)
    return Assembly(sim, ledger, accountant, one_peer)


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
    chosen = plan_lib.fixed(config)
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
        make_step = plan_lib.local_step_factory(config, build_apply_fn, sample_input, optimizer,
                                                num_classes)
        chosen, _ = plan_lib.choose(
            config, make_step, backend=device.platform, device_kind=device.device_kind,
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
    links = network.make_links(config, flops_per_example)
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
    config.validate()
    runtime.prepare_backend(config)  # XLA_FLAGS, before the backend starts.
    workdir = workdir or config.workdir
    with (runtime.matmul_precision(config),  # What this run traces; the caller's is kept.
          files.locked(workdir) if sharding.is_primary() else contextlib.nullcontext(),
          contextlib.ExitStack() as closing):  # The tracker, closed on an error too.
        return _run(config, workdir, closing)


def _run(config: Config, workdir: str | None, closing: contextlib.ExitStack) -> RunResult:
    workdir = workdir or config.workdir
    config = dataclasses.replace(config, workdir=workdir)
    previous = files.previous_config(config, workdir)
    start = time.time()
    logging.info("numerics: %s", runtime.describe(config))

    # -- Data, the execution plan, model, the simulation's pieces, the initial state's shapes.
    dataset, data, test_images, test_labels = load_data(config)
    mesh = sharding.peer_mesh(config.num_peers)  # None on one device.
    chosen = execution_plan(config, workdir, previous, dataset.num_classes, test_images[:1],
                            mesh)
    model = build_model(config, dataset.num_classes, chosen)
    if mesh is None and jax.process_count() > 1:
        raise ConfigError(f"--num_peers={config.num_peers} must be divisible by the "
                          f"{jax.device_count()} devices of a multi-process run")
    if mesh is not None:
        data = DeviceData(*sharding.replicate((data.x_train, data.y_train), mesh),
                          *sharding.shard_peers((data.table, data.counts), mesh))
        test_images, test_labels = sharding.replicate((test_images, test_labels), mesh)
    sim, ledger, accountant, one_peer = assemble(
        dataclasses.replace(config, peer_chunk=chosen.peer_chunk), model, test_images[:1], mesh)
    root_key = jax.random.key(config.seed)

    def initial_state():
        return init_state(model, sim.optimizer, test_images[:1], config.num_peers,
                          jax.random.fold_in(root_key, 0), sim.churn_model, sim.privacy)

    abstract_state = jax.eval_shape(initial_state)  # Shapes only: nothing allocated yet.
    algorithm = sim.algorithm
    logging.info("model %s: %d parameters, payload %d bytes; algorithm %s (%s): %d rounds%s%s",
                 config.model, models.count_params(one_peer), ledger.payload_bytes,
                 algorithm.name, algorithm.description, algorithm.num_rounds,
                 ", exact at full participation" if algorithm.exact else "",
                 f"; peers sharded over {mesh.size} devices" if mesh is not None else "")

    # -- Compile the iteration for the state's shapes, and refuse a run that would not fit.
    iteration_key = jax.random.fold_in(root_key, 1)

    def key_at(t: int):
        """This iteration's key, replicated over the mesh when there is one."""
        key = jax.random.fold_in(iteration_key, t)
        if mesh is None:
            return key
        return jax.random.wrap_key_data(sharding.replicate(jax.random.key_data(key), mesh))

    compiled = {}

    def compiled_step(distilling: bool):
        """The compiled iteration (MKD's variant takes lambda as a fourth argument)."""
        if distilling not in compiled:
            step = jax.jit(make_iteration(sim, distilling), donate_argnums=0)
            weight = (jax.ShapeDtypeStruct((), jnp.float32),) if distilling else ()
            compiled[distilling] = step.lower(sharding.abstract_by_peer(abstract_state, mesh),
                                              key_at(0), data, *weight).compile()
        return compiled[distilling]

    estimate = memory.MemoryEstimate(
        memory.tree_nbytes(abstract_state) // (mesh.size if mesh is not None else 1),
        memory.tree_nbytes((data, test_images, test_labels)),
        memory.step_bytes(compiled_step(sim.distillation is not None)))
    logging.info("memory estimate: %s", estimate.describe())
    memory.check_fits(estimate, (int(config.memory_limit_gb * memory.GB)
                                 if config.memory_limit_gb else memory.available_bytes()),
                      num_peers=config.num_peers, peer_chunk=sim.peer_chunk)
    evaluate_peers = jax.jit(functools.partial(local.evaluate_peers, apply_fn=sim.apply_fn))

    # -- Resume from the last checkpoint, if any. (In a multi-process run the first process
    #    writes the files; the barriers keep the others from reading a file being rewritten.)
    primary = sharding.is_primary()
    sharding.barrier("workdir checked")
    if primary:
        os.makedirs(workdir, exist_ok=True)
        files.write_json(os.path.join(workdir, "plan.json"), chosen._asdict())
        files.write_atomically(os.path.join(workdir, "config.json"), config.to_json())
    sharding.barrier("workdir written")
    checkpoints = files.Checkpoints(os.path.join(workdir, "checkpoints"))
    first_iteration, elapsed_before = 0, 0.0
    if previous is not None and checkpoints.latest() is not None:
        leaves, host = checkpoints.restore(abstract_state, mesh)
        state = FLState(*leaves)
        first_iteration, elapsed_before = host["iteration"], host["elapsed"]
        ledger = ledger.restore(host["ledger"])
        if accountant is not None:
            accountant = accounting.PrivacyAccountant.from_state(
                config.num_peers, config.dp_noise_multiplier, config.privacy_delta,
                host["privacy"])
        logging.info("resuming %s after iteration %d", workdir, first_iteration - 1)
    else:
        state = sharding.shard_peers(initial_state(), mesh)
    metrics_path = os.path.join(workdir, "metrics.jsonl")
    metrics = files.read_rows(metrics_path, first_iteration)
    reached_at = next((r["iteration"] for r in metrics
                       if r.get("accuracy", -1.0) >= config.target_accuracy), None)
    start -= elapsed_before
    sim_elapsed = [metrics[-1].get("cumulative_sim_seconds", 0.0) if metrics else 0.0]
    sharding.barrier("metrics read")
    rows = files.Rows(metrics_path, metrics, write=primary)
    tracker = closing.enter_context(tracking.open(config, workdir, primary, first_iteration))

    # -- The loop: one jitted iteration, then the ledger, evaluation and logging on the host.
    #    An iteration whose state the host does not need (no evaluation, no checkpoint after
    #    it) is recorded only after the next one is dispatched, so the device never waits for
    #    the host's bookkeeping; rows are the same either way.
    distillation = sim.distillation

    def row_of(t: int, info, distilling: bool) -> dict:
        """Iteration t's row from its info (gathered to the host here)."""
        info = sharding.to_host(info)
        sizes = np.asarray(info["member_sizes"])
        present = np.asarray(info["present"])
        if distilling and sizes.max(initial=0) > algorithm.max_group_size:
            raise RuntimeError(f"a group of {sizes.max()} peers exceeds the bound of "
                               f"{algorithm.max_group_size} that MKD's mates table assumed")
        row = {"iteration": t, **ledger.record(sizes, distilled=distilling)}
        row.update(present_peers=int(present.sum()),
                   updating_peers=int(info["updating_peers"]),
                   mean_group_size=comm.mean_group_size(sizes),
                   train_loss=float(info["train_loss"]),
                   consensus_before=float(info["consensus_before"]),
                   consensus_after=float(info["consensus_after"]))
        if not info["params_finite"]:
            row["params_finite"] = False  # Only in a row that diverged.
        if sim.clock is not None:
            row.update({name: float(info[name]) for name in SIM_SECONDS})
            row["stragglers"] = int(info["stragglers"])
            sim_elapsed[0] += row["sim_seconds"]
            row["cumulative_sim_seconds"] = sim_elapsed[0]
        if distilling:
            row["distill_weight"] = 1.0 if not distillation.blend else distillation.weight(t)
            row.update({name: float(info[name]) for name in (
                "distilled_peers", "distill_teachers", "distill_kl", "distill_loss")})
        if accountant is not None:
            accountant.record(int(info["aggregating"]))
            row.update({name: float(info[name]) for name in (
                "dp_clip", "dp_unclipped", "dp_update_norm")})
            row["dp_split_peers"] = int(info["dp_split_peers"])
        if row["present_peers"] == 0 and row["updating_peers"] == 0:
            logging.info("iteration %d: no peer present; nothing trained or exchanged", t)
        row["present"] = present  # Popped before the row is written.
        return row

    def finish(row: dict) -> None:
        row.pop("present")
        row["seconds"] = round(time.time() - start, 3)
        metrics.append(row)
        rows.append(row)
        tracker.log(row)  # TensorBoard (WORKDIR/tb/), W&B with --wandb_project.

    t = first_iteration
    loop_start = time.time()
    pending = None  # (t, info, distilling) of an iteration not yet recorded.
    diverged = None  # The message, once a row holds a non-finite loss or parameter.
    while reached_at is None and t < config.max_iterations:
        distilling = distillation is not None and distillation.active(t)
        weight = (np.float32(distillation.weight(t)),) if distilling else ()
        state, info = compiled_step(distilling)(state, key_at(t), data, *weight)
        if pending is not None:
            finish(row := row_of(*pending))
            pending = None
            if diverged := watch.divergence(row, config.learning_rate):
                break
        evaluating = t % config.eval_every == 0 or t == config.max_iterations - 1
        checkpointing = config.checkpoint_every and (t + 1) % config.checkpoint_every == 0
        if not (evaluating or checkpointing):
            pending = (t, info, distilling)
            t += 1
            continue
        row = row_of(t, info, distilling)
        if evaluating:
            row.update(evaluation.evaluate(config, state.params, row["present"], t,
                                           evaluate_peers, test_images, test_labels))
            if accountant is not None:
                row.update(accountant.epsilons())
        finish(row)
        if diverged := watch.divergence(row, config.learning_rate):
            break  # Before any checkpoint of this state.
        t += 1
        if evaluating:
            rate = (t - first_iteration) / max(time.time() - loop_start, 1e-9)
            simulated = ("" if sim.clock is None else
                         f" | {row['cumulative_sim_seconds'] / 3600:.3g} h simulated")
            logging.info("iteration %d/%d | accuracy %.4f | loss %.4f | %s%s | %.3g it/s | "
                         "%s", t - 1, config.max_iterations, row["accuracy"], row["loss"],
                         format_bytes(row["cumulative_bytes"]), simulated, rate,
                         watch.progress(t, config.max_iterations, rate, metrics,
                                        config.target_accuracy))
            if row["accuracy"] >= config.target_accuracy:
                reached_at = t - 1
        done = reached_at is not None or t == config.max_iterations
        if done or checkpointing:
            checkpoints.save(t, state, {
                "iteration": t, "elapsed": time.time() - start,
                "ledger": ledger.state(),
                **({} if accountant is None else {"privacy": accountant.state()})})
    rows.close()
    tracker.close()

    # -- The summary.
    wall_seconds = round(time.time() - start, 3)
    summary_path = os.path.join(workdir, "summary.json")
    finished_before = (files.read_json(summary_path) if t == first_iteration and not diverged
                       else None)
    if finished_before is not None:  # Its time is the one it took then, not this restore's.
        wall_seconds = finished_before.get("wall_seconds", wall_seconds)
    evaluated = [r for r in metrics if "accuracy" in r]
    summary = {
        "final_accuracy": evaluated[-1]["accuracy"] if evaluated else None,
        "best_accuracy": max((r["accuracy"] for r in evaluated), default=None),
        "iterations": len(metrics),
        "cumulative_bytes": ledger.cumulative_bytes,
        "reached_target": reached_at is not None,
        "target_accuracy": config.target_accuracy,
        "iteration_reached_target": reached_at,
        "bytes_to_target": (metrics[reached_at]["cumulative_bytes"]
                            if reached_at is not None else None),
        "wall_seconds": wall_seconds,
    }
    if sim.clock is not None:
        summary.update(cumulative_sim_seconds=sim_elapsed[0],
                       sim_seconds_to_target=(metrics[reached_at]["cumulative_sim_seconds"]
                                              if reached_at is not None else None))
    if accountant is not None:
        summary.update(dp_delta=config.privacy_delta, **accountant.epsilons())
    if diverged:
        latest = checkpoints.latest()
        diverged += ("; no checkpoint was saved" if latest is None else
                     f"; the latest checkpoint (after iteration {latest - 1}) holds a finite state")
        summary["diverged"] = diverged
    if primary:
        files.write_json(summary_path, summary)
    if diverged:
        raise watch.DivergenceError(diverged)
    logging.info("done: %s", summary)
    return RunResult(summary, metrics, state)
