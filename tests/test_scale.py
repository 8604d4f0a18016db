"""Tests of the scale features: peer chunking, the memory estimate and refusal, and the peer
axis sharded over several (forced CPU) devices."""

import dataclasses
import json
import os
import re
import subprocess
import sys

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from marfl_jax import local, memory, models, runner
from marfl_jax.config import Config, ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = Config(model="mlp", num_peers=8, group_size=2, key_dim=3, local_batches=2, batch_size=8,
              eval_every=1, eval_peers="all", max_iterations=3, target_accuracy=1.0,
              checkpoint_every=0, dropout=0.3)


@pytest.mark.parametrize("local_batches", [1, 2])
def test_chunked_local_training_equals_all_at_once(local_batches):
    model = models.get_model("mlp", 10, hidden=(16,))
    optimizer = local.momentum_sgd(0.1, 0.9)
    params = jax.vmap(lambda k: model.init(k, jnp.zeros((1, 28, 28, 1)))["params"])(
        jax.random.split(jax.random.key(0), 7))
    opt_state = jax.vmap(optimizer.init)(params)
    rng = np.random.default_rng(0)
    images = jnp.asarray(rng.normal(size=(7, local_batches, 4, 28, 28, 1)), jnp.float32)
    labels = jnp.asarray(rng.integers(0, 10, size=(7, local_batches, 4)), jnp.int32)
    active = jnp.array([1, 1, 0, 1, 1, 1, 0], bool)

    def apply_fn(p, x, rng=None):
        return model.apply({"params": p}, x)

    whole = local.peers_local_sgd(params, opt_state, images, labels, active, apply_fn=apply_fn,
                                  optimizer=optimizer)
    # 3: two whole chunks and a remainder of one; 5: one whole chunk and a remainder of two.
    for chunk in (1, 2, 3, 5, 7):
        chunked = jax.jit(lambda *a, c=chunk: local.peers_local_sgd(
            *a, apply_fn=apply_fn, optimizer=optimizer, peer_chunk=c))(
            params, opt_state, images, labels, active)
        chex.assert_trees_all_close(chunked, whole, atol=1e-6)


def _while_bodies(hlo: str) -> list[str]:
    """The texts of the computations that while loops of an HLO module run as bodies."""
    computations = {}
    for block in hlo.split("\n\n"):
        match = re.match(r"\s*(?:ENTRY\s+)?%(\S+)\s", block)
        if match:
            computations[match.group(1)] = block
    return [computations[name] for name in re.findall(r"body=%([\w.\-]+)", hlo)]


@pytest.mark.parametrize("local_batches", [1, 4])
def test_chunk_loop_writes_in_place(local_batches):
    """No copy of a whole (N, ...) leaf inside the chunk loop: each chunk costs its own work,
    not a pass over every peer's state (with b = 1 XLA once copied all of it per chunk)."""
    num_peers, chunk = 32, 4
    model = models.get_model("mlp", 10, hidden=(16,))
    optimizer = local.momentum_sgd(0.1, 0.9)
    params = jax.vmap(lambda k: model.init(k, jnp.zeros((1, 28, 28, 1)))["params"])(
        jax.random.split(jax.random.key(0), num_peers))
    opt_state = jax.vmap(optimizer.init)(params)
    images = jnp.zeros((num_peers, local_batches, 4, 28, 28, 1), jnp.float32)
    labels = jnp.zeros((num_peers, local_batches, 4), jnp.int32)

    def apply_fn(p, x, rng=None):
        return model.apply({"params": p}, x)

    step = jax.jit(lambda p, s, x, y: local.peers_local_sgd(
        p, s, x, y, jnp.ones(num_peers, bool), apply_fn=apply_fn, optimizer=optimizer,
        peer_chunk=chunk), donate_argnums=(0, 1))
    hlo = step.lower(params, opt_state, images, labels).compile().as_text()
    bodies = _while_bodies(hlo)
    assert bodies, "the chunks no longer run in a loop"
    whole_leaf = re.compile(rf"= f32\[{num_peers},[^\]]*\][^=]*copy\(")
    copies = [line.strip() for body in bodies for line in body.splitlines()
              if whole_leaf.search(line)]
    assert not copies, copies


@pytest.mark.slow
def test_run_with_peer_chunk_matches_unchunked(tmp_path):
    plain = runner.run(TINY, str(tmp_path / "a")).metrics
    chunked = runner.run(dataclasses.replace(TINY, peer_chunk=3), str(tmp_path / "b")).metrics
    for a, b in zip(plain, chunked, strict=True):
        assert a["bytes"] == b["bytes"]
        np.testing.assert_allclose(a["loss"], b["loss"], rtol=1e-4)


