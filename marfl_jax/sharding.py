"""The peer axis sharded over devices: those of one host, or of several processes.

With several devices (GPUs, or CPU devices forced with
`XLA_FLAGS=--xla_force_host_platform_device_count=K` set before jax is imported) and N divisible
by their number, every array with a leading peer axis is split along it (`PartitionSpec("peers")`)
and the shared training array and test set are replicated. The jitted iteration then runs each
device's peers where they live; group means need cross-device sums, which XLA inserts. The mesh
axis is `Auto`, and the iteration constrains its returned state to the same sharding, so no step
silently gathers the state onto one device.

Several processes (hosts) join through `jax.distributed` (`initialize_distributed`, called by the
launcher from `--coordinator_address`, `--num_processes`, `--process_id`): the mesh then spans
every process's devices, each process builds the same host data and contributes its own shards
(`to_global`), and values come back to every host whole (`to_host`).
"""

from __future__ import annotations

import jax
import numpy as np
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


def initialize_distributed(coordinator_address: str, num_processes: int,
                           process_id: int) -> None:
    """Joins this process to a multi-process run (CPU collectives over gloo). Call before any
    other JAX work."""
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=coordinator_address,
                               num_processes=num_processes, process_id=process_id)


def is_primary() -> bool:
    """The process that writes the run's files."""
    return jax.process_index() == 0


def barrier(name: str) -> None:
    """Waits for every process (a no-op in a single-process run)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def to_global(tree, placement: NamedSharding):
    """Host values (identical in every process) as arrays placed by `placement`; each process
    supplies only its addressable shards."""
    def place(x):
        host = np.asarray(x)
        return jax.make_array_from_callback(host.shape, placement, lambda index: host[index])

    return jax.tree.map(place, tree)


def to_host(tree):
    """Every leaf as a whole numpy array on this host (gathered across processes if needed)."""
    if jax.process_count() == 1:
        return jax.device_get(tree)
    from jax.experimental import multihost_utils

    return multihost_utils.process_allgather(tree, tiled=True)


def shard_peers(tree, mesh: Mesh | None):
    """Places every leaf (leading axis N) split by peer; identity without a mesh."""
    return tree if mesh is None else to_global(tree, by_peer(mesh))


def replicate(tree, mesh: Mesh | None):
    """Places every leaf whole on every device of the mesh; identity without a mesh."""
    return tree if mesh is None else to_global(tree, replicated(mesh))


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
