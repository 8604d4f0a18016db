"""Group averaging over the peer axis.

Every per-peer quantity is a pytree whose leaves have a leading peer axis of size N. A *mixing
round* is described by one vector of group ids, shape (N,), int32: peers with the same id form a
group and each present peer's value is replaced by its group's mean; id -1 marks an absent peer,
whose value is left as it is. An aggregation algorithm is a schedule of such rounds, shape
(G, N) (see `marfl_jax.algorithms`). Where a schedule is a grid at full participation (Moshpit
keys on a perfect or mixed-radix grid, one group of all peers) and every peer takes part, a
round is a reshape and a mean along one axis instead (`Grid`, `grid_mean`), where the step
checks the round's groups to be the grid's (`on_grid`). A group rule other than the mean
(`marfl_jax.rules`) gathers each group's copies into slots and combines them (`combine_groups`).

The mean is a gather / segment-sum / gather-back: O(N * params) work and memory, never an N x N
mixing matrix (measured slower by 4x at N=1024; docs/design.md).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from marfl_jax import rules as rules_lib

ABSENT = -1


def group_sizes(group_ids: jax.Array, num_groups: int) -> jax.Array:
    """Members per group. group_ids: (N,) in [-1, num_groups). Returns (num_groups,) int32."""
    present = group_ids >= 0
    segment = jnp.where(present, group_ids, num_groups)
    sizes = jax.ops.segment_sum(present.astype(jnp.int32), segment, num_segments=num_groups + 1)
    return sizes[:num_groups]


def member_group_sizes(group_ids: jax.Array, num_groups: int) -> jax.Array:
    """Size of each peer's own group, 0 for absent peers. (N,) -> (N,) int32."""
    sizes = group_sizes(group_ids, num_groups)
    return jnp.where(group_ids >= 0, sizes[jnp.maximum(group_ids, 0)], 0)


# Group reductions without a float scatter. A float scatter-add (`segment_sum`) adds in an
# unspecified order on GPUs, and XLA's deterministic mode rewrites it into a serial loop over its
# indices (one update at a time). Here the peers are sorted by group (an integer sort) and each
# group is reduced by a segmented Hillis-Steele scan over the sorted order: ceil(log2(M)) shifted,
# masked combines for groups of at most M, every one an elementwise op in a fixed order.


class Segments(NamedTuple):
    """The peers of one round sorted by group (absent peers last), from `segments`.

    order: (N,) int32, peer ids sorted by group id (stable: peer order inside a group).
    sorted_segment: (N,) int32, the group of each sorted position (num_groups for absent peers).
    last: (N,) int32, each peer's group's last position in the sorted order.
    sizes: (N,) int32, each peer's group size (0 for absent peers).
    max_size: static bound on a group's size (the scan's length)."""

    order: jax.Array
    sorted_segment: jax.Array
    last: jax.Array
    sizes: jax.Array
    max_size: int


def segments(group_ids: jax.Array, num_groups: int, max_group_size: int | None = None) -> Segments:
    """Sorts one round's peers by group. group_ids: (N,) int32 in [-1, num_groups);
    max_group_size: no group has more members (None: N). Only integer scatters."""
    num_peers = group_ids.shape[0]
    present = group_ids >= 0
    segment = jnp.where(present, group_ids, num_groups).astype(jnp.int32)
    order = jnp.argsort(segment, stable=True).astype(jnp.int32)
    counts = jax.ops.segment_sum(jnp.ones_like(segment), segment, num_segments=num_groups + 1)
    ends = jnp.cumsum(counts)
    bound = num_peers if max_group_size is None else min(max_group_size, num_peers)
    return Segments(order, segment[order], (ends[segment] - 1).astype(jnp.int32),
                    jnp.where(present, counts[segment], 0).astype(jnp.int32), max(bound, 1))


