"""Asynchronous Moshpit on the host: who meets whom, and at what simulated second.

A peer runs its own loop, with no global barrier:

    local phase (b x B examples at its speed) -> round 0 -> ... -> round G-1 -> local phase ...

In round r a peer that is ready looks for mates: the ready peers of round r with its Moshpit key
(`marfl.KeyRule`; gossip: every ready peer shares one key, groups of 2). The first to arrive
opens a group; the group closes when it has M members or when `window_s` has passed since it
opened, whichever comes first. A group of one at its close has found no mate: the peer ends its
averaging and starts its next local phase ("trains on"). A group of two or more exchanges on the
wire (`group_seconds(members) -> seconds`, the clock's timing of that one group) and all its
members move on when the exchange is over, each with its next key (its rank among the members by
peer id, as the synchronous schedule's chunk index). After round G-1 (or a group of one) the keys
restart and the next local phase begins.

Churn, per peer and local phase (host draws from the seed): with probability `update_fraction` the
peer trains, with `aggregate_fraction` it averages afterwards, and an averaging peer drops out
with probability `dropout` before round 0 ('before') or before a uniform random round ('mid'). A
peer that does neither emits no event for as long as its previous phase took (its local phase's
compute time if it has none).

The timeline is a pure function of its settings (no device result feeds back into it), so a
resumed run replays it from second 0 and meets the same groups at the same seconds.

Device work comes out as `Train` and `Mix` operations, each at the simulated second it
completes. `waves` orders one stretch of them into dependency layers: a wave is one jitted step
(its groups combine, then its peers train), and a peer's operations keep their order.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Sequence
from typing import NamedTuple

import numpy as np

# Event kinds, in the order simultaneous events are handled (then by arrival order).
_CLOSE, _READY, _PHASE = 0, 1, 2


class Train(NamedTuple):
    """Peer `peer`'s local phase number `version` (from 0), done at second `time`."""

    peer: int
    version: int
    time: float


class Mix(NamedTuple):
    """A group of round `round` that closed at second `close` and finished its exchange at
    `time`: `peers` sorted by id, `staleness` the gap between its members' local phase counts.
    A group of one peer is a window that ended without a mate (no exchange, no device work)."""

    peers: tuple[int, ...]
    round: int
    close: float
    time: float
    staleness: int


class Churn(NamedTuple):
    """Per-phase participation probabilities (see the module docstring)."""

    update_fraction: float = 1.0
    aggregate_fraction: float = 1.0
    dropout: float = 0.0
    dropout_timing: str = "before"


class Keys(NamedTuple):
    """The Moshpit key schedule in NumPy: initial keys (N,), `group_of(keys, r)` and
    `next_key(keys, chunk, r)` on arrays (`marfl_jax.algorithms.marfl.KeyRule`)."""

    initial: np.ndarray
    group_of: Callable
    next_key: Callable


def one_key(num_peers: int) -> Keys:
    """Every peer holds key 0 in every round (gossip: any two ready peers pair up)."""
    zero = np.zeros(num_peers, np.int64)
    return Keys(zero, lambda keys, r: keys, lambda keys, chunk, r: keys)


class _Group:
    __slots__ = ("round", "key", "opened", "members", "closed")

    def __init__(self, round_, key, opened):
        self.round, self.key, self.opened = round_, key, opened
        self.members, self.closed = [], False


