"""The simulated clock: how long an iteration would take on real links (inside jit).

Every peer has an uplink u and a downlink d (bytes/s), a latency l (s) and a training speed
(examples/s): `Links`, drawn by `marfl_jax.network`. One iteration takes

    compute + communication + coordination

* **compute**: each updating peer trains on b * B examples at its speed; the iteration waits for
  the slowest (synchronous, as the authors).
* **communication**: the sum over the iteration's rounds of the round's time, the slowest group's
  completion (rounds are synchronous: the next round's groups mix the previous round's). MKD's
  weight exchange is one more pass over the same groups with weights only.
* **coordination**: the authors' fixed waits, constants documented below.

Bandwidth sharing. A flow from sender i to receiver j gets the smaller of its equal shares at its
two ends, min(u_i / out_i, d_j / in_j), where out_i and in_j count the flows at i's uplink and
j's downlink: a max-min fair share of the sender's uplink and the receiver's downlink without
re-distributing what a flow bottlenecked elsewhere leaves unused (exact max-min when the links of
a group are uniform; otherwise a lower bound on the rates). A message between two peers has the
latency (l_i + l_j) / 2 (a peer's latency_ms is its one-way latency to a typical peer, so a
uniform profile gives every message latency_ms); a message to or from a server has the peer's.

A round's seconds are the `seconds` of the algorithm's wire (`marfl_jax.comm.Wire`, one object
per way of exchanging messages, which also gives the ledger its bytes and the averaging its way of
combining coded copies): `(ids, num_groups, links, message_bytes, server_bps) -> RoundTimes`. The
registered wires' timings, here:
* `allgather` (the authors' MAR-FL, AR-FL's full mesh, gossip pairs): each of a group's n
  members sends its message to the other n - 1 at once; a flow of M bytes takes
  (l_i + l_j)/2 + M (n - 1) max(1/u_i, 1/d_j).
* `butterfly`: reduce-scatter then all-gather of M/n chunks, each phase like an all-gather of
  chunks; a group takes two phases.
* `star` (FedAvg, or a server per group): every member uploads M to the group's server, whose
  link (`server_bps`, each direction) is shared by the n members, then downloads the mean:
  l_i + M max(1/u_i, n/s) up, l_i + M max(1/d_i, n/s) down; the download starts when the last
  upload has arrived.
* `relay` (RDFL's ring, the `relay` wire: allgather's bytes, this timing): the members of an arc
  in peer-id order form a ring; in each of n - 1 hops every member forwards one message to its
  successor; a hop waits for the slowest link.

Every timing reports each member's *own* time (its transfers, started at the round's start,
each flow limited by the member's own links only: what a deadline judges, so a slow peer, not
the mates who wait for it, is cut off) and the round's completion (the real shares and waits).
Closed forms at uniform links are in tests/test_clock.py (MAR-FL on a 4x4x4 grid with the paper's
CNN: 3 messages of 2 x 4,799,528 B per peer per round, 23.04 s at 10 Mbit/s).

Deadlines (`late_members`, applied by `marfl_jax.core.clock`): a member whose own time in a
round exceeds `round_timeout_s` misses that round and the rest of the iteration; the groups
average without it and the round lasts until the deadline (the others wait that long before
giving up, as the authors' barrier does). The ledger then counts only the exchanges that happened.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from marfl_jax import mixing

# The authors' coordination (felix-fjm/mar-fl): every iteration starts with a participation
# count that sleeps 5 s (peer_synchronization.count_num_participating_peers), and MAR-FL's round
# passes 4 barriers (2 in matchmaking, 2 around the model exchange) whose DHT polls wait 50 ms.
PARTICIPATION_COUNT_S = 5.0
BARRIER_POLL_S = 0.05
MARFL_BARRIERS_PER_ROUND = 4
# The baselines form groups without a DHT: only the exchange's 2 barriers (our assumption).
BASELINE_BARRIERS_PER_ROUND = 2

MBIT = 1e6 / 8  # Bytes per second in one Mbit/s.


class Links(NamedTuple):
    """Every peer's links, arrays (N,) float32."""

    uplink_bps: jax.Array  # Bytes per second.
    downlink_bps: jax.Array
    latency_s: jax.Array
    examples_per_s: jax.Array


