"""Message codecs and weights-only messages: sizes, decode errors, coded group means against a
per-member loop, and runs of every algorithm."""

import dataclasses
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from marfl_jax import codec, comm, mixing, runner
from marfl_jax.config import Config
from tests.simulate import simulate

MLP_LEAVES = (784 * 200, 200, 200 * 10, 10)


def _mlp_params():
    return [jax.ShapeDtypeStruct((n,), jnp.float32) for n in MLP_LEAVES]


@pytest.mark.parametrize("name, block, expected", [
    ("float32", 4096, 4 * sum(MLP_LEAVES)),
    ("float16", 4096, 2 * sum(MLP_LEAVES)),
    ("bfloat16", 4096, 2 * sum(MLP_LEAVES)),
    ("int8", 4096, sum(MLP_LEAVES) + 4 * sum(math.ceil(n / 4096) for n in MLP_LEAVES)),
    ("int8", 64, sum(MLP_LEAVES) + 4 * (2450 + 4 + 32 + 1)),
])
def test_encoded_sizes_are_exact(name, block, expected):
    assert codec.tree_bytes(codec.CODECS.get(name), _mlp_params(), block) == expected


def test_decode_errors_are_within_each_codecs_bound():
    x = jax.random.normal(jax.random.key(0), (3, 1000)) * jnp.logspace(-3, 3, 1000)
    for name, relative, smallest_normal in (("float16", 2.0**-11, 2.0**-14),
                                            ("bfloat16", 2.0**-8, 2.0**-126)):
        decoded = codec.CODECS.get(name).roundtrip(x, 0)
        normal = jnp.abs(x) >= smallest_normal
        error = jnp.where(normal, jnp.abs(decoded - x) / jnp.abs(x), 0.0)
        assert float(jnp.max(error)) <= relative
    block = 100
    decoded = codec.CODECS.get("int8").roundtrip(x, block)
    blocks = x.reshape(3, 10, block)
    step = jnp.max(jnp.abs(blocks), axis=-1, keepdims=True) / 127  # The block's scale.
    error = jnp.abs(decoded.reshape(3, 10, block) - blocks)
    assert bool(jnp.all(error <= step / 2 * (1 + 1e-6)))
    assert float(jnp.max(error)) > 0  # Lossy indeed.
    chex.assert_trees_all_equal(codec.CODECS.get("float32").roundtrip(x, 0), x)


BLOCK = 16


def _int8(tree):
    return codec.roundtrip_tree(codec.CODECS.get("int8"), tree, BLOCK)


def _encoded(values):
    """What a receiver decodes of one sender's values (a whole payload or a slice of one)."""
    return np.asarray(_int8(jnp.asarray(values[None])))[0]


