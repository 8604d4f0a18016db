"""One local update of the paper CNN as the run does it (N peers x b=4 SGD steps of B=16, the
steps a `lax.scan`, `local.peers_local_sgd`), jitted and donated: the median seconds per call.

    python -m benchmarks.cnn_local_update CONV_IMPL CHUNK UNROLL [N] [REPEATS]

CHUNK: `peer_chunk` (0 = all peers at once); UNROLL=1: chunks as an unrolled Python loop of
vmapped chunks inside the one jit instead of the `fori_loop`; UNROLL_STEPS=1 (environment):
the b-step scan fully unrolled. XLA_FLAGS and GLIBC_TUNABLES are taken from the environment
(set per process: compare settings in separate processes). Issue 29's CPU levers
(benchmarks/RESULTS.md) were measured with it.
"""
import functools
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from marfl_jax import local, models

conv, chunk, unroll = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
N = int(sys.argv[4]) if len(sys.argv) > 4 else 64
R = int(sys.argv[5]) if len(sys.argv) > 5 else 3
if os.environ.get("UNROLL_STEPS"):
    jax.lax.scan = functools.partial(jax.lax.scan, unroll=True)
b, B = 4, 16
jax.config.update("jax_default_matmul_precision", "highest")
model = models.get_model("cnn", 10, conv_impl=conv)
opt = local.momentum_sgd(0.1, 0.9)
x0 = jnp.zeros((1, 28, 28, 1))
params = jax.vmap(lambda k: model.init(k, x0))(jax.random.split(jax.random.key(0), N))
state = jax.vmap(opt.init)(params)
rng = np.random.default_rng(0)
images = jnp.asarray(rng.normal(size=(N, b, B, 28, 28, 1)), jnp.float32)
labels = jnp.asarray(rng.integers(0, 10, (N, b, B)), jnp.int32)
active = jnp.ones(N, bool)


def apply_fn(p, x, rng=None):
    return model.apply(p, x)


if unroll:
    def update(p, s, images, labels):
        outs = []
        for i in range(0, N, chunk):
            def sl(t, i=i):
                return jax.tree.map(lambda a: a[i:i + chunk], t)
            outs.append(local.peers_local_sgd(sl(p), sl(s), images[i:i + chunk],
                                              labels[i:i + chunk], active[i:i + chunk],
                                              apply_fn=apply_fn, optimizer=opt))
        return jax.tree.map(lambda *a: jnp.concatenate(a), *outs)
else:
    def update(p, s, images, labels):
        return local.peers_local_sgd(p, s, images, labels, active, apply_fn=apply_fn,
                                     optimizer=opt, peer_chunk=chunk)
f = jax.jit(update, donate_argnums=(0, 1))
t = time.perf_counter()
out = f(params, state, images, labels)
jax.block_until_ready(out)
compile_s = time.perf_counter() - t
times = []
for _ in range(R):
    p, s, _l = out
    t = time.perf_counter()
    out = f(p, s, images, labels)
    jax.block_until_ready(out)
    times.append(time.perf_counter() - t)
steps_unrolled = bool(os.environ.get("UNROLL_STEPS"))
print(f"{conv:8s} chunk={chunk:3d} unroll={unroll} steps_unrolled={steps_unrolled} N={N}: "
      f"median {statistics.median(times):.3f} s (min {min(times):.3f}, "
      f"first call {compile_s:.1f} s)", flush=True)
