"""One federated-learning run: data -> partition -> init -> iterate -> evaluate -> log.

`run(config, workdir)` is the single entry point shared by `launch/train.py`, the notebooks and
the tests. It owns all I/O; everything it calls is pure. Outputs in the workdir:
`config.json`, `metrics.jsonl` (one row per iteration; evaluation rows add `accuracy`, `loss`),
`summary.json`, and `checkpoints/` (orbax). Rerunning the same config with the same workdir
resumes from the last checkpoint and rewrites the rows after it identically (every random draw
is a function of the seed and the iteration); a workdir holding another config is refused.
"""

from __future__ import annotations

import dataclasses
import functools
import json
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
    churn,
    comm,
    dp,
    local,
    memory,
    mixing,
    mkd,
    models,
    sharding,
)
from marfl_jax import data as data_lib
from marfl_jax.config import Config, ConfigError

# Fields that may change between a run and its resumption (they do not change the trajectory).
RESUMABLE_CHANGES = ("max_iterations", "checkpoint_every", "workdir", "peer_chunk",
                     "memory_limit_gb")


class FLState(NamedTuple):
    """Every peer's model and optimizer state (leaves with leading peer axis N), whether each
    peer is available (Markov churn), (N,) bool, and under DP each peer's `dp.PrivacyState`."""

    params: Any
    opt_state: Any
    available: jax.Array
    privacy: dp.PrivacyState | None = None


class DeviceData(NamedTuple):
    """The shared training array and the peers' index tables, resident on the device."""

    x_train: jax.Array  # (n_train, 28, 28) uint8 images or (n_train, D) float32 features.
    y_train: jax.Array  # (n_train,) int32.
    table: jax.Array  # (N, L) int32 indices into the training array.
    counts: jax.Array  # (N,) int32 valid entries per row.


class RunResult(NamedTuple):
    summary: dict
    metrics: list[dict]
    state: FLState | None = None  # The final state (peer axis first).