def segment_scan(x: jax.Array, seg: Segments, combine=jnp.add) -> jax.Array:
    """Each peer's group's reduction of x by `combine` (associative), for every present peer.
    x: (N, ...) -> (N, ...) (absent peers get their own values reduced over the absent, which
    callers discard). An inclusive segmented scan over the sorted peers, then each peer reads
    its group's last position: ceil(log2(max_size)) elementwise steps, no scatter."""
    scanned = x[seg.order]
    same_shape = (-1,) + (1,) * (x.ndim - 1)
    shift = 1
    while shift < seg.max_size:
        same = (seg.sorted_segment[shift:] == seg.sorted_segment[:-shift]).reshape(same_shape)
        tail = jnp.where(same, combine(scanned[shift:], scanned[:-shift]), scanned[shift:])
        scanned = jnp.concatenate([scanned[:shift], tail])
        shift *= 2
    return scanned[seg.last]


def segment_max(values: jax.Array, group_ids: jax.Array, num_groups: int) -> jax.Array:
    """Each peer's group's largest value (N,) (absent peers: the absent peers' largest)."""
    return segment_scan(values, segments(group_ids, num_groups), jnp.maximum)


BLOCK_BYTES = 2**28  # Leaves larger than this are averaged in column blocks of at most this.


def peer_sum(x: jax.Array, weights: jax.Array | None = None) -> jax.Array:
    """sum_i weights_i * x_i over the leading axis, as a vector-matrix product in full float32
    (the peers' terms added in peer order). x: (K, ...), weights: (K,) (default all ones) ->
    x.shape[1:].

    XLA:CPU reduces a leading axis several times slower than it streams memory (a (64, 159010)
    sum: 100 ms against 3 ms as this product, benchmarks/RESULTS.md); the product runs at memory
    speed on every backend, and `Precision.HIGHEST` keeps it float32 where the default would
    be TF32 (NVIDIA GPUs)."""
    weights = jnp.ones(x.shape[:1], x.dtype) if weights is None else weights.astype(x.dtype)
    flat = x.reshape(x.shape[0], -1)
    total = jax.lax.dot_general(weights, flat, (((0,), (0,)), ((), ())),
                                precision=jax.lax.Precision.HIGHEST)
    return total.reshape(x.shape[1:])


