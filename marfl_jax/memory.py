"""Device-memory estimate of a run, made before anything large is allocated.

The stacked state's size comes from `jax.eval_shape` (nothing allocated); the jitted iteration's
own need comes from XLA's analysis of the compiled step (`memory_analysis()`: its outputs and
temporaries, less what it writes in place of donated inputs). Their sum, with the device-resident
data, is compared with the memory available on the device (CPU: the kernel's MemAvailable; GPU:
its allocator's limit less what is in use), and a run that would not fit is refused with the
flags that change it.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import numpy as np
from absl import logging

from marfl_jax.config import ConfigError

GB = 1e9


def tree_nbytes(tree) -> int:
    """Bytes of all leaves (arrays or ShapeDtypeStructs)."""
    return sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize
               for x in jax.tree.leaves(tree) if hasattr(x, "dtype"))


def device_label(device: jax.Device | None = None) -> str:
    """The device as skip messages name it: 'gpu NVIDIA H200', 'tpu TPU v5 lite', 'cpu'."""
    device = device or jax.devices()[0]
    kind = str(getattr(device, "device_kind", "") or "")
    return device.platform if kind.lower() in ("", device.platform) else (
        f"{device.platform} {kind}")


def available_bytes(device: jax.Device | None = None) -> int | None:
    """Memory one device can still give, or None when unknown. An accelerator is judged by its
    own allocator's figures (`memory_stats()`: bytes_limit - bytes_in_use), never by the host's
    RAM; the CPU by the kernel's MemAvailable."""
    device = device or jax.devices()[0]
    if device.platform != "cpu":
        stats = device.memory_stats() or {}
        if "bytes_limit" in stats:
            return int(stats["bytes_limit"]) - int(stats.get("bytes_in_use", 0))
        return None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


class MemoryEstimate(NamedTuple):
    """What one device holds: its share of the peer-sharded state, the (replicated) data, and
    the compiled iteration's own buffers (XLA reports them per device)."""

    state_bytes: int  # The stacked state of the device's peers.
    data_bytes: int  # Training data, index tables, test set on the device.
    step_bytes: int  # What one jitted iteration allocates beyond its donated input.

    @property
    def total_bytes(self) -> int:
        return self.state_bytes + self.data_bytes + self.step_bytes

    def describe(self) -> str:
        return (f"{self.total_bytes / GB:.2f} GB (state {self.state_bytes / GB:.2f} GB, data "
                f"{self.data_bytes / GB:.2f} GB, one iteration {self.step_bytes / GB:.2f} GB)")


def step_bytes(compiled) -> int:
    """Outputs + temporaries - donated (aliased) bytes of a compiled step; 0 if not reported."""
    analysis = compiled.memory_analysis()
    if analysis is None:
        return 0
    logging.info("compiled step: arguments %.3f GB, outputs %.3f GB, temporaries %.3f GB, "
                 "aliased %.3f GB", analysis.argument_size_in_bytes / GB,
                 analysis.output_size_in_bytes / GB, analysis.temp_size_in_bytes / GB,
                 analysis.alias_size_in_bytes / GB)
    return max(0, int(analysis.output_size_in_bytes) + int(analysis.temp_size_in_bytes)
               - int(analysis.alias_size_in_bytes))


def largest_fitting_peers(estimate: MemoryEstimate, limit_bytes: int, *, num_peers: int,
                          peer_chunk: int) -> int:
    """About the most peers that fit in `limit_bytes` at these settings: the state grows with N,
    the data does not, one iteration's buffers grow with N when all peers run at once (0
    chunk) and not with chunks (0 when not even the fixed part fits)."""
    per_peer = estimate.state_bytes / max(num_peers, 1)
    fixed = estimate.data_bytes
    if peer_chunk:
        fixed += estimate.step_bytes
    else:
        per_peer += estimate.step_bytes / max(num_peers, 1)
    if per_peer <= 0:
        return num_peers
    return max(0, int((limit_bytes - fixed) // per_peer))


def mem_fraction_hint(environ=None) -> str:
    """What jax gives itself of a GPU, and how to give it more (read when the backend starts)."""
    import os

    environ = os.environ if environ is None else environ
    fraction = environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION")
    now = f"now {fraction}" if fraction else "now 0.75, jax's default"
    return (f"on a GPU, jax takes XLA_PYTHON_CLIENT_MEM_FRACTION of its memory ({now}): set "
            "e.g. XLA_PYTHON_CLIENT_MEM_FRACTION=0.95 before jax starts to give it more")


def check_fits(estimate: MemoryEstimate, limit_bytes: int | None, *, num_peers: int,
               peer_chunk: int) -> None:
    """Raises ConfigError naming the flags to change, and about the most peers that fit at
    these settings, when the estimate exceeds the limit."""
    if limit_bytes is None or estimate.total_bytes <= limit_bytes:
        return
    chunk_hint = ("a smaller --peer_chunk" if peer_chunk else
                  f"--peer_chunk (e.g. --peer_chunk={max(1, num_peers // 16)}) to bound the "
                  "activations")
    fitting = largest_fitting_peers(estimate, limit_bytes, num_peers=num_peers,
                                    peer_chunk=peer_chunk)
    raise ConfigError(
        f"--num_peers={num_peers} needs about {estimate.describe()}, more than the "
        f"{limit_bytes / GB:.2f} GB available; use {chunk_hint}, fewer --num_peers (about "
        f"{fitting:,} fit at these settings), or raise --memory_limit_gb if the estimate is too "
        f"cautious; {mem_fraction_hint()}")