def fl_iteration(state: FLState, key: jax.Array, data: DeviceData,
                 distill_weight: jax.Array | None = None, *, algorithm,
                 churn_model: churn.ChurnModel, apply_fn, optimizer, local_batches: int,
                 batch_size: int, distillation: mkd.Distillation | None = None,
                 privacy: dp.Privacy | None = None, model_dropout: bool = False,
                 peer_chunk: int = 0, mesh=None):
    """One FL iteration for all peers: participation, local SGD, (DP,) (MKD,) the mixing rounds.

    Args:
      state: FLState with peer axis N.
      key: this iteration's PRNG key.
      data: DeviceData.
      distill_weight: None for a plain iteration; in an MKD iteration, lambda (a scalar), and
        `distillation` gives MKD's settings.
      privacy: DP's settings, or None (then state.privacy is None too).
      model_dropout: whether the model trains with dropout: then every peer gets its own dropout
        keys (apply_fn(params, x, rng) in training mode).
      peer_chunk: local training in sequential chunks of this many peers (0 = all at once).
      mesh: the device mesh the peer axis is sharded over (`marfl_jax.sharding`), or None.
    Returns:
      (new state, info): info holds `member_sizes` (G, N) int32 (each peer's group size per
      round, 0 = absent), `present` (N,) bool (took part in any round), and scalars
      `updating_peers`, `train_loss`, `consensus_before`, `consensus_after`; MKD iterations add
      `distilled_peers`, `distill_teachers`, `distill_kl`, `distill_loss` (means over rounds);
      DP adds `aggregating` (n), `dp_clip` (mean S before the update), `dp_unclipped` (fraction
      of unclipped updates) and `dp_update_norm` (mean norm before clipping), over aggregators.
    """
    num_peers = data.counts.shape[0]
    sample_key, mixing_key, churn_key, availability_key = jax.random.split(key, 4)

    # -- Who takes part: availability, trainers, each round's aggregators.
    available = churn.next_availability(availability_key, state.available, churn_model)
    part = churn.draw_participation(churn_key, available, algorithm.num_rounds, churn_model)
    updating = part.updating & (data.counts > 0)
    present = part.present.any(axis=0)

    # -- Local update: b mini-batches of size B per peer, drawn without replacement.
    peer_keys = jax.random.split(sample_key, num_peers)
    index = data_lib.sample_peer_batches(peer_keys, data.table, data.counts, local_batches,
                                         batch_size)
    images = data_lib.preprocess(data.x_train[index])
    labels = data.y_train[index]
    dropout_keys = (jax.random.split(jax.random.fold_in(key, 7), (2, num_peers)) if model_dropout
                    else (None, None))
    params, opt_state, losses = local.peers_local_sgd(
        state.params, state.opt_state, images, labels, updating, dropout_keys[0],
        apply_fn=apply_fn, optimizer=optimizer, peer_chunk=peer_chunk)

    # -- DP: each aggregating peer clips and noises its update since its reference model.
    aggregating = part.present[0]  # Presence only ends within an iteration: round 0 has all.
    privacy_state, extra_info = state.privacy, {}
    if privacy is not None:
        num_aggregating = aggregating.sum()
        noise_key, clip_key = jax.random.split(jax.random.fold_in(key, 6))
        noised, indicator, norms = dp.privatize(noise_key, params, privacy_state,
                                                num_aggregating, privacy)
        if distill_weight is not None:  # MKD teaches with the noised model (the authors).
            params = dp.where_peers(aggregating, dp.apply_delta(
                privacy_state.reference, noised, privacy.server_lr), params)

    # -- MKD: a pass over this iteration's groups distilling from mates' weights (t < K).
    schedule = algorithm.schedule(part.present, mixing_key)
    if distill_weight is not None:
        params, opt_state, extra_info = _distill_rounds(
            params, opt_state, schedule, jax.random.fold_in(key, 5), data, distill_weight,
            distillation=distillation, algorithm=algorithm, apply_fn=apply_fn,
            optimizer=optimizer, batch_size=batch_size, dropout_keys=dropout_keys[1])

    # -- Aggregation: weights and momentum (under DP also s and b) averaged over the same
    #    groups, round by round.
    if privacy is None:
        consensus_before = mixing.consensus_distance(params, present)
        params, opt_state = mixing.mix((params, opt_state), schedule, algorithm.num_groups)
    else:
        if distill_weight is not None:  # The post-MKD difference, neither clipped nor noised.
            noised = jax.tree.map(jnp.subtract, params, privacy_state.reference)
        params, opt_state, privacy_state, consensus_before, dp_info = _private_aggregation(
            params, opt_state, privacy_state, noised, indicator, norms, aggregating, present,
            schedule, clip_key, privacy=privacy, num_groups=algorithm.num_groups)
        extra_info.update(dp_info)

    info = {
        **extra_info,
        "member_sizes": comm.member_sizes(schedule, algorithm.num_groups),
        "present": present,
        "updating_peers": updating.sum(),
        "train_loss": losses.sum() / jnp.maximum(updating.sum(), 1),
        "consensus_before": consensus_before,
        "consensus_after": mixing.consensus_distance(params, present),
    }
    new_state = FLState(params, opt_state, available, privacy_state)
    return sharding.constrain_peers(new_state, mesh), info


def _private_aggregation(params, opt_state, privacy_state: dp.PrivacyState, update, indicator,
                         norms, aggregating, present, schedule, key, *, privacy: dp.Privacy,
                         num_groups: int):
    """DP's steps 2-4 (see `marfl_jax.dp`): smooth the (noised) update, share theta_ref + eta_s*s,
    average models, momentum, s and the indicators over the schedule's groups, move each
    aggregating peer's clip threshold; the averaged model becomes its reference.

    Returns:
      (params, opt_state, privacy_state, consensus before averaging, info scalars).
    """
    reference = privacy_state.reference
    smoothed = dp.where_peers(aggregating, dp.smooth(
        privacy_state.smoothed, update, privacy.server_momentum), privacy_state.smoothed)
    shared = dp.where_peers(aggregating, dp.apply_delta(reference, smoothed, privacy.server_lr),
                            params)
    consensus_before = mixing.consensus_distance(shared, present)
    shared, opt_state, smoothed, mean_indicator = mixing.mix(
        (shared, opt_state, smoothed, indicator), schedule, num_groups)
    num_aggregating = aggregating.sum()
    clip = jnp.where(aggregating, dp.update_clip(key, privacy_state.clip, mean_indicator,
                                                 num_aggregating, privacy), privacy_state.clip)
    new_state = dp.PrivacyState(dp.where_peers(aggregating, shared, reference), smoothed, clip)
    count = jnp.maximum(num_aggregating, 1)
    info = {"aggregating": num_aggregating,
            "dp_clip": jnp.where(aggregating, privacy_state.clip, 0).sum() / count,
            "dp_unclipped": jnp.where(aggregating, indicator, 0).sum() / count,
            "dp_update_norm": jnp.where(aggregating, norms, 0).sum() / count}
    return (dp.where_peers(aggregating, shared, params), opt_state, new_state, consensus_before,
            info)


