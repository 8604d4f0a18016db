"""What crosses the (simulated) network: group sizes from jit, exact bytes on the host.

Every way of exchanging messages is ONE object, a `Wire` registered in `WIRE_MODELS` (the
--wire values; an `Algorithm` carries one, by name or as an object), which says all it implies:
* `cost`: the bytes the ledger counts. The jitted step returns, for every round and peer, the
  size of the peer's group (0 = absent): `member_sizes`, shape (G, N) int32; `cost(sizes, S,
  payloads_per_message) -> WireCost` turns that into exact integers with numpy int64 / Python
  ints: messages, bytes and the busiest peer's bytes. A *message* is what one party receives
  from another in one round; it carries `payloads_per_message` model-sized tensors (MAR-FL and
  every baseline here: weights + momentum = 2), `S = payload_bytes` each.
* `seconds`: the seconds the simulated clock charges for a round (`marfl_jax.clock`).
* `combine`: how a group combines the copies it receives through a lossy codec
  (`marfl_jax.mixing.coded_*`). A wire without one refuses a lossy --codec (`coded_combine`);
  a wire without `seconds` refuses --network. No wire ever falls back on another's rules.

The registered wires (bytes; seconds and combine as named):
* `allgather`: every member receives the other members' payloads: (|g| - 1) messages per member
  per round, as the MAR-FL authors count. Also AR-FL (one group), gossip (pairs). Timed by
  `clock.allgather`; each member averages its exact copy with the decoded others.
* `butterfly`: reduce-scatter + all-gather inside each group: a group of g moves exactly
  2(g - 1) payloads in total, 2(g - 1)/g per member. `clock.butterfly`; each slice's owner
  reduces it and sends it encoded.
* `star`: a server: each present peer uploads once and downloads once per round (FedAvg).
  `clock.star`; the server sends the decoded mean encoded.
* `relay`: RDFL's ring arcs, every model relayed around its arc: allgather's bytes and combine
  (each member receives every other payload unchanged), timed as n - 1 hops (`clock.relay`).

MKD (`marfl_jax.mkd`) adds, in its iterations, a pass over the same groups in which members
receive each other's weights only: (|g| - 1) single-payload messages per member per round, whatever
the averaging's wire (distillation needs every mate's whole model). With the allgather wire
a KD iteration costs 3/2 of a plain one: N*G*(M - 1)*3S at full participation.

DP (`marfl_jax.dp`) averages a third model-sized tensor (the smoothed update) and a 4-byte clip
indicator: `payloads_per_message = 3` plus `scalar_bytes = 4` sent through the same wire.

Coordination metadata is reported apart from model payloads: MAR-FL peers announce their group
key through a DHT, one small record per present peer per round (`DHT_RECORD_BYTES`, an assumed
size: a key of up to 56 bytes such as "matchmake_<key>-<iteration>-<round>_<peer>" and an 8-byte
value); the other algorithms form their groups without a DHT (`metadata_record_bytes = 0`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import numpy as np

from marfl_jax import clock, mixing
from marfl_jax.registry import ConfigError, Registry


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


Cost = Callable[[np.ndarray, int, int], WireCost]


class Wire(NamedTuple):
    """One way of exchanging messages inside a group, all it implies in one object.

    Attributes:
      cost: the bytes the ledger counts, `(sizes (G, N) member group sizes, payload_bytes,
        payloads_per_message) -> WireCost`, exact integers.
      seconds: the seconds the clock charges for one round, `(ids (N,) group ids, num_groups,
        links, message_bytes, server_bps) -> clock.RoundTimes` (inside jit); None: the wire
        cannot be timed (a run with --network is refused).
      combine: how a group combines the copies it receives through a lossy codec,
        `(tree (N, ...), ids (N,), num_groups, roundtrip, unit) -> tree` (`mixing.coded_*`);
        None: a lossy --codec is refused on this wire (never another wire's rule instead).
      slices: each member reduces only its slice of the message (butterfly), so a group rule
        other than the mean, or an attack, would run per slice: refused at validation.
      group_seconds: `seconds` for one group on the host, `(links of its n >= 2 members as
        NumPy arrays, message_bytes, server_bps) -> its completion` (the asynchronous
        timeline's); None: the timeline runs `seconds` on the CPU for each group.
    """

    cost: Cost
    seconds: Callable[..., clock.RoundTimes] | None = None
    combine: Callable[..., Any] | None = None
    slices: bool = False
    group_seconds: Callable[..., float] | None = None


ALLGATHER = Wire(allgather_cost, clock.allgather, mixing.coded_allgather,
                 group_seconds=clock.allgather_group)
# RDFL's ring: every model is relayed around the arc, so each member receives the others'
# payloads unchanged (allgather's bytes and combine), in n - 1 hops (the relay's seconds).
RELAY = Wire(allgather_cost, clock.relay, mixing.coded_allgather,
             group_seconds=clock.relay_group)

WIRE_MODELS: Registry[Wire] = Registry("wire")
WIRE_MODELS.register("allgather", ALLGATHER)
WIRE_MODELS.register("butterfly", Wire(butterfly_cost, clock.butterfly, mixing.coded_butterfly,
                                       slices=True, group_seconds=clock.butterfly_group))
WIRE_MODELS.register("star", Wire(star_cost, clock.star, mixing.coded_server,
                                  group_seconds=clock.star_group))
WIRE_MODELS.register("relay", RELAY)


def get_wire(wire: str | Wire) -> Wire:
    """The Wire itself, or the one registered under its name (ConfigError if none)."""
    if isinstance(wire, Wire):
        return wire
    return WIRE_MODELS.get(wire)


def wire_label(wire: str | Wire) -> str:
    """A wire for messages: its name, or its cost function's for an unregistered object."""
    return repr(wire) if isinstance(wire, str) else repr(getattr(wire.cost, "__name__", wire))


def coded_combine(wire: str | Wire):
    """The wire's way of combining coded copies; ConfigError when it has none."""
    combine = get_wire(wire).combine
    if combine is None:
        raise ConfigError(f"--codec: the wire {wire_label(wire)} does not say how a group "
                          "combines copies received through a lossy codec (Wire.combine is "
                          "None); use --codec=float32 or give the wire a combine")
    return combine


def tree_bytes(tree) -> int:
    """Bytes of one peer's copy of a pytree (leaves without the peer axis), as a Python int."""
    return sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


@dataclasses.dataclass
class Ledger:
    """Running totals of network traffic; `record` returns one iteration's metrics row."""

    payload_bytes: int  # S: bytes of one model-sized payload.
    payloads_per_message: int
    wire: str | Wire = "allgather"  # A name in WIRE_MODELS or a Wire (held resolved).
    metadata_record_bytes: int = 0
    scalar_bytes: int = 0  # A small extra value averaged next to the payloads (DP's indicator).
    cumulative_bytes: int = 0
    cumulative_metadata_bytes: int = 0
    cumulative_payloads: int = 0
    cumulative_messages: int = 0

    TOTALS = ("cumulative_bytes", "cumulative_payloads", "cumulative_messages",
              "cumulative_metadata_bytes")

    def __post_init__(self):
        self.wire = get_wire(self.wire)

    def state(self) -> dict[str, int]:
        """The running totals, JSON-able (checkpoints)."""
        return {name: getattr(self, name) for name in self.TOTALS}

    def restore(self, state: dict[str, int]) -> Ledger:
        """This ledger with the totals of `state` (a resumed run's)."""
        return dataclasses.replace(self, **{name: int(state[name]) for name in self.TOTALS})

    def record(self, sizes: np.ndarray, distilled: bool = False) -> dict[str, int]:
        """sizes: (G, N) member group sizes of one iteration; distilled: an MKD iteration, whose
        weight exchange over the same groups is added (and reported as `mkd_bytes`)."""
        cost = self.wire.cost(sizes, self.payload_bytes, self.payloads_per_message)
        extra = (ALLGATHER.cost(sizes, self.payload_bytes, 1) if distilled
                 else WireCost(0, 0, 0, 0))
        scalars = (self.wire.cost(sizes, self.scalar_bytes, 1).bytes
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
