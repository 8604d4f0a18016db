"""The peer axis sharded over the devices of one host.

With several devices (GPUs, or CPU devices forced with
`XLA_FLAGS=--xla_force_host_platform_device_count=K` set before jax is imported) and N divisible
by their number, every array with a leading peer axis is split along it (`PartitionSpec("peers")`)
and the shared training array and test set are replicated. The jitted iteration then runs each
device's peers where they live; group means need cross-device sums, which XLA inserts. The mesh
axis is `Auto`, and the iteration constrains its returned state to the same sharding, so no step
silently gathers the state onto one device (DESIGN.md section 4).
"""

from __future__ import annotations

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

PEER_AXIS = "peers"


def peer_mesh(num_peers: int, devices=None) -> Mesh | None:
    """A 1-d mesh over the devices for N peers, or None (one device, or N not divisible)."""
    devices = list(devices if devices is not None else jax.devices())
    if len(devices) < 2 or num_peers % len(devices):
        return None
    return jax.make_mesh((len(devices),), (PEER_AXIS,),
                         axis_types=(jax.sharding.AxisType.Auto,), devices=devices)


def by_peer(mesh: Mesh) -> NamedSharding:
    """Leading axis split over the mesh's devices."""
    return NamedSharding(mesh, PartitionSpec(PEER_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def shard_peers(tree, mesh: Mesh | None):
    """Places every leaf (leading axis N) split by peer; identity without a mesh."""
    return tree if mesh is None else jax.device_put(tree, by_peer(mesh))


def constrain_peers(tree, mesh: Mesh | None):
    """Inside jit: keeps every leaf split by peer; identity without a mesh."""
    if mesh is None:
        return tree
    return jax.tree.map(lambda x: jax.lax.with_sharding_constraint(x, by_peer(mesh)), tree)


def abstract_by_peer(tree, mesh: Mesh | None):
    """ShapeDtypeStructs of `tree` carrying the peer sharding (for lowering before allocating)."""
    if mesh is None:
        return tree
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=by_peer(mesh)),
                        tree)