def _distill_rounds(params, opt_state, schedule, key, data: DeviceData, weight, *, distillation,
                    algorithm, apply_fn, optimizer, batch_size, dropout_keys=None):
    """MKD over the rounds of `schedule` (G, N); each round draws fresh distillation batches from
    every peer's data (the authors re-shuffle their loader on each call). Peers without data
    still teach but do not learn."""
    num_peers = data.counts.shape[0]
    if algorithm.max_group_size < 2:  # Nobody ever has a mate.
        zero = jnp.float32(0.0)
        return params, opt_state, {"distilled_peers": zero, "distill_teachers": zero,
                                   "distill_kl": zero, "distill_loss": zero}
    stats = []
    for r, group_ids in enumerate(schedule):
        peer_keys = jax.random.split(jax.random.fold_in(key, r), num_peers)
        index = data_lib.sample_peer_batches(peer_keys, data.table, data.counts,
                                             distillation.batches, batch_size)
        params, opt_state, round_stats = mkd.distill_round(
            params, opt_state, group_ids, data_lib.preprocess(data.x_train[index]),
            data.y_train[index], weight, distillation=distillation,
            num_groups=algorithm.num_groups, max_mates=algorithm.max_group_size - 1,
            apply_fn=apply_fn, optimizer=optimizer, learners=data.counts > 0,
            keys=None if dropout_keys is None else jax.vmap(
                lambda k, r=r: jax.random.fold_in(k, r))(dropout_keys))
        stats.append(round_stats)
    distilled = jnp.stack([s.distilled for s in stats])  # (G, N)
    count = jnp.maximum(distilled.sum(), 1)

    def mean_over_distilled(values):
        return jnp.where(distilled, jnp.stack(values), 0).sum() / count

    return params, opt_state, {
        "distilled_peers": distilled.sum(axis=1).mean(),
        "distill_teachers": mean_over_distilled([s.teachers for s in stats]),
        "distill_kl": mean_over_distilled([s.teacher_kl for s in stats]),
        "distill_loss": mean_over_distilled([s.loss for s in stats]),
    }


def init_state(model, optimizer, sample_input: jax.Array, num_peers: int, key,
               churn_model: churn.ChurnModel, privacy: dp.Privacy | None = None) -> FLState:
    """Every peer starts from the same initial model (as the authors' seeded processes do)."""
    model_key, availability_key = jax.random.split(key)
    params = model.init(model_key, sample_input)["params"]
    opt_state = optimizer.init(params)
    stack = functools.partial(jax.tree.map, lambda x: jnp.broadcast_to(x, (num_peers,) + x.shape))
    params = stack(params)
    return FLState(params, stack(opt_state),
                   churn.initial_availability(availability_key, num_peers, churn_model),
                   None if privacy is None else dp.init_state(params, privacy.initial_clip))


def select_eval_peers(config: Config, present: np.ndarray, iteration: int) -> np.ndarray | None:
    """Indices of the peers evaluated at `iteration`: all present peers, or a seeded sample of
    `eval_peers` of them (every peer when none is present). None means the consensus (mean)
    model of the present peers."""
    if config.eval_peers == "mean":
        return None
    candidates = np.flatnonzero(present)
    if candidates.size == 0:
        candidates = np.arange(present.size)
    k = config.eval_peer_count
    if k is None or k >= candidates.size:
        return candidates
    rng = np.random.default_rng([config.seed, 1, iteration])
    return np.sort(rng.choice(candidates, size=k, replace=False))


