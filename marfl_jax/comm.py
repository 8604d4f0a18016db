"""What crosses the (simulated) network: group sizes from jit, exact bytes on the host.

The jitted step returns, for every round and peer, the size of the peer's group (0 = absent):
`member_sizes`, shape (G, N) int32. A *wire model* turns that into exact integers with numpy
int64 / Python ints: messages, bytes and the busiest peer's bytes. A *message* is what one party
receives from another in one round; it carries `payloads_per_message` model-sized tensors
(MAR-FL and every baseline here: weights + momentum = 2), `S = payload_bytes` each.

Wire models (`WIRE_MODELS`, a registry: `cost(sizes (G, N), S, payloads_per_message) -> WireCost`):
* `allgather`: every member receives the other members' payloads: (|g| - 1) messages per member
  per round, as the MAR-FL authors count. Also AR-FL (one group), RDFL (ring arcs), gossip (pairs).
* `butterfly`: reduce-scatter + all-gather inside each group: a group of g moves exactly
  2(g - 1) payloads in total, 2(g - 1)/g per member.
* `star`: a server: each present peer uploads once and downloads once per round (FedAvg).

MKD (`marfl_jax.mkd`) adds, in its iterations, a pass over the same groups in which members
receive each other's weights only: (|g| - 1) single-payload messages per member per round, whatever
the averaging's wire model (distillation needs every mate's whole model). With the allgather model
a KD iteration costs 3/2 of a plain one: N*G*(M - 1)*3S at full participation.

DP (`marfl_jax.dp`) averages a third model-sized tensor (the smoothed update) and a 4-byte clip
indicator: `payloads_per_message = 3` plus `scalar_bytes = 4` sent through the same wire model.

Coordination metadata is reported apart from model payloads: MAR-FL peers announce their group
key through a DHT, one small record per present peer per round (`DHT_RECORD_BYTES`, an assumed
size: a key of up to 56 bytes such as "matchmake_<key>-<iteration>-<round>_<peer>" and an 8-byte
value); the other algorithms form their groups without a DHT (`metadata_record_bytes = 0`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import NamedTuple

import jax
import numpy as np

from marfl_jax import mixing
from marfl_jax.registry import Registry


def member_sizes(schedule: jax.Array, num_groups: int) -> jax.Array:
    """Each peer's group size in each round. schedule: (G, N) group ids -> (G, N) int32."""
    return jax.vmap(lambda ids: mixing.member_group_sizes(ids, num_groups))(schedule)


class WireCost(NamedTuple):
    """One iteration's traffic, exact integers."""

    messages: int
    payloads: int  # Model-sized tensors moved (a butterfly chunk counts as its fraction).
    bytes: int
    max_peer_bytes: int  # Bytes received by the busiest peer (the server for `star`).


def allgather_cost(sizes: np.ndarray, payload_bytes: int, payloads_per_message: int) -> WireCost:
    """(|g| - 1) messages received per member per round. sizes: (G, N) member group sizes."""
    received = np.maximum(np.asarray(sizes, np.int64) - 1, 0).sum(axis=0)  # (N,)
    messages = int(received.sum())
    per_message = payloads_per_message * payload_bytes
    return WireCost(messages, messages * payloads_per_message, messages * per_message,
                    int(received.max(initial=0)) * per_message)