@pytest.mark.smoke
def test_run_that_would_not_fit_is_refused_before_any_work(tmp_path):
    with pytest.raises(ConfigError, match="--num_peers=8 needs about .* GB .*--peer_chunk"):
        runner.run(dataclasses.replace(TINY, memory_limit_gb=1e-6), str(tmp_path / "run"))
    assert not (tmp_path / "run").exists()


def test_memory_estimate_parts():
    tree = {"w": jax.ShapeDtypeStruct((8, 100), jnp.float32), "n": jnp.zeros(3, jnp.int32)}
    assert memory.tree_nbytes(tree) == 8 * 100 * 4 + 12
    estimate = memory.MemoryEstimate(2 * 10**9, 10**8, 5 * 10**8)
    assert estimate.total_bytes == 26 * 10**8 and "state 2.00 GB" in estimate.describe()
    assert memory.check_fits(estimate, None, num_peers=8, peer_chunk=0) is None  # Unknown.
    assert memory.check_fits(estimate, 26 * 10**8, num_peers=8, peer_chunk=0) is None  # Fits.
    with pytest.raises(ConfigError, match=r"--num_peers=8 needs about 2\.60 GB .* more than the "
                       r"2\.00 GB available; use --peer_chunk \(e\.g\. --peer_chunk=1\)"):
        memory.check_fits(estimate, 2 * 10**9, num_peers=8, peer_chunk=0)
    with pytest.raises(ConfigError, match="use a smaller --peer_chunk"):
        memory.check_fits(estimate, 10**9, num_peers=8, peer_chunk=4)
    # The most peers that fit: all at once, (2e9 - 1e8) / (2.5e8 state + 0.625e8 step) a peer;
    # chunked, the step's 5e8 is fixed: (1e9 - 1e8 - 5e8) / 2.5e8.
    with pytest.raises(ConfigError, match=r"fewer --num_peers \(about 6 fit at these settings\)"
                       r".*XLA_PYTHON_CLIENT_MEM_FRACTION of its memory \(now 0\.5\): set e\.g\. "
                       r"XLA_PYTHON_CLIENT_MEM_FRACTION=0\.95"):
        with pytest.MonkeyPatch.context() as patch:
            patch.setenv("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.5")
            memory.check_fits(estimate, 2 * 10**9, num_peers=8, peer_chunk=0)
    assert memory.largest_fitting_peers(estimate, 10**9, num_peers=8, peer_chunk=4) == 1
    assert memory.largest_fitting_peers(estimate, 10**7, num_peers=8, peer_chunk=4) == 0
    # On a CPU the figure is the kernel's MemAvailable.
    with open("/proc/meminfo") as f:
        meminfo = dict(line.split(":", 1) for line in f)
    kernel = int(meminfo["MemAvailable"].split()[0]) * 1024
    assert abs(memory.available_bytes() - kernel) < 0.2 * kernel


SHARDED_RUN = """
import json, sys
import jax
from marfl_jax import runner
from marfl_jax.config import Config
config = Config.from_dict(json.loads(sys.argv[1]))
result = runner.run(config, sys.argv[2])
leaf = jax.tree.leaves(result.state.params)[0]
print(json.dumps({"devices": jax.device_count(), "rows": result.metrics,
                  "spec": str(leaf.sharding.spec), "leaf_devices": len(leaf.sharding.device_set),
                  "shard_rows": leaf.addressable_shards[0].data.shape[0]}))
"""


@pytest.mark.slow
def test_peers_sharded_over_four_cpu_devices_match_one_device(tmp_path):
    config = dataclasses.replace(TINY, mkd=True, mkd_iterations=1, mkd_batches=1)
    single = runner.run(config, str(tmp_path / "single")).metrics
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4",
               JAX_PLATFORMS="cpu")
    result = subprocess.run(
        [sys.executable, "-c", SHARDED_RUN, config.to_json(), str(tmp_path / "sharded")],
        cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["devices"] == 4 and out["leaf_devices"] == 4
    assert out["spec"] == "P('peers',)" and out["shard_rows"] == 2  # 8 peers / 4 devices.
    for a, b in zip(single, out["rows"], strict=True):
        assert (a["bytes"], a["present_peers"]) == (b["bytes"], b["present_peers"])
        np.testing.assert_allclose([a["loss"], a["accuracy"]], [b["loss"], b["accuracy"]],
                                   rtol=1e-4, atol=1e-4)