def run(config: Config, workdir: str | None = None) -> RunResult:
    """Runs (or resumes) the experiment described by `config`, writing its outputs to `workdir`
    (default `config.workdir`). Returns the summary and the metrics rows."""
    config.validate()
    workdir = workdir or config.workdir
    config = dataclasses.replace(config, workdir=workdir)
    previous = _check_workdir(config, workdir)
    start = time.time()

    # -- Data and partition.
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
    test_images = data_lib.preprocess(jnp.asarray(dataset.x_test))
    test_labels = jnp.asarray(dataset.y_test, jnp.int32)
    logging.info("data: %s; %d train / %d test examples; %d peers hold %d-%d examples",
                 dataset.source, len(dataset.y_train), len(dataset.y_test), config.num_peers,
                 peer_index.counts.min(), peer_index.counts.max())

    # -- Model, optimizer, algorithm, initial state.
    model_kwargs = {"conv_impl": config.conv_impl} if config.conv_impl else {}
    model = models.get_model(config.model, dataset.num_classes, **model_kwargs)

    model_dropout = models.uses_dropout(model)

    def apply_fn(params, x, rng=None):
        """rng None: evaluation mode; a key: training mode (dropout on)."""
        if rng is None or not model_dropout:
            return model.apply({"params": params}, x)
        return model.apply({"params": params}, x, train=True, rngs={"dropout": rng})

    optimizer = local.momentum_sgd(config.learning_rate, config.momentum)
    algorithm = algorithms.make_algorithm(config)
    churn_model = config.churn_model()
    distillation = config.distillation()
    privacy = config.privacy()
    root_key = jax.random.key(config.seed)
    mesh = sharding.peer_mesh(config.num_peers)  # None on one device.
    if mesh is None and jax.process_count() > 1:
        raise ConfigError(f"--num_peers={config.num_peers} must be divisible by the "
                          f"{jax.device_count()} devices of a multi-process run")
    if mesh is not None:
        data = DeviceData(*sharding.replicate((data.x_train, data.y_train), mesh),
                          *sharding.shard_peers((data.table, data.counts), mesh))
        test_images, test_labels = sharding.replicate((test_images, test_labels), mesh)

    def initial_state():
        return init_state(model, optimizer, test_images[:1], config.num_peers,
                          jax.random.fold_in(root_key, 0), churn_model, privacy)

    abstract_state = jax.eval_shape(initial_state)  # Shapes only: nothing allocated yet.
    one_peer = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape[1:], x.dtype),
                            abstract_state.params)
    ledger = comm.Ledger(payload_bytes=comm.tree_bytes(one_peer),
                         # DP also averages the smoothed update s.
                         payloads_per_message=algorithm.payloads_per_message + bool(privacy),
                         wire=algorithm.wire,
                         metadata_record_bytes=(comm.DHT_RECORD_BYTES
                                                if algorithm.name == "marfl" else 0),
                         scalar_bytes=4 if privacy is not None else 0)
    accountant = None if privacy is None else accounting.PrivacyAccountant(
        config.num_peers, config.dp_noise_multiplier, config.privacy_delta)
    logging.info("model %s: %d parameters, payload %d bytes; algorithm %s (%s): %d rounds%s",
                 config.model, models.count_params(one_peer), ledger.payload_bytes,
                 algorithm.name, algorithm.description, algorithm.num_rounds,
                 f"; peers sharded over {mesh.size} devices" if mesh is not None else "")

    # -- Compile the iteration for the state's shapes, and refuse a run that would not fit.
    def key_at(t: int):
        """This iteration's key, replicated over the mesh when there is one."""
        key = jax.random.fold_in(iteration_key, t)
        if mesh is None:
            return key
        return jax.random.wrap_key_data(sharding.replicate(jax.random.key_data(key), mesh))

    step = jax.jit(functools.partial(
        fl_iteration, algorithm=algorithm, churn_model=churn_model, apply_fn=apply_fn,
        optimizer=optimizer, local_batches=config.local_batches, batch_size=config.batch_size,
        distillation=distillation, privacy=privacy, model_dropout=model_dropout,
        peer_chunk=config.peer_chunk, mesh=mesh), donate_argnums=0)
    iteration_key = jax.random.fold_in(root_key, 1)
    compiled = {}

    def compiled_step(distilling: bool):
        """The compiled iteration (MKD's variant takes lambda as a fourth argument)."""
        if distilling not in compiled:
            weight = (jax.ShapeDtypeStruct((), jnp.float32),) if distilling else ()
            compiled[distilling] = step.lower(sharding.abstract_by_peer(abstract_state, mesh),
                                              key_at(0), data, *weight).compile()
        return compiled[distilling]

    estimate = memory.MemoryEstimate(
        memory.tree_nbytes(abstract_state),
        memory.tree_nbytes((data, test_images, test_labels)),
        memory.step_bytes(compiled_step(distillation is not None)))
    logging.info("memory estimate: %s", estimate.describe())
    memory.check_fits(estimate, (int(config.memory_limit_gb * memory.GB)
                                 if config.memory_limit_gb else memory.available_bytes()),
                      num_peers=config.num_peers, peer_chunk=config.peer_chunk)
    evaluate = jax.jit(functools.partial(local.evaluate_peers, apply_fn=apply_fn))

    # -- Resume from the last checkpoint, if any. (In a multi-process run the first process
    #    writes the files; the barriers keep the others from reading a file being rewritten.)
    primary = sharding.is_primary()
    sharding.barrier("workdir checked")
    if primary:
        os.makedirs(workdir, exist_ok=True)
        with open(os.path.join(workdir, "config.json"), "w") as f:
            f.write(config.to_json())
    sharding.barrier("workdir written")
    checkpoints = _Checkpoints(os.path.join(workdir, "checkpoints"))
    first_iteration, elapsed_before = 0, 0.0
    if previous is not None and checkpoints.latest() is not None:
        state, host = checkpoints.restore(abstract_state, mesh)
        first_iteration, elapsed_before = host["iteration"], host["elapsed"]
        for name, value in host["ledger"].items():
            setattr(ledger, name, value)
        if accountant is not None:
            accountant = accounting.PrivacyAccountant.from_state(
                config.num_peers, config.dp_noise_multiplier, config.privacy_delta,
                host["privacy"])
        logging.info("resuming %s after iteration %d", workdir, first_iteration - 1)
    else:
        state = sharding.shard_peers(initial_state(), mesh)
    metrics = _read_rows(os.path.join(workdir, "metrics.jsonl"), first_iteration)
    evaluated = [r for r in metrics if "accuracy" in r]
    reached_at = next((r["iteration"] for r in evaluated
                       if r["accuracy"] >= config.target_accuracy), None)
    start -= elapsed_before
    sharding.barrier("metrics read")

    # -- The loop: one jitted iteration, then the ledger, evaluation and logging on the host.
    metrics_path = os.path.join(workdir, "metrics.jsonl") if primary else os.devnull
    with open(metrics_path, "w") as metrics_file:
        for row in metrics:
            metrics_file.write(json.dumps(row) + "\n")
        t = first_iteration
        while reached_at is None and t < config.max_iterations:
            distilling = distillation is not None and distillation.active(t)
            weight = (np.float32(distillation.weight(t)),) if distilling else ()
            state, info = compiled_step(distilling)(state, key_at(t), data, *weight)
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
            if distilling:
                row["distill_weight"] = (1.0 if not distillation.blend
                                         else distillation.weight(t))
                row.update({name: float(info[name]) for name in (
                    "distilled_peers", "distill_teachers", "distill_kl", "distill_loss")})
            if accountant is not None:
                accountant.record(int(info["aggregating"]))
                row.update({name: float(info[name]) for name in (
                    "dp_clip", "dp_unclipped", "dp_update_norm")})
            if row["present_peers"] == 0 and row["updating_peers"] == 0:
                logging.info("iteration %d: no peer present; nothing trained or exchanged", t)
            if t % config.eval_every == 0 or t == config.max_iterations - 1:
                row.update(_evaluate(config, state, present, t, evaluate, test_images,
                                     test_labels))
                if accountant is not None:
                    row.update(accountant.epsilons())
            row["seconds"] = round(time.time() - start, 3)
            metrics.append(row)
            metrics_file.write(json.dumps(row) + "\n")
            metrics_file.flush()
            if "accuracy" in row:
                logging.info("iteration %4d | accuracy %.4f | loss %.4f | %s | %.1f s", t,
                             row["accuracy"], row["loss"],
                             format_bytes(row["cumulative_bytes"]), row["seconds"])
                if row["accuracy"] >= config.target_accuracy:
                    reached_at = t
            t += 1
            done = reached_at is not None or t == config.max_iterations
            if done or (config.checkpoint_every and t % config.checkpoint_every == 0):
                checkpoints.save(t, state, {
                    "iteration": t, "elapsed": time.time() - start,
                    "ledger": {k: getattr(ledger, k) for k in (
                        "cumulative_bytes", "cumulative_payloads", "cumulative_messages",
                        "cumulative_metadata_bytes")},
                    **({} if accountant is None else {"privacy": accountant.state()})})

    wall_seconds = round(time.time() - start, 3)
    summary_path = os.path.join(workdir, "summary.json")
    if t == first_iteration and os.path.exists(summary_path):
        # Finished before this call: its time is the one it took then, not this restore's.
        with open(summary_path) as f:
            wall_seconds = json.load(f).get("wall_seconds", wall_seconds)
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
    if accountant is not None:
        summary.update(dp_delta=config.privacy_delta, **accountant.epsilons())
    if primary:
        with open(summary_path, "w") as f:
            json.dump(summary, f, indent=2)
    logging.info("done: %s", json.dumps(summary))
    return RunResult(summary, metrics, state)