def group_mean(tree, group_ids: jax.Array, num_groups: int, block_bytes: int = BLOCK_BYTES,
               max_group_size: int | None = None):
    """Replaces each present peer's leaves by the mean over its group.

    Args:
      tree: pytree of arrays with leading peer axis N. Only floating-point leaves are averaged;
        integer leaves (e.g. optimizer step counts) are returned unchanged.
      group_ids: (N,) int32, values in [-1, num_groups); -1 = absent (kept as is).
      num_groups: static upper bound on the group ids.
      block_bytes: a leaf larger than this is averaged in blocks of columns (a `fori_loop`
        that updates the leaf in place), so the temporaries stay within one block (N = 10,000
        MLP peers: 16 GB of temporaries without blocks).
      max_group_size: no group has more members (None: N); the sums take ceil(log2(it)) steps.
    Returns:
      A pytree of the same structure, shapes and dtypes.

    No float scatter: one group (`num_groups == 1`) is a weighted `peer_sum`; otherwise the
    sums are `segment_scan`s over the peers sorted by group.
    """
    num_peers = group_ids.shape[0]
    present = group_ids >= 0
    seg = segments(group_ids, num_groups, max_group_size)
    inverse_sizes = 1.0 / jnp.maximum(seg.sizes, 1).astype(jnp.float32)

    def mean_columns(x):  # x: (N, P).
        scale = inverse_sizes.astype(x.dtype)[:, None]
        if num_groups == 1:
            total = peer_sum(jnp.where(present[:, None], x, 0))  # Absent non-finite: excluded.
            means = jnp.broadcast_to(total[None], x.shape) * scale
        else:
            means = segment_scan(x, seg) * scale
        return jnp.where(present[:, None], means, x)

    def mean_leaf(x):
        if not jnp.issubdtype(x.dtype, jnp.floating):
            return x
        flat = x.reshape(num_peers, -1)
        width = flat.shape[1]
        block = max(1, block_bytes // (num_peers * flat.dtype.itemsize))
        if block >= width:
            return mean_columns(flat).reshape(x.shape)
        whole, rest = divmod(width, block)

        def one_block(i, out):
            part = jax.lax.dynamic_slice_in_dim(out, i * block, block, axis=1)
            return jax.lax.dynamic_update_slice_in_dim(out, mean_columns(part), i * block, 1)

        flat = jax.lax.fori_loop(0, whole, one_block, flat)
        if rest:
            flat = jax.lax.dynamic_update_slice_in_dim(
                flat, mean_columns(flat[:, whole * block:]), whole * block, 1)
        return flat.reshape(x.shape)

    return jax.tree.map(mean_leaf, tree)


class Grid(NamedTuple):
    """A schedule that, at full participation, averages along one axis of a grid per round:
    peer p = sum_i digit_i * stride_i (mixed radix, digit 0 fastest), and round r's groups are
    the peers that agree in every digit but digit axes[r]."""

    radices: tuple[int, ...]
    axes: tuple[int, ...]  # (G,) the digit averaged in each round.


def grid_mean(tree, radices: tuple[int, ...], axes: int | tuple[int, ...]):
    """The group means of grid rounds as a reshape and a mean along grid axes (no scatter:
    deterministic on every backend). Leaves (N, ...) with N = prod(radices); `axes` are digit
    indices (one round, or the union of several); integer leaves are returned unchanged."""
    shape = tuple(reversed(radices))  # C order: digit 0 is the last (fastest) axis.
    axes = (axes,) if isinstance(axes, int) else axes
    positions = tuple(len(radices) - 1 - axis for axis in axes)

    count = math.prod(radices[axis] for axis in axes)
    leading = sorted(positions) == list(range(len(positions)))

    def mean_leaf(x):
        if not jnp.issubdtype(x.dtype, jnp.floating):
            return x
        grid = x.reshape(shape + x.shape[1:])
        if leading:  # The averaged digits are the outermost axes: one peer_sum over them.
            groups = grid.reshape((count, -1) + x.shape[1:])
            means = (peer_sum(groups) / count)[None]
            return jnp.broadcast_to(means, groups.shape).reshape(x.shape)
        means = grid.mean(axis=positions, keepdims=True, dtype=x.dtype)
        return jnp.broadcast_to(means, grid.shape).reshape(x.shape)

    return jax.tree.map(mean_leaf, tree)


# How a group's members combine payloads that cross the wire through a lossy codec: one function
# per way of exchanging them, `(tree, group_ids (N,), num_groups, roundtrip, unit) -> tree`, named
# by that way's wire (`marfl_jax.comm.Wire.combine`). With d_j = roundtrip(x_j), what member j's
# mates decode of its payload, and n the group size. Absent peers (id -1) keep their values;
# tree: leaves (N, ...); integer leaves unchanged.


def _per_peer(v):
    """Broadcasts a per-peer vector v (N,) against a leaf (N, ...) of its dtype."""
    return lambda leaf: v.reshape((-1,) + (1,) * (leaf.ndim - 1)).astype(leaf.dtype)


def _decoded_means(tree, group_ids: jax.Array, num_groups: int, roundtrip):
    """(present (N,), decoded tree, group sizes (N,) float32 >= 1, group means of decoded)."""
    present = group_ids >= 0
    decoded = roundtrip(tree)
    sizes = jnp.maximum(member_group_sizes(group_ids, num_groups), 1).astype(jnp.float32)
    return present, decoded, sizes, group_mean(decoded, group_ids, num_groups)


def coded_allgather(tree, group_ids: jax.Array, num_groups: int, roundtrip, unit: int = 1):
    """Each member averages its own exact copy with its mates' decoded ones,
    (x_i + sum_{j != i} d_j) / n = mean_j d_j + (x_i - d_i) / n (no per-pair loop)."""
    del unit
    present, decoded, sizes, mean_decoded = _decoded_means(tree, group_ids, num_groups,
                                                           roundtrip)

    def combine(x, mean_d, d):
        if not jnp.issubdtype(x.dtype, jnp.floating):
            return x
        return jnp.where(_per_peer(present)(x), mean_d + (x - d) / _per_peer(sizes)(x), x)

    return jax.tree.map(combine, tree, mean_decoded, decoded)


def coded_server(tree, group_ids: jax.Array, num_groups: int, roundtrip, unit: int = 1):
    """The server averages the decoded uploads and sends the mean encoded: every member gets
    roundtrip(mean_j d_j)."""
    del unit
    present, _, _, mean_decoded = _decoded_means(tree, group_ids, num_groups, roundtrip)
    sent = roundtrip(mean_decoded)
    return jax.tree.map(lambda x, m: jnp.where(_per_peer(present)(x), m, x)
                        if jnp.issubdtype(x.dtype, jnp.floating) else x, tree, sent)


def coded_butterfly(tree, group_ids: jax.Array, num_groups: int, roundtrip, unit: int = 1):
    """Member r of the group (by peer id) owns the r-th of n contiguous slices of each leaf's
    values, cut between units of `unit` values (the codec's blocks: each slice is encoded on its
    own, and its encoding is exactly the whole leaf's restricted to it); the owner reduces its
    slice from its exact copy and the others' decoded ones, m = mean_j d_j + (x_owner -
    d_owner) / n there, keeps m and sends it encoded: the others get roundtrip(m)."""
    present, decoded, sizes, mean_decoded = _decoded_means(tree, group_ids, num_groups,
                                                           roundtrip)
    rank = rank_in_group(group_ids, num_groups)

    def owned(x):  # (N, ...) True where the peer owns the value.
        columns = math.prod(x.shape[1:])
        chunk = butterfly_slice(columns, sizes.astype(jnp.int32), unit)
        return (chunk == rank[:, None]).reshape(x.shape)

    correction = jax.tree.map(lambda x, d: jnp.where(owned(x), x - d, 0.0)
                              if jnp.issubdtype(x.dtype, jnp.floating) else x, tree, decoded)
    # Exactly one member owns each value: the group mean of the masked corrections is /n.
    reduced = jax.tree.map(lambda m, c: m + c if jnp.issubdtype(m.dtype, jnp.floating) else m,
                           mean_decoded, group_mean(correction, group_ids, num_groups))
    sent = roundtrip(reduced)
    return jax.tree.map(
        lambda x, m, r: jnp.where(_per_peer(present)(x), jnp.where(owned(x), m, r), x)
        if jnp.issubdtype(x.dtype, jnp.floating) else x, tree, reduced, sent)


def butterfly_slice(columns: int, sizes: jax.Array, unit: int = 1) -> jax.Array:
    """Which slice each of a leaf's `columns` values falls in, for members of groups of `sizes`
    (N,): n contiguous slices cut between units of `unit` values, slice r holding units
    [ceil(r U / n), ceil((r + 1) U / n)) of U = ceil(columns / unit). -> (N, columns) int."""
    units = -(-columns // unit)
    position = jnp.arange(columns)[None, :] // unit
    return (position * sizes[:, None]) // units


class Mixer(NamedTuple):
    """How one run's groups combine their copies in a round, resolved once (`mixer`).

    Attributes:
      round: (tree (N, ...), group_ids (N,), key or None, state) -> (tree, state), one round;
        `state` is the rule's per-peer state (None for a rule without one).
      num_groups: the bound on the group ids of a round.
      grid: the schedule's grid at full participation, only for the exact mean (`mix` then runs
        the rounds as one grid mean where the step's schedule is that grid), else None.
      init: the rule's `init` (the message (N, ...) -> its per-peer state), or None.
      axis_name: a named vmapped axis around the rounds (replicas) over which the grid check
        is agreed (`grid_check`), or None.
    """

    round: Callable[[Any, jax.Array, jax.Array | None, Any], tuple[Any, Any]]
    num_groups: int
    grid: Grid | None = None
    init: Callable[[Any], Any] | None = None
    axis_name: str | None = None


def grid_check(schedule: jax.Array, grid: Grid, num_groups: int,
               axis_name: str | None = None) -> jax.Array:
    """() bool `on_grid`; with `axis_name` (a vmapped axis of replicas), whether every member of
    that axis is on its grid: a predicate the same for all, so a `lax.cond` on it stays a cond
    under vmap (a batched predicate would run both branches)."""
    on = on_grid(schedule, grid, num_groups)
    if axis_name is None:
        return on
    return jax.lax.psum(jnp.logical_not(on).astype(jnp.int32), axis_name) == 0


def mixer(num_groups: int, rule: rules_lib.Rule = rules_lib.MEAN, *,
          max_group_size: int | None = None, grid: Grid | None = None, roundtrip=None,
          combine=None, unit: int = 1, transform=None, axis_name: str | None = None) -> Mixer:
    """The round function of a rule, a codec, a wire and an attack, chosen once.

    * `transform` (`marfl_jax.adversary.message_transform`: what members receive from what
      their mates hold, e.g. an attack then the codec): every round runs through the slots,
      gather, `transform(slots, filled, slot_peer, key)`, the rule, scatter back
      (`combine_groups`; `roundtrip` and `combine` are not used: the transform encodes).
    * `roundtrip` (a lossy codec's tree -> decoded tree): every round is
      `combine(tree, ids, num_groups, roundtrip, unit)`, the wire's way of combining coded
      copies (`coded_allgather`, `coded_server`, `coded_butterfly`: `marfl_jax.comm.Wire`);
      only an exact-mean rule is defined there, and a round trip without a `combine` is refused.
    * a rule without `exact_mean`: every round through the slots (`combine_groups`).
    * the exact mean: segment means (`group_mean`), and with `grid` the grid mean where the
      schedule is the grid (see `mix`).
    Slots hold at most `max_group_size` members (default N); the segment sums scan that far."""
    if transform is not None or not rule.exact_mean:
        if roundtrip is not None and transform is None:
            raise ValueError("a lossy codec's round trip is defined only for an exact-mean rule "
                             "(--aggregator=mean)")

        def through_slots(tree, ids, key, state):
            size = ids.shape[0] if max_group_size is None else max_group_size
            return combine_groups(tree, ids, num_groups, rule, size, transform, key, state)

        return Mixer(through_slots, num_groups, init=rule.init)
    if roundtrip is not None:
        if combine is None:
            raise ValueError("a lossy codec's round trip needs the wire's way of combining coded "
                             "copies (marfl_jax.comm.Wire.combine); none was given")
        return Mixer(lambda tree, ids, key, state: (
            combine(tree, ids, num_groups, roundtrip, unit), state), num_groups)
    return Mixer(lambda tree, ids, key, state: (
        group_mean(tree, ids, num_groups, max_group_size=max_group_size), state),
        num_groups, grid, axis_name=axis_name)


def mix(tree, schedule: jax.Array, mixer: Mixer, key: jax.Array | None = None):
    """Applies the rounds of a schedule (G, N) group ids in order, each by `mixer.round` (round
    r's key: fold_in(key, r)); returns the tree (`mix_with_state` for a rule with state).

    With `mixer.grid` (an exact mean at full participation) the rounds are means along grid
    axes, which commute and repeat idempotently, so they run as ONE mean over the axes the
    rounds cover (equal in exact arithmetic; members end bitwise equal) -- but only where the
    step's schedule is checked to be that grid (`on_grid`, O(G N) integer work): otherwise
    (someone absent, groups redrawn) the rounds run one by one."""

    def rounds(tree):
        return mix_with_state(tree, None, schedule, mixer, key)[0]

    grid = mixer.grid
    if grid is not None:
        return jax.lax.cond(grid_check(schedule, grid, mixer.num_groups, mixer.axis_name),
                            lambda t: grid_mean(t, grid.radices, tuple(sorted(set(grid.axes)))),
                            rounds, tree)
    return rounds(tree)


def mix_with_state(tree, state, schedule: jax.Array, mixer: Mixer,
                   key: jax.Array | None = None):
    """The rounds one by one, threading a rule's per-peer `state` (`Rule.init`; leaves
    (N, ...), each peer's own; None for a rule without state) through `mixer.round` (no grid
    shortcut: `mix` takes it for the mean). Returns (tree, state)."""
    for r, round_ids in enumerate(schedule):  # G is small and static: unrolled.
        tree, state = mixer.round(tree, round_ids,
                                  None if key is None else jax.random.fold_in(key, r), state)
    return tree, state


def grid_group_ids(grid: Grid) -> np.ndarray:
    """(G, N) the grid's rounds as group ids: each peer's id is the smallest peer of its group
    (its own id with the round's digit set to 0)."""
    peers = np.arange(math.prod(grid.radices))
    strides = np.cumprod((1,) + tuple(grid.radices[:-1]))
    digits = (peers[:, None] // strides) % np.asarray(grid.radices)
    return np.stack([peers - digits[:, a] * strides[a] for a in grid.axes]).astype(np.int32)


def on_grid(schedule: jax.Array, grid: Grid, num_groups: int) -> jax.Array:
    """() bool: every round of `schedule` (G, N), ids in [-1, num_groups), forms exactly the
    groups of the grid's round, everyone present (whatever the ids' labels). O(G N) integer
    work: each peer's group is labelled by its smallest member (a segment min) and compared with
    the grid's label."""
    schedule = jnp.asarray(schedule)
    expected = grid_group_ids(grid)
    if expected.shape != schedule.shape:
        return jnp.bool_(False)
    peers = jnp.arange(schedule.shape[1], dtype=schedule.dtype)

    def labels(ids):
        segment = jnp.where(ids >= 0, ids, num_groups)
        return jax.ops.segment_min(peers, segment, num_segments=num_groups + 1)[segment]

    return (schedule >= 0).all() & (jax.vmap(labels)(schedule) == expected).all()


def combine_groups(tree, group_ids: jax.Array, num_groups: int, rule, max_group_size: int,
                   transform=None, key: jax.Array | None = None, state=None):
    """One round under a group rule (`marfl_jax.rules.Rule`), its generic path: every floating
    leaf is gathered into slots (num_groups, max_group_size, ...) by group id and rank in group
    (`rank_in_group`), `rule.combine` is called ONCE on the whole message (the tree of slot
    leaves, integer leaves None there, with `rule.params`) and gives each group's value, which
    is scattered back to the members. Absent peers (id -1) keep their values; integer leaves are
    unchanged; a `per_member` rule gives each member its own slot's value. Memory: num_groups *
    max_group_size copies of the message (at most N members are filled). `transform(slots,
    filled, slot_peer (G, M) int32, key) -> slots` turns what the members hold into what their
    mates receive before the rule (see `mixer`). A rule with state (`Rule.init`) gets each
    member's own `state` in its slot and returns its new one there, scattered back to the member
    (absent peers keep theirs). Returns (tree, state)."""
    leaves, treedef = jax.tree.flatten(tree)
    floating = [jnp.issubdtype(x.dtype, jnp.floating) for x in leaves]
    if not any(floating):
        return tree, state
    num_peers = group_ids.shape[0]
    present = group_ids >= 0
    segment = jnp.where(present, group_ids, num_groups)  # Absent peers: a discarded group.
    rank = jnp.minimum(rank_in_group(group_ids, num_groups), max_group_size - 1)
    # Which peer fills each slot (-1: empty), by an integer scatter; the copies are then
    # gathered (a float scatter would be serialised under deterministic GPU ops).
    slot_peer = jnp.full((num_groups + 1, max_group_size), -1, jnp.int32).at[segment, rank].set(
        jnp.where(present, jnp.arange(num_peers, dtype=jnp.int32), -1))[:num_groups]
    filled = slot_peer >= 0

    def gather(x):
        mask = filled.reshape(filled.shape + (1,) * (x.ndim - 1))
        return jnp.where(mask, x[jnp.maximum(slot_peer, 0)], jnp.zeros((), x.dtype))

    slots = treedef.unflatten([gather(x) if f else None
                               for x, f in zip(leaves, floating, strict=True)])
    if transform is not None:
        slots = transform(slots, filled, slot_peer, key)
    if rule.init is None:
        combined = rule.combine(slots, filled, rule.params)
    else:
        combined, state_slots = rule.combine(slots, filled, rule.params,
                                             jax.tree.map(gather, state))
    combined = treedef.flatten_up_to(combined)
    own_group = jnp.where(present, group_ids, 0)
    own_slot = (own_group, rank) if rule.per_member else own_group  # The member's own value.

    def scatter(x, value, where=own_slot):
        mask = present.reshape((-1,) + (1,) * (x.ndim - 1))
        return jnp.where(mask, value.astype(x.dtype)[where], x)

    if rule.init is not None:  # Each member's own new state.
        state = jax.tree.map(lambda x, v: scatter(x, v, (own_group, rank)), state, state_slots)
    return treedef.unflatten([scatter(x, c) if f else x
                              for x, c, f in zip(leaves, combined, floating, strict=True)]), state


def grid_of(schedule: np.ndarray, radices: tuple[int, ...]) -> Grid | None:
    """The Grid whose rounds form the same groups as `schedule` (G, N) at full participation, or
    None if some round is not one grid axis."""
    schedule = np.asarray(schedule)
    peers = np.arange(schedule.shape[1])
    if math.prod(radices) != peers.size:
        return None
    strides = np.cumprod((1,) + tuple(radices[:-1]))
    digits = (peers[:, None] // strides) % np.asarray(radices)

    def same_groups(a, b):
        pairs = np.unique(np.stack([a, b], axis=1), axis=0)
        return len(pairs) == len(np.unique(a)) == len(np.unique(b))

    axes = []
    for ids in schedule:
        axis = next((a for a in range(len(radices)) if radices[a] > 1 and same_groups(
            ids, peers - digits[:, a] * strides[a])), None)
        if axis is None or (ids < 0).any():
            return None
        axes.append(axis)
    return Grid(tuple(int(r) for r in radices), tuple(axes))


def rank_in_group(group_ids: jax.Array, num_groups: int) -> jax.Array:
    """Each present peer's rank among its group's members sorted by peer id (the Moshpit chunk
    index); absent peers get 0. (N,) -> (N,) int32. O(N log N) via one stable sort."""
    num_peers = group_ids.shape[0]
    present = group_ids >= 0
    segment = jnp.where(present, group_ids, num_groups)
    order = jnp.argsort(segment, stable=True)  # Ties keep peer-id order.
    sizes = jax.ops.segment_sum(jnp.ones_like(segment), segment, num_segments=num_groups + 1)
    starts = jnp.cumsum(sizes) - sizes
    sorted_rank = jnp.arange(num_peers, dtype=jnp.int32) - starts[segment[order]]
    rank = jnp.zeros(num_peers, jnp.int32).at[order].set(sorted_rank.astype(jnp.int32))
    return jnp.where(present, rank, 0)


def consensus_distance(tree, present: jax.Array, block_bytes: int = BLOCK_BYTES) -> jax.Array:
    """Mean over present peers of the squared distance of their parameters from the present peers'
    mean. tree leaves (N, ...); present (N,) bool. Returns a scalar float32 (0 if nobody).

    One pass over the state: with d_i = x_i - r (r the first present peer's values, a shift that
    changes nothing in exact arithmetic), sum_i ||x_i - mean||^2 = sum_i ||d_i||^2 -
    ||sum_i d_i||^2 / n; identical models give exactly 0 rather than the rounding error of
    their mean. Leaves larger than `block_bytes` are reduced in column blocks (no full-size
    temporaries)."""
    num_peers = present.shape[0]
    weights = present.astype(jnp.float32)
    count = jnp.maximum(weights.sum(), 1.0)
    reference = jnp.argmax(present)  # The first present peer (peer 0 if none).

    def spread(x):  # x: (N, P) -> sum over present peers and columns of (x - column mean)^2.
        d = (x - x[reference]) * weights[:, None]
        return (d * d).sum() - (peer_sum(d) ** 2).sum() / count

    total = jnp.float32(0.0)
    for x in jax.tree.leaves(tree):
        flat = x.reshape(num_peers, -1).astype(jnp.float32)
        width = flat.shape[1]
        block = max(1, block_bytes // (num_peers * 4))
        if block >= width:
            total = total + spread(flat)
            continue
        whole, rest = divmod(width, block)
        total = jax.lax.fori_loop(
            0, whole, lambda i, acc, flat=flat, block=block: acc + spread(
                jax.lax.dynamic_slice_in_dim(flat, i * block, block, axis=1)), total)
        if rest:
            total = total + spread(flat[:, whole * block:])
    return jnp.maximum(total, 0.0) / count