class Timeline:
    """The event loop. `advance(until)` handles every event up to second `until` and returns the
    operations that completed by then, in completion order (ties: in the order they were made).

    Args:
      keys: the Moshpit keys (`Keys`).
      num_rounds: G, rounds after each local phase.
      group_size: M, a group closes at once when it has M members.
      window_s: how long a group stays open for mates after its first member arrives.
      compute_s: (N,) seconds of each peer's local phase.
      group_seconds: members (tuple of peer ids, sorted) -> seconds of their exchange.
      has_data: (N,) bool, peers with training examples (the others never train).
      churn: per-phase participation; None = everyone, every phase.
      seed: the host draws' seed (churn).
    """

    def __init__(self, keys: Keys, num_rounds: int, group_size: int, window_s: float,
                 compute_s: np.ndarray, group_seconds: Callable[[tuple[int, ...]], float],
                 has_data: np.ndarray | None = None, churn: Churn | None = None, seed: int = 0):
        self.num_peers = n = len(compute_s)
        self.keys_rule, self.num_rounds, self.group_size = keys, num_rounds, group_size
        self.window_s, self.compute_s = float(window_s), np.asarray(compute_s, np.float64)
        self.group_seconds = group_seconds
        self.has_data = np.ones(n, bool) if has_data is None else np.asarray(has_data, bool)
        self.churn = churn
        self.rng = np.random.default_rng([seed, 0x6173796E63])  # "async": apart from the rest.
        self.keys = np.asarray(keys.initial, np.int64).copy()
        self.version = np.zeros(n, np.int64)  # Local phases done.
        self.leaves_at = np.full(n, num_rounds, np.int64)  # The round a dropping peer skips.
        self.phase_start = np.zeros(n, np.float64)
        self.last_phase_s = self.compute_s.copy()
        self.sitting_out = np.zeros(n, bool)  # Peers sitting out their current phase.
        self._open: dict[tuple[int, int], _Group] = {}
        self._events: list = []
        self._made: list = []  # Operations made, not yet returned: (time, seq, op).
        self._seq = 0
        self.now = 0.0
        for peer in range(n):
            self._push(0.0, _PHASE, peer)

    def _push(self, time: float, kind: int, data) -> None:
        heapq.heappush(self._events, (time, kind, self._seq, data))
        self._seq += 1

    def _made_op(self, op) -> None:
        heapq.heappush(self._made, (op.time, self._seq, op))
        self._seq += 1

    def advance(self, until: float) -> list:
        """Every event up to second `until`; the operations done by then, in order."""
        while self._events and self._events[0][0] <= until:
            time, kind, _, data = heapq.heappop(self._events)
            self.now = time
            (self._close, self._ready, self._phase)[kind](time, data)
        done = []
        while self._made and self._made[0][0] <= until:
            done.append(heapq.heappop(self._made)[2])
        return done

    # -- Events. ------------------------------------------------------------------------------

    def _phase(self, time: float, peer: int) -> None:
        """Peer `peer` starts a local phase (or sits it out)."""
        self.last_phase_s[peer] = time - self.phase_start[peer] or self.last_phase_s[peer]
        self.phase_start[peer] = time
        self.keys[peer] = self.keys_rule.initial[peer]
        trains, averages = True, True
        churn = self.churn
        if churn is not None:
            u = self.rng.random(3)
            trains = u[0] < churn.update_fraction
            averages = u[1] < churn.aggregate_fraction
            self.leaves_at[peer] = self.num_rounds
            if averages and u[2] < churn.dropout:
                self.leaves_at[peer] = (0 if churn.dropout_timing == "before"
                                        else int(self.rng.integers(self.num_rounds)))
        trains = trains and bool(self.has_data[peer])
        self.sitting_out[peer] = not trains and not averages
        if not trains and not averages:
            self._push(time + self.last_phase_s[peer], _PHASE, peer)
            return
        ready = time
        if trains:
            ready = time + self.compute_s[peer]
            self._made_op(Train(peer, int(self.version[peer]), ready))
            self.version[peer] += 1
        if averages and self.leaves_at[peer] > 0:
            self._push(ready, _READY, (peer, 0))
        else:
            self._push(ready, _PHASE, peer)

    def _ready(self, time: float, data) -> None:
        """A peer looks for mates in round r."""
        peer, r = data
        key = int(self.keys_rule.group_of(self.keys[peer:peer + 1], r)[0])
        group = self._open.get((r, key))
        if group is None:
            group = _Group(r, key, time)
            self._open[(r, key)] = group
            self._push(time + self.window_s, _CLOSE, group)
        group.members.append(peer)
        if len(group.members) >= self.group_size:
            self._close(time, group)

    def _close(self, time: float, group: _Group) -> None:
        """A group closes (full, or its window ended): it exchanges, or its one member trains
        on."""
        if group.closed:
            return
        group.closed = True
        del self._open[(group.round, group.key)]
        members = tuple(sorted(group.members))
        r = group.round
        if len(members) == 1:  # No mate: recorded (its key was announced), nothing mixed.
            self._made_op(Mix(members, r, time, time, 0))
            self._push(time, _PHASE, members[0])
            return
        done = time + float(self.group_seconds(members))
        versions = self.version[list(members)]
        self._made_op(Mix(members, r, time, done, int(versions.max() - versions.min())))
        ids = np.asarray(members)
        self.keys[ids] = self.keys_rule.next_key(
            self.keys_rule.group_of(self.keys[ids], r), np.arange(len(members)), r)
        for peer in members:
            if r + 1 < self.leaves_at[peer]:
                self._push(done, _READY, (peer, r + 1))
            else:
                self._push(done, _PHASE, peer)


class Wave(NamedTuple):
    """One device step: its groups combine, then its peers train.

    Attributes:
      mixes: the groups (`Mix`), disjoint.
      trains: the local phases (`Train`), one per peer at most.
    """

    mixes: tuple[Mix, ...]
    trains: tuple[Train, ...]

    @property
    def size(self) -> int:
        """Peers the wave touches (a peer that combines and trains counts once)."""
        return len({p for m in self.mixes for p in m.peers} | {t.peer for t in self.trains})


def waves(ops: Sequence[Train | Mix]) -> list[Wave]:
    """The operations (in completion order) as dependency layers: each operation goes into the
    earliest wave after its peers' previous operations (a peer's training may share the wave of
    the group it just left: in a wave groups combine first)."""
    last: dict[int, tuple[int, bool]] = {}  # Peer -> (wave, whether it trained there).
    layers: list[tuple[list, list]] = []
    for op in ops:
        if isinstance(op, Train):
            wave, trained = last.get(op.peer, (-1, True))
            w = wave + 1 if trained else wave
            peers = (op.peer,)
        else:
            w = max((last.get(p, (-1, True))[0] + 1 for p in op.peers), default=0)
            peers = op.peers
        while len(layers) <= w:
            layers.append(([], []))
        layers[w][isinstance(op, Train)].append(op)
        for p in peers:
            last[p] = (w, isinstance(op, Train))
    return [Wave(tuple(m), tuple(t)) for m, t in layers]
