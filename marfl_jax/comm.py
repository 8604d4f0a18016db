"""What crosses the (simulated) network: payload counts inside jit, exact bytes on the host.

A *message* is what one peer receives from one other peer in one round; it carries
`payloads_per_message` model-sized tensors (MAR-FL: weights + momentum = 2). Counts are small
integers computed in the jitted step from group sizes; bytes are `payloads x payload_bytes`
multiplied on the host in Python integers, so they are exact at any scale.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from marfl_jax import mixing


def allgather_messages(schedule: jax.Array, num_groups: int) -> jax.Array:
    """Messages each peer receives under all-gather inside groups, as the authors count:
    (|g| - 1) per member per round. schedule: (G, N) group ids -> (N,) int32."""
    def received(round_ids):
        return jnp.maximum(mixing.member_group_sizes(round_ids, num_groups) - 1, 0)

    return jax.vmap(received)(schedule).sum(axis=0)


def tree_bytes(tree) -> int:
    """Bytes of one peer's copy of a pytree (leaves without the peer axis), as a Python int."""
    return sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


@dataclasses.dataclass
class Ledger:
    """Running totals of network traffic. `record` takes the per-peer message counts of one
    iteration and returns that iteration's row of exact integers."""

    payload_bytes: int  # S: bytes of one model-sized payload.
    payloads_per_message: int  # MAR-FL: 2 (weights and momentum).
    cumulative_bytes: int = 0
    cumulative_payloads: int = 0
    cumulative_messages: int = 0

    def record(self, messages_per_peer: np.ndarray) -> dict[str, int]:
        per_peer = np.asarray(messages_per_peer, dtype=np.int64)
        messages = int(per_peer.sum())
        payloads = messages * self.payloads_per_message
        iteration_bytes = payloads * self.payload_bytes
        self.cumulative_messages += messages
        self.cumulative_payloads += payloads
        self.cumulative_bytes += iteration_bytes
        max_peer = int(per_peer.max()) if per_peer.size else 0
        return {
            "bytes": iteration_bytes,
            "cumulative_bytes": self.cumulative_bytes,
            "payloads": payloads,
            "messages": messages,
            "max_peer_bytes": max_peer * self.payloads_per_message * self.payload_bytes,
        }
