"""One federated-learning run: data -> partition -> init -> iterate -> evaluate -> log.

`run(config, workdir)` is the single entry point shared by `launch/train.py`, the notebooks and
the tests. It owns all I/O; everything it calls is pure. Outputs in the workdir:
`config.json`, `metrics.jsonl` (one row per iteration; evaluation rows add `accuracy`, `loss`),
`summary.json`.
"""

from __future__ import annotations

import functools
import json
import os
import time
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from marfl_jax import algorithms, comm, local, mixing, models
from marfl_jax import data as data_lib
from marfl_jax.config import Config


class FLState(NamedTuple):
    """Every peer's model and optimizer state, leaves with leading peer axis N."""

    params: Any
    opt_state: Any


class DeviceData(NamedTuple):
    """The shared training array and the peers' index tables, resident on the device."""

    x_train: jax.Array  # (n_train, 28, 28) uint8.
    y_train: jax.Array  # (n_train,) int32.
    table: jax.Array  # (N, L) int32 indices into the training array.
    counts: jax.Array  # (N,) int32 valid entries per row.


class RunResult(NamedTuple):
    summary: dict
    metrics: list[dict]


def fl_iteration(state: FLState, key: jax.Array, data: DeviceData, *, algorithm,
                 apply_fn, optimizer, local_batches: int, batch_size: int):
    """One FL iteration for all peers: local SGD, then the algorithm's mixing rounds.

    Args:
      state: FLState with peer axis N.
      key: this iteration's PRNG key.
      data: DeviceData.
    Returns:
      (new state, info) where info holds `member_sizes` (G, N) int32 (each peer's group size
      per round, 0 = absent) and scalars `present_peers`, `train_loss`.
    """
    num_peers = data.counts.shape[0]
    sample_key, mixing_key = jax.random.split(key)
    # Participation (full for now; churn plugs in here).
    present = jnp.ones(num_peers, bool)
    updating = present & (data.counts > 0)

    # -- Local update: b mini-batches of size B per peer, drawn without replacement.
    peer_keys = jax.random.split(sample_key, num_peers)
    index = data_lib.sample_peer_batches(peer_keys, data.table, data.counts, local_batches,
                                         batch_size)
    images = data_lib.preprocess_images(data.x_train[index])
    labels = data.y_train[index]
    params, opt_state, losses = local.peers_local_sgd(
        state.params, state.opt_state, images, labels, updating, apply_fn=apply_fn,
        optimizer=optimizer)

    # -- Aggregation: weights and momentum averaged over the same groups, round by round.
    schedule = algorithm.schedule(present, mixing_key)
    params, opt_state = mixing.mix((params, opt_state), schedule, algorithm.num_groups)

    info = {
        "member_sizes": comm.member_sizes(schedule, algorithm.num_groups),
        "present_peers": present.sum(),
        "train_loss": losses.sum() / jnp.maximum(updating.sum(), 1),
    }
    return FLState(params, opt_state), info


def init_state(model, optimizer, sample_input: jax.Array, num_peers: int, key) -> FLState:
    """Every peer starts from the same initial model (as the authors' seeded processes do)."""
    params = model.init(key, sample_input)["params"]
    opt_state = optimizer.init(params)
    stack = functools.partial(jax.tree.map, lambda x: jnp.broadcast_to(x, (num_peers,) + x.shape))
    return FLState(stack(params), stack(opt_state))


def select_eval_peers(config: Config, present: np.ndarray, iteration: int) -> np.ndarray | None:
    """Indices of the peers evaluated at `iteration`: all present peers, or a seeded sample of
    `eval_peers` of them. None means the consensus (mean) model."""
    if config.eval_peers == "mean":
        return None
    candidates = np.flatnonzero(present)
    k = config.eval_peer_count
    if k is None or k >= candidates.size:
        return candidates
    rng = np.random.default_rng([config.seed, 1, iteration])
    return np.sort(rng.choice(candidates, size=k, replace=False))