def butterfly_cost(sizes: np.ndarray, payload_bytes: int, payloads_per_message: int) -> WireCost:
    """Butterfly all-reduce: a group of g exchanges 2(g - 1) chunk messages per member, each 1/g
    of a payload; the group moves 2(g - 1) payloads in total."""
    sizes = np.asarray(sizes, np.int64)
    messages = payloads = 0
    for round_sizes in sizes:
        counts = np.bincount(round_sizes[round_sizes > 1])  # counts[g] = members in groups of g.
        for g in np.flatnonzero(counts):
            groups = int(counts[g]) // int(g)
            messages += groups * int(g) * 2 * (int(g) - 1)
            payloads += groups * 2 * (int(g) - 1) * payloads_per_message
    # The busiest member receives 2(g - 1) chunks of about ceil(S / g) bytes per round (slices are
    # cut between whole values, or a codec's blocks, so one can exceed S / g by a unit per leaf).
    # The total is exact: the slices of a payload add up to it (`mixing.butterfly_slice`).
    chunk = -(-payload_bytes // np.maximum(sizes, 1))
    per_peer = np.where(sizes > 1, 2 * (sizes - 1) * chunk, 0).sum(axis=0)
    return WireCost(messages, payloads, payloads * payload_bytes,
                    int(per_peer.max(initial=0)) * payloads_per_message)


def star_cost(sizes: np.ndarray, payload_bytes: int, payloads_per_message: int) -> WireCost:
    """A server per group: every present member uploads its payloads and downloads the average,
    in every round (FedAvg: one round, one group of all present peers). The busiest party is the
    server of the largest group."""
    sizes = np.asarray(sizes, np.int64)
    messages = 2 * int((sizes > 0).sum())
    per_message = payloads_per_message * payload_bytes
    return WireCost(messages, messages * payloads_per_message, messages * per_message,
                    int(sizes.max(initial=0)) * per_message)


def mean_group_size(sizes: np.ndarray) -> float:
    """Mean size of the non-empty groups, averaged over rounds. sizes: (G, N)."""
    means = []
    for round_sizes in np.asarray(sizes, np.float64):
        members = round_sizes[round_sizes > 0]
        if members.size:
            num_groups = round(float(np.sum(1.0 / members)))  # Each group counts 1 in total.
            means.append(members.size / num_groups)
    return float(np.mean(means)) if means else 0.0


DHT_RECORD_BYTES = 64


WireModel = Callable[[np.ndarray, int, int], WireCost]
WIRE_MODELS: Registry[WireModel] = Registry("wire")
WIRE_MODELS.register("allgather", allgather_cost)
WIRE_MODELS.register("butterfly", butterfly_cost)
WIRE_MODELS.register("star", star_cost)


def tree_bytes(tree) -> int:
    """Bytes of one peer's copy of a pytree (leaves without the peer axis), as a Python int."""
    return sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


@dataclasses.dataclass
class Ledger:
    """Running totals of network traffic; `record` returns one iteration's metrics row."""

    payload_bytes: int  # S: bytes of one model-sized payload.
    payloads_per_message: int
    wire: str = "allgather"
    metadata_record_bytes: int = 0
    scalar_bytes: int = 0  # A small extra value averaged next to the payloads (DP's indicator).
    cumulative_bytes: int = 0
    cumulative_metadata_bytes: int = 0
    cumulative_payloads: int = 0
    cumulative_messages: int = 0

    TOTALS = ("cumulative_bytes", "cumulative_payloads", "cumulative_messages",
              "cumulative_metadata_bytes")

    def state(self) -> dict[str, int]:
        """The running totals, JSON-able (checkpoints)."""
        return {name: getattr(self, name) for name in self.TOTALS}

    def restore(self, state: dict[str, int]) -> Ledger:
        """This ledger with the totals of `state` (a resumed run's)."""
        return dataclasses.replace(self, **{name: int(state[name]) for name in self.TOTALS})

    def record(self, sizes: np.ndarray, distilled: bool = False) -> dict[str, int]:
        """sizes: (G, N) member group sizes of one iteration; distilled: an MKD iteration, whose
        weight exchange over the same groups is added (and reported as `mkd_bytes`)."""
        cost = WIRE_MODELS.get(self.wire)(sizes, self.payload_bytes, self.payloads_per_message)
        extra = allgather_cost(sizes, self.payload_bytes, 1) if distilled else WireCost(0, 0, 0, 0)
        scalars = (WIRE_MODELS.get(self.wire)(sizes, self.scalar_bytes, 1).bytes
                   if self.scalar_bytes else 0)
        total = int(cost.bytes) + int(extra.bytes) + int(scalars)
        self.cumulative_messages += cost.messages + extra.messages
        self.cumulative_payloads += cost.payloads + extra.payloads
        self.cumulative_bytes += total
        metadata = int((np.asarray(sizes) > 0).sum()) * self.metadata_record_bytes
        self.cumulative_metadata_bytes += metadata
        return {"bytes": total, "cumulative_bytes": self.cumulative_bytes,
                "payloads": cost.payloads + extra.payloads,
                "messages": cost.messages + extra.messages,
                # The busiest peer of each exchange: the same peer under allgather (exact), an
                # upper bound under butterfly.
                "max_peer_bytes": cost.max_peer_bytes + extra.max_peer_bytes,
                "mkd_bytes": int(extra.bytes), "metadata_bytes": metadata,
                "cumulative_metadata_bytes": self.cumulative_metadata_bytes}
