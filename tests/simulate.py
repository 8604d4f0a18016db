"""A few jitted iterations of a Config on synthetic data: the device side and the ledger, without
a dataset, orbax, evaluation or a workdir (the fast tier's end-to-end checks).

    rows, state = simulate(config, iterations=3)

Each row holds the iteration, the ledger's fields for it and the info's scalars (train_loss,
consensus, counts); the state is the final FLState (peer axis first).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from marfl_jax import comm, runner
from marfl_jax import data as data_lib
from marfl_jax import plan as plan_lib
from marfl_jax.core import DeviceData, init_state, make_iteration

NUM_CLASSES = 10


def synthetic_data(config, examples_per_peer: int = 32, seed: int = 0) -> DeviceData:
    """Random 28x28 uint8 images with random labels, split by the config's partition."""
    rng = np.random.default_rng(seed)
    n = config.num_peers * examples_per_peer
    images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, NUM_CLASSES, n).astype(np.int32)
    index = data_lib.partition(labels, config.num_peers, config.partition,
                               config.dirichlet_alpha, config.seed)
    return DeviceData(jnp.asarray(images), jnp.asarray(labels), jnp.asarray(index.table),
                      jnp.asarray(index.counts))


def simulate(config, iterations: int | None = None):
    """Runs `iterations` (default config.max_iterations) iterations. Returns (rows, state)."""
    data = synthetic_data(config)
    sample = data_lib.preprocess(data.x_train[:1])
    model = runner.build_model(config, NUM_CLASSES, plan_lib.fixed(config))
    assembly = runner.assemble(config, model, sample)
    sim, ledger = assembly.sim, assembly.ledger
    key = jax.random.key(config.seed)
    state = init_state(model, sim.optimizer, sample, config.num_peers, jax.random.fold_in(key, 0),
                       sim.churn_model, sim.privacy)
    steps = {flag: jax.jit(make_iteration(sim, flag))
             for flag in (False, True) if not flag or sim.distillation is not None}
    rows = []
    for t in range(config.max_iterations if iterations is None else iterations):
        distilling = sim.distillation is not None and sim.distillation.active(t)
        weight = (np.float32(sim.distillation.weight(t)),) if distilling else ()
        state, info = steps[distilling](state, jax.random.fold_in(jax.random.fold_in(key, 1), t),
                                        data, *weight)
        sizes = np.asarray(info["member_sizes"])
        row = {"iteration": t, **ledger.record(sizes, distilling),
               "mean_group_size": comm.mean_group_size(sizes)}
        row.update(runner.stage_metrics(info))
        row["present_peers"] = int(np.asarray(info["present"]).sum())
        rows.append(row)
    return rows, state