class RoundTimes(NamedTuple):
    own: jax.Array  # (N,) each member's time on its own links alone, 0 absent or alone.
    done: jax.Array  # (N,) when each member is done, with the real shares and waits.
    completion: jax.Array  # () the round's time: max of `done`.


def _segments(ids: jax.Array, num_groups: int):
    """(segment (N,), present (N,), sizes (N,) of each peer's group as float32)."""
    present = ids >= 0
    segment = jnp.where(present, ids, num_groups)
    return segment, present, mixing.member_group_sizes(ids, num_groups).astype(jnp.float32)


def _max_except_self(values: jax.Array, seg: mixing.Segments, ids: jax.Array,
                     num_groups: int) -> jax.Array:
    """For each peer, the max of `values` over the other members of its group (-inf alone).
    From each group's largest value, its count and its second largest: O(N log N), no float
    scatter (`mixing.segment_scan` over `seg`, the round's peers sorted by group)."""
    top = mixing.segment_scan(values, seg, jnp.maximum)
    is_top = values == top
    segment = jnp.where(ids >= 0, ids, num_groups)
    ties = jax.ops.segment_sum(is_top.astype(jnp.int32), segment, num_segments=num_groups + 1)
    second = mixing.segment_scan(jnp.where(is_top, -jnp.inf, values), seg, jnp.maximum)
    return jnp.where(is_top & (ties[segment] == 1), second, top)


def _completion(per_member: jax.Array, present: jax.Array) -> jax.Array:
    return jnp.max(jnp.where(present, per_member, 0.0), initial=0.0)


def _exchange(ids, num_groups, links: Links, flow_bytes):
    """Every member sends to every other member of its group at once (n - 1 flows each way).
    flow_bytes: (N,) bytes of one flow, by group (the same for all its members).

    Returns (own, done), each (N,), 0 alone or absent: `done` = the end of the member's last
    flow in or out; `own` = the same with every flow limited by the member's own link only
    (what its links alone would allow: what a deadline judges).

    With c = flow_bytes * (n - 1), a_i = 1/u_i, b_j = 1/d_j, x = l/2, the flow i -> j ends at
    x_i + x_j + c max(a_i, b_j), and max over i of that is
    x_j + max(max_i (x_i + c a_i), c b_j + max_i x_i): exact segment maxima, no pair table."""
    segment, present, sizes = _segments(ids, num_groups)
    cost = flow_bytes * jnp.maximum(sizes - 1, 0)
    half_latency = links.latency_s / 2
    up = cost / links.uplink_bps
    down = cost / links.downlink_bps

    seg = mixing.segments(ids, num_groups)  # Sorted once for the round's three maxima.

    def others(values):
        return _max_except_self(jnp.where(present, values, -jnp.inf), seg, ids, num_groups)

    latest_mate = others(half_latency)
    received = half_latency + jnp.maximum(others(half_latency + up), down + latest_mate)
    sent = half_latency + jnp.maximum(up + latest_mate, others(half_latency + down))
    own = half_latency + latest_mate + jnp.maximum(up, down)
    exchanging = present & (sizes > 1)
    return (jnp.where(exchanging, own, 0.0),
            jnp.where(exchanging, jnp.maximum(received, sent), 0.0))


def allgather(ids, num_groups: int, links: Links, message_bytes: float,
              server_bps: float) -> RoundTimes:
    """Each member receives the other members' messages of `message_bytes`."""
    del server_bps
    own, done = _exchange(ids, num_groups, links, jnp.float32(message_bytes))
    return RoundTimes(own, done, _completion(done, ids >= 0))


