"""A few jitted iterations of a Config on synthetic data, through the runner's own pieces
(`assemble.pieces`, `assemble.Steps`, `runner.Progress` and `runner.Recorder`), without a
dataset, orbax, evaluation or a workdir (the fast tier's end-to-end checks).

    rows, state = simulate(config, iterations=3)

Each row is the runner's row of that iteration without evaluation (the ledger's fields, the
stages' metrics, counts, the clock's and the accountant's fields); the state is the final
FLState (peer axis first).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from marfl_jax import assemble, runner
from marfl_jax import data as data_lib
from marfl_jax import plan as plan_lib
from marfl_jax.core import DeviceData

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
    model = assemble.build_model(config, NUM_CLASSES, plan_lib.fixed(config))
    made = assemble.pieces(config, model, sample)
    state = assemble.initial_state(config, model, made.sim, sample)
    steps = assemble.Steps(made.sim, jax.eval_shape(lambda: state), data, config.seed)
    progress = runner.Progress(state, 0, 0.0, made.ledger, made.accountant, [],
                               config.target_accuracy, checkpoints=None)
    recorder = runner.Recorder(made.sim, progress, config.learning_rate, start=0.0)
    for t in range(config.max_iterations if iterations is None else iterations):
        progress.state, info, distilling = steps(progress.state, t)
        recorder.finish(recorder.row(t, info, distilling))
        progress.t += 1
    return [{k: v for k, v in row.items() if k != "seconds"} for row in progress.metrics], \
        progress.state