def run(config: Config, workdir: str | None = None) -> RunResult:
    """Runs the experiment described by `config`, writing its outputs to `workdir`
    (default `config.workdir`). Returns the summary and the metrics rows."""
    config.validate()
    workdir = workdir or config.workdir
    start = time.time()

    # -- Data and partition.
    dataset = data_lib.load_dataset(config.dataset, config.data_dir or None)
    peer_index = data_lib.partition(dataset.y_train, config.num_peers, config.partition,
                                    config.dirichlet_alpha, config.seed)
    data = DeviceData(jnp.asarray(dataset.x_train), jnp.asarray(dataset.y_train, jnp.int32),
                      jnp.asarray(peer_index.table), jnp.asarray(peer_index.counts))
    test_images = data_lib.preprocess_images(jnp.asarray(dataset.x_test))
    test_labels = jnp.asarray(dataset.y_test, jnp.int32)
    logging.info("data: %s; %d train / %d test examples; %d peers hold %d-%d examples",
                 dataset.source, len(dataset.y_train), len(dataset.y_test), config.num_peers,
                 peer_index.counts.min(), peer_index.counts.max())

    # -- Model, optimizer, algorithm.
    model_kwargs = {"conv_impl": config.conv_impl} if config.conv_impl else {}
    model = models.get_model(config.model, dataset.num_classes, **model_kwargs)

    def apply_fn(params, x):
        return model.apply({"params": params}, x)

    optimizer = local.momentum_sgd(config.learning_rate, config.momentum)
    algorithm = algorithms.make_algorithm(config)
    root_key = jax.random.key(config.seed)
    state = init_state(model, optimizer, test_images[:1], config.num_peers,
                       jax.random.fold_in(root_key, 0))
    ledger = comm.Ledger(payload_bytes=comm.tree_bytes(jax.tree.map(lambda x: x[0], state.params)),
                         payloads_per_message=algorithm.payloads_per_message,
                         wire=algorithm.wire)
    logging.info("model %s: %d parameters, payload %d bytes; algorithm %s (%s): %d rounds",
                 config.model, models.count_params(jax.tree.map(lambda x: x[0], state.params)),
                 ledger.payload_bytes, algorithm.name, algorithm.description,
                 algorithm.num_rounds)

    step = jax.jit(functools.partial(
        fl_iteration, algorithm=algorithm, apply_fn=apply_fn, optimizer=optimizer,
        local_batches=config.local_batches, batch_size=config.batch_size), donate_argnums=0)
    evaluate = jax.jit(functools.partial(local.evaluate_peers, apply_fn=apply_fn))

    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "config.json"), "w") as f:
        f.write(config.to_json())
    metrics: list[dict] = []
    best = final = None
    reached_at = None
    iteration_key = jax.random.fold_in(root_key, 1)
    with open(os.path.join(workdir, "metrics.jsonl"), "w") as metrics_file:
        for t in range(config.max_iterations):
            # -- One iteration: local training + aggregation, then the ledger on the host.
            state, info = step(state, jax.random.fold_in(iteration_key, t), data)
            sizes = np.asarray(info["member_sizes"])
            row = {"iteration": t, **ledger.record(sizes)}
            row.update(present_peers=int(info["present_peers"]),
                       mean_group_size=comm.mean_group_size(sizes),
                       train_loss=float(info["train_loss"]))

            # -- Evaluation every eval_every iterations (and at the last one).
            if t % config.eval_every == 0 or t == config.max_iterations - 1:
                present = np.ones(config.num_peers, bool)
                row.update(_evaluate(config, state, present, t, evaluate, test_images,
                                     test_labels))
                final = row["accuracy"]
                best = final if best is None else max(best, final)
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
                    break

    summary = {
        "final_accuracy": final,
        "best_accuracy": best,
        "iterations": len(metrics),
        "cumulative_bytes": ledger.cumulative_bytes,
        "reached_target": reached_at is not None,
        "target_accuracy": config.target_accuracy,
        "iteration_reached_target": reached_at,
        "wall_seconds": round(time.time() - start, 3),
    }
    with open(os.path.join(workdir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    logging.info("done: %s", json.dumps(summary))
    return RunResult(summary, metrics)


def _evaluate(config, state, present, iteration, evaluate, test_images, test_labels) -> dict:
    peers = select_eval_peers(config, present, iteration)
    if peers is None:
        weights = jnp.asarray(present, jnp.float32) / max(int(present.sum()), 1)
        params = jax.tree.map(lambda x: jnp.tensordot(weights, x, axes=1)[None], state.params)
    else:
        params = jax.tree.map(lambda x: x[jnp.asarray(peers)], state.params)
    accuracy, loss = evaluate(params, test_images, test_labels)
    accuracy, loss = np.asarray(accuracy), np.asarray(loss)
    return {"accuracy": float(accuracy.mean()), "loss": float(loss.mean()),
            "accuracy_min": float(accuracy.min()), "accuracy_max": float(accuracy.max()),
            "evaluated_peers": int(accuracy.size)}


def format_bytes(n: int) -> str:
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.4g} {unit}" if unit != "B" else f"{n} B"
        n /= 1000
    return f"{n} B"