def butterfly(ids, num_groups: int, links: Links, message_bytes: float,
              server_bps: float) -> RoundTimes:
    """Reduce-scatter then all-gather: two all-gathers of chunks of message_bytes / n."""
    del server_bps
    segment, present, sizes = _segments(ids, num_groups)
    own, done = _exchange(ids, num_groups, links, message_bytes / jnp.maximum(sizes, 1.0))
    # The second phase starts when the first's chunks are in all over the group: the slowest
    # member's phase, twice.
    slowest = mixing.segment_max(done, ids, num_groups)
    done = jnp.where(present, 2 * slowest, 0.0)
    return RoundTimes(2 * own, done, _completion(done, present))


def star(ids, num_groups: int, links: Links, message_bytes: float,
         server_bps: float) -> RoundTimes:
    """Members upload to their group's server, which sends the mean back once it has all."""
    segment, present, sizes = _segments(ids, num_groups)
    share = sizes / server_bps  # Seconds per byte of a member's share of the server link.
    up = links.latency_s + message_bytes * jnp.maximum(1.0 / links.uplink_bps, share)
    down = links.latency_s + message_bytes * jnp.maximum(1.0 / links.downlink_bps, share)
    up, down = (jnp.where(present, x, 0.0) for x in (up, down))
    last_upload = mixing.segment_max(up, ids, num_groups)
    done = jnp.where(present, last_upload + down, 0.0)
    own = jnp.where(present, 2 * links.latency_s + message_bytes * (
        1.0 / links.uplink_bps + 1.0 / links.downlink_bps), 0.0)
    return RoundTimes(own, done, _completion(done, present))


def relay(ids, num_groups: int, links: Links, message_bytes: float,
          server_bps: float) -> RoundTimes:
    """n - 1 hops around each arc's ring (members in peer-id order, the last one's successor
    the first); a hop i -> succ(i) takes (l_i + l_s)/2 + M max(1/u_i, 1/d_s)."""
    del server_bps
    num_peers = ids.shape[0]
    segment, present, sizes = _segments(ids, num_groups)
    order = jnp.argsort(segment, stable=True)  # Members by group, then by peer id.
    position = jnp.zeros(num_peers, jnp.int32).at[order].set(jnp.arange(num_peers,
                                                                         dtype=jnp.int32))
    rank = mixing.rank_in_group(ids, num_groups)
    start = position - rank
    successor = order[jnp.where(rank + 1 < sizes.astype(jnp.int32), position + 1, start)]
    latency = (links.latency_s + links.latency_s[successor]) / 2
    alone = ~present | (sizes <= 1)
    hop = jnp.where(alone, 0.0, latency + message_bytes * jnp.maximum(
        1.0 / links.uplink_bps, 1.0 / links.downlink_bps[successor]))
    # On its own links only: its uplink sends, its downlink receives the predecessor's.
    own_hop = latency + message_bytes * jnp.maximum(1.0 / links.uplink_bps,
                                                    1.0 / links.downlink_bps)
    hops = jnp.maximum(sizes - 1, 0)
    own = jnp.where(alone, 0.0, hops * own_hop)
    slowest_hop = mixing.segment_max(hop, ids, num_groups)
    done = jnp.where(alone, 0.0, hops * slowest_hop)
    return RoundTimes(own, done, _completion(done, present))


# -- One group on the host (the asynchronous timeline, `marfl_jax.events`): the same formulas
# for a single group of n >= 2 members, in NumPy (float64), so the host never waits for the
# device to time a group. `tests/test_asynchronous.py` checks each against its round above.
# links: the members' Links as NumPy arrays (n,), in peer-id order; returns the group's
# completion in seconds.