def _check_workdir(config: Config, workdir: str) -> Config | None:
    """The config of the run already in workdir (None if empty); refuses a different run."""
    path = os.path.join(workdir, "config.json")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        previous = Config.from_dict(json.load(f))
    differences = [f.name for f in dataclasses.fields(Config)
                   if f.name not in RESUMABLE_CHANGES
                   and getattr(previous, f.name) != getattr(config, f.name)]
    if differences:
        raise ConfigError(
            f"--workdir={workdir} holds a run with a different config (differs in: "
            f"{', '.join('--' + d for d in differences)}); use another --workdir or delete it")
    return previous


def _read_rows(path: str, before: int) -> list[dict]:
    """Rows of metrics.jsonl for iterations < before (a torn last line is dropped)."""
    rows = []
    if before and os.path.exists(path):
        with open(path) as f:
            for line in f:
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    break
                if row["iteration"] < before:
                    rows.append(row)
    return rows


class _Checkpoints:
    """The latest FLState plus host-side JSON (ledger, iteration), saved with orbax."""

    def __init__(self, directory: str):
        import orbax.checkpoint as ocp  # Deferred: a heavy import only runs need.

        self._ocp = ocp
        self._manager = ocp.CheckpointManager(
            os.path.abspath(directory),
            options=ocp.CheckpointManagerOptions(max_to_keep=1, enable_async_checkpointing=False))

    def latest(self) -> int | None:
        return self._manager.latest_step()

    def save(self, iteration: int, state: FLState, host: dict) -> None:
        args = self._ocp.args
        self._manager.save(iteration, args=args.Composite(
            state=args.StandardSave(state), host=args.JsonSave(host)), force=True)
        self._manager.wait_until_finished()

    def restore(self, abstract: FLState, mesh=None) -> tuple[FLState, dict]:
        """The latest state, placed as `sharding.shard_peers` would (one device without mesh)."""
        args = self._ocp.args
        placement = (sharding.by_peer(mesh) if mesh is not None
                     else jax.sharding.SingleDeviceSharding(jax.devices()[0]))
        abstract = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=placement), abstract)
        restored = self._manager.restore(self.latest(), args=args.Composite(
            state=args.StandardRestore(abstract), host=args.JsonRestore()))
        return FLState(*restored["state"]), restored["host"]