def _loop(x, ids, wire):
    """Per member: what it ends with, from its exact copy and the decoded payloads it gets."""
    out = x.copy()
    for i in range(len(ids)):
        if ids[i] < 0:
            continue
        group = [j for j in range(len(ids)) if ids[j] == ids[i]]
        n = len(group)
        if wire == "allgather":
            out[i] = (x[i] + sum(_encoded(x[j]) for j in group if j != i)) / n
        elif wire == "star":
            out[i] = _encoded(sum(_encoded(x[j]) for j in group) / n)
        else:  # Butterfly: the r-th member owns the r-th slice, cut between whole blocks.
            columns = x.shape[1]
            blocks = -(-columns // BLOCK)
            owner = np.array([group[(k // BLOCK) * n // blocks] for k in range(columns)])
            for r in group:  # Each slice is encoded on its own, by each sender.
                cut = owner == r
                reduced = (x[r, cut] + sum(_encoded(x[j, cut]) for j in group if j != r)) / n
                out[i, cut] = reduced if r == i else _encoded(reduced)
    return out


@pytest.mark.parametrize("wire", ["allgather", "star", "butterfly"])
def test_each_wires_coded_combine_equals_a_per_member_loop(wire):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(9, 70)).astype(np.float32)  # 5 blocks, the last one partial.
    ids = np.array([0, 1, 0, 2, 1, -1, 0, 2, 1], np.int32)
    got = comm.coded_combine(wire)(jnp.asarray(x), jnp.asarray(ids), 3, _int8, unit=BLOCK)
    chex.assert_trees_all_close(got, _loop(x, ids, wire), atol=1e-6)
    # Peers 0 and 2 share a group: apart with their exact own copies, equal through a server.
    assert np.array_equal(np.asarray(got)[0], np.asarray(got)[2]) == (wire == "star")


@pytest.mark.parametrize("columns, unit", [(70, 16), (4096 * 3 + 5, 4096), (13, 1)])
def test_butterfly_slices_hold_whole_blocks_and_their_bytes_add_up(columns, unit):
    int8 = codec.CODECS.get("int8")
    sizes = jnp.arange(1, 7, dtype=jnp.int32)
    slices = np.asarray(mixing.butterfly_slice(columns, sizes, unit))
    for n, row in zip(range(1, 7), slices, strict=True):
        assert np.array_equal(row, np.sort(row)) and set(row) <= set(range(n))
        lengths = np.bincount(row, minlength=n)
        starts = np.cumsum(lengths) - lengths
        # No block straddles two owners (members beyond the blocks get empty slices).
        assert all(start % unit == 0 for start, m in zip(starts, lengths, strict=True) if m)
        # Encoded slice by slice, a payload costs exactly what it costs whole.
        assert sum(int8.leaf_bytes(int(m), unit) for m in lengths if m) == int8.leaf_bytes(
            columns, unit)


@pytest.mark.parametrize("wire", list(comm.WIRE_MODELS))
def test_a_lossless_roundtrip_gives_the_exact_group_mean(wire):
    x = jax.random.normal(jax.random.key(1), (8, 5, 3))
    ids = jnp.array([0, 0, 1, 1, 1, -1, 0, 1], jnp.int32)
    got = comm.coded_combine(wire)(x, ids, 2, lambda tree: tree)
    chex.assert_trees_all_close(got, mixing.group_mean(x, ids, 2), atol=1e-6)


TINY = Config(model="mlp", num_peers=8, group_size=2, key_dim=3, local_batches=1, batch_size=8,
              eval_every=1, eval_peers="all", max_iterations=2, target_accuracy=1.0,
              checkpoint_every=0)


@pytest.mark.slow
def test_weights_only_halves_the_bytes_and_keeps_each_peers_momentum(tmp_path):
    both = runner.run(TINY, str(tmp_path / "both"))
    weights = runner.run(dataclasses.replace(TINY, share_momentum=False), str(tmp_path / "w"))
    for a, b in zip(both.metrics, weights.metrics, strict=True):
        assert 2 * b["bytes"] == a["bytes"] and b["messages"] == a["messages"]
    momentum = next(x for x in jax.tree.leaves(weights.state.opt_state) if x.ndim > 1)
    assert float(jnp.max(jnp.abs(momentum - momentum[:1]))) > 0  # Not averaged away.
    params = next(x for x in jax.tree.leaves(weights.state.params) if x.ndim > 1)
    chex.assert_trees_all_close(params, jnp.broadcast_to(params[:1], params.shape), atol=1e-6)


@pytest.mark.slow
def test_a_codec_shrinks_the_ledger_exactly_and_still_learns(tmp_path):
    plain = runner.run(TINY, str(tmp_path / "plain")).metrics
    coded = runner.run(dataclasses.replace(TINY, codec="int8", codec_block=256),
                       str(tmp_path / "int8")).metrics
    encoded = sum(n + 4 * math.ceil(n / 256) for n in MLP_LEAVES)
    for a, b in zip(plain, coded, strict=True):
        assert b["bytes"] * (4 * sum(MLP_LEAVES)) == a["bytes"] * encoded
    # Close to the exact run's accuracy, with members slightly apart.
    assert abs(coded[-1]["accuracy"] - plain[-1]["accuracy"]) < 0.02, (coded[-1], plain[-1])
    assert coded[-1]["accuracy_std"] > 0 == plain[-1]["accuracy_std"]


# One run per wire's combine and payload kind: all-gather (MAR-FL; AR-FL, gossip and RDFL's relay
# share it), butterfly, the server, and DP + MKD payloads through the codec.
@pytest.mark.parametrize("algorithm, extra", [
    pytest.param("marfl", dict(codec="float16", wire="butterfly"), marks=pytest.mark.slow),
    ("fedavg", dict(codec="int8", share_momentum=False)),
    pytest.param("rdfl", dict(codec="bfloat16", dropout=0.3), marks=pytest.mark.slow),
    ("marfl", dict(codec="int8", mkd=True, mkd_iterations=1, mkd_batches=1, dp=True,
                   dp_noise_multiplier=0.1, share_momentum=False)),
])
def test_every_algorithm_runs_with_codecs_and_weights_only(algorithm, extra):
    config = dataclasses.replace(TINY, algorithm=algorithm, max_iterations=1, **extra)
    (row,), state = simulate(config)
    one_peer = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape[1:], x.dtype), state.params)
    encoded = codec.tree_bytes(codec.CODECS.get(config.codec), one_peer,
                                   config.codec_block)
    # Every payload costs exactly its encoding; DP adds its 4-byte indicator to each message
    # of the exchange (not to MKD's weight messages).
    exchange_messages = row["messages"] - row["mkd_bytes"] // encoded
    assert row["mkd_bytes"] % encoded == 0 and row["messages"] > 0
    assert row["bytes"] == row["payloads"] * encoded + 4 * exchange_messages * config.dp
    assert np.isfinite(row["train_loss"])
    assert all(bool(jnp.isfinite(x).all()) for x in jax.tree.leaves(state.params))