def _exchange_group(links: Links, flow_bytes: float) -> np.ndarray:
    """Each member's `done` of `_exchange` for one group (n,)."""
    n = links.uplink_bps.shape[0]
    cost = flow_bytes * (n - 1)
    half = np.asarray(links.latency_s, np.float64) / 2
    up = cost / np.asarray(links.uplink_bps, np.float64)
    down = cost / np.asarray(links.downlink_bps, np.float64)

    def others(values):  # For each member, the max over the other members.
        order = np.argsort(values)
        top, second = values[order[-1]], values[order[-2]]
        return np.where(np.arange(n) == order[-1], second, top)

    latest_mate = others(half)
    received = half + np.maximum(others(half + up), down + latest_mate)
    sent = half + np.maximum(up + latest_mate, others(half + down))
    return np.maximum(received, sent)


def allgather_group(links: Links, message_bytes: float, server_bps: float) -> float:
    del server_bps
    return float(_exchange_group(links, message_bytes).max())


def butterfly_group(links: Links, message_bytes: float, server_bps: float) -> float:
    del server_bps
    n = links.uplink_bps.shape[0]
    return float(2 * _exchange_group(links, message_bytes / n).max())


def star_group(links: Links, message_bytes: float, server_bps: float) -> float:
    n = links.uplink_bps.shape[0]
    share = n / server_bps
    latency = np.asarray(links.latency_s, np.float64)
    up = latency + message_bytes * np.maximum(1.0 / np.asarray(links.uplink_bps, np.float64),
                                              share)
    down = latency + message_bytes * np.maximum(
        1.0 / np.asarray(links.downlink_bps, np.float64), share)
    return float(up.max() + down.max())


def relay_group(links: Links, message_bytes: float, server_bps: float) -> float:
    del server_bps
    n = links.uplink_bps.shape[0]
    successor = np.roll(np.arange(n), -1)
    latency = np.asarray(links.latency_s, np.float64)
    hop = (latency + latency[successor]) / 2 + message_bytes * np.maximum(
        1.0 / np.asarray(links.uplink_bps, np.float64),
        1.0 / np.asarray(links.downlink_bps, np.float64)[successor])
    return float((n - 1) * hop.max())


def compute_seconds(updating: jax.Array, examples: int, links: Links) -> jax.Array:
    """The slowest updating peer's training time for `examples` examples. () float32."""
    return jnp.max(jnp.where(updating, examples / links.examples_per_s, 0.0), initial=0.0)


def late_members(ids: jax.Array, times: RoundTimes, timeout_s: float) -> jax.Array:
    """(N,) bool: present members whose own transfers end after the deadline."""
    return (ids >= 0) & (times.own > timeout_s)


class Clock(NamedTuple):
    """The static settings of a run's clock (`marfl_jax.runner` builds one from the config).

    Attributes:
      links: every peer's `Links` (arrays (N,)).
      wire: the algorithm's `marfl_jax.comm.Wire`; its `seconds` times each round.
      message_bytes: one averaging message (payloads x payload bytes + DP's scalar).
      distill_message_bytes: one message of MKD's weight exchange (the weights).
      server_bps: a server's link, each direction (the `star` wire).
      timeout_s: the round deadline (0 = none).
      examples: b * B, one peer's training examples per iteration.
      barriers_per_round: coordination barriers per round (BARRIER_POLL_S each).
    """

    links: Links
    wire: Any
    message_bytes: float
    distill_message_bytes: float
    server_bps: float
    timeout_s: float
    examples: int
    barriers_per_round: int

    def round_times(self, ids: jax.Array, num_groups: int,
                    message_bytes: float | None = None) -> RoundTimes:
        """One round's times on the wire. ids: (N,) group ids, -1 absent."""
        return self.wire.seconds(
            ids, num_groups, self.links, self.message_bytes if message_bytes is None
            else message_bytes, self.server_bps)

    def coordination_seconds(self, rounds: int) -> float:
        return PARTICIPATION_COUNT_S + rounds * self.barriers_per_round * BARRIER_POLL_S