def _evaluate(config, state, present, iteration, evaluate, test_images, test_labels) -> dict:
    peers = select_eval_peers(config, present, iteration)
    if peers is None:
        weights = present.astype(np.float32) / max(int(present.sum()), 1)
        if not present.any():
            weights = np.full(present.shape, 1.0 / present.size, np.float32)
        params = jax.tree.map(lambda x: jnp.tensordot(weights, x, axes=1)[None], state.params)
    else:
        params = jax.tree.map(lambda x: x[np.asarray(peers)], state.params)
    accuracy, loss = sharding.to_host(evaluate(params, test_images, test_labels))
    accuracy, loss = np.asarray(accuracy), np.asarray(loss)
    return {"accuracy": float(accuracy.mean()), "loss": float(loss.mean()),
            "accuracy_std": float(accuracy.std()), "accuracy_min": float(accuracy.min()),
            "accuracy_max": float(accuracy.max()), "evaluated_peers": int(accuracy.size)}


def format_bytes(n: int) -> str:
    """Human-readable decimal bytes: 1.234 GB."""
    for unit in ("B", "kB", "MB", "GB", "TB", "PB"):
        if n < 1000 or unit == "PB":
            return f"{n} B" if unit == "B" else f"{n:.4g} {unit}"
        n /= 1000
    raise AssertionError
