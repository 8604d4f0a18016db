"""Local training and evaluation, written for one peer and vmapped over the peer axis.

Momentum SGD exactly as the paper's authors implement it (DESIGN.md section 3.1):
`m <- beta*m + (1-beta)*g; theta <- theta - eta*m`, i.e. optax
`chain(ema(beta, debias=False), scale(-eta))`. Its state (the EMA) is what MAR-FL averages as
"momentum" next to the weights.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax

# (params, x (B, ...), rng) -> logits (B, C). rng=None: evaluation mode; a key: training mode
# (dropout, for models that have it).
ApplyFn = Callable[..., jax.Array]


def momentum_sgd(learning_rate: float, momentum: float) -> optax.GradientTransformation:
    """The authors' EMA momentum SGD."""
    return optax.chain(optax.ema(momentum, debias=False), optax.scale(-learning_rate))


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Mean softmax cross-entropy. logits (B, C), labels (B,) int -> scalar."""
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def sgd_pass(params, opt_state, batches, loss_fn, key: jax.Array | None, *,
             optimizer: optax.GradientTransformation):
    """One optimizer step per batch, in order (a `lax.scan`).

    Args:
      params, opt_state: one peer's (no peer axis).
      batches: a pytree whose leaves have a leading axis b (one entry per step).
      loss_fn: (params, batch, rng) -> scalar loss; rng is None when key is None.
      key: None, or a PRNG key split into one training-mode key per step (dropout).
    Returns:
      (params, opt_state, losses (b,)).
    """
    num_steps = jax.tree.leaves(batches)[0].shape[0]
    keys = None if key is None else jax.random.split(key, num_steps)

    def step(carry, inputs):
        p, s = carry
        batch, rng = inputs
        loss, grads = jax.value_and_grad(loss_fn)(p, batch, rng)
        updates, s = optimizer.update(grads, s, p)
        return (optax.apply_updates(p, updates), s), loss

    (params, opt_state), losses = jax.lax.scan(step, (params, opt_state), (batches, keys))
    return params, opt_state, losses


def local_sgd(params, opt_state, images: jax.Array, labels: jax.Array,
              key: jax.Array | None = None, *, apply_fn: ApplyFn,
              optimizer: optax.GradientTransformation):
    """One peer's local update: b steps of SGD, one per mini-batch.

    Args:
      params, opt_state: one peer's (no peer axis).
      images: (b, B, ...) float32 inputs; labels: (b, B) int32.
      key: the peer's dropout key for this update (None: no training-mode randomness).
    Returns:
      (params, opt_state, mean training loss over the b steps).
    """
    def loss_fn(p, batch, rng):
        x, y = batch
        return cross_entropy(apply_fn(p, x, rng), y)

    params, opt_state, losses = sgd_pass(params, opt_state, (images, labels), loss_fn, key,
                                         optimizer=optimizer)
    return params, opt_state, losses.mean()


def chunked_vmap(fn, chunk: int = 0):
    """`jax.vmap(fn)` evaluated over the leading axis in sequential chunks of `chunk` peers (a
    `lax.map` over whole chunks, then one vmapped call on the remainder); 0 = all at once.

    Chunks bound the activation memory to `chunk` peers' worth and keep a chunk's parameters in
    cache through all of its fused local steps. The results equal `jax.vmap(fn)`'s.
    """
    vectorized = jax.vmap(fn)

    def run(*args):
        n = jax.tree.leaves(args)[0].shape[0]
        if not chunk or chunk >= n:
            return vectorized(*args)
        whole, rest = divmod(n, chunk)
        split = whole * chunk
        head = jax.tree.map(lambda x: x[:split].reshape((whole, chunk) + x.shape[1:]), args)
        out = jax.lax.map(lambda a: vectorized(*a), head)
        out = jax.tree.map(lambda x: x.reshape((split,) + x.shape[2:]), out)
        if rest:
            tail = vectorized(*jax.tree.map(lambda x: x[split:], args))
            out = jax.tree.map(lambda a, b: jnp.concatenate([a, b]), out, tail)
        return out

    return run


def peers_local_sgd(params, opt_state, images, labels, active, keys=None, *, apply_fn,
                    optimizer, peer_chunk: int = 0):
    """`local_sgd` for every peer at once; inactive peers keep their state.

    Args:
      params, opt_state: pytrees with leading peer axis N.
      images: (N, b, B, ...); labels: (N, b, B); active: (N,) bool.
      keys: (N,) per-peer dropout keys, or None.
      peer_chunk: process the peers in sequential chunks of this many (0 = all at once).
    Returns:
      (params, opt_state, losses (N,)); the loss of an inactive peer is 0.
    """
    run = chunked_vmap(lambda p, s, x, y, k: local_sgd(p, s, x, y, k, apply_fn=apply_fn,
                                                       optimizer=optimizer), peer_chunk)
    new_params, new_state, losses = run(params, opt_state, images, labels, keys)

    def keep_inactive(new, old):
        return jnp.where(active.reshape((-1,) + (1,) * (new.ndim - 1)), new, old)

    new_params = jax.tree.map(keep_inactive, new_params, params)
    new_state = jax.tree.map(keep_inactive, new_state, opt_state)
    return new_params, new_state, jnp.where(active, losses, 0.0)


def evaluate(params, images: jax.Array, labels: jax.Array, *, apply_fn: ApplyFn,
             batch_size: int = 250):
    """Accuracy and mean loss of ONE model on a whole test set, in batches to bound memory.

    Args:
      params: one model (no peer axis).
      images: (n, ...) float32; labels: (n,) int32. n need not divide by batch_size.
    Returns:
      (accuracy, loss) float32 scalars.
    """
    n = labels.shape[0]
    num_batches = -(-n // batch_size)
    pad = num_batches * batch_size - n
    images = jnp.pad(images, [(0, pad)] + [(0, 0)] * (images.ndim - 1))
    labels = jnp.pad(labels, (0, pad))
    valid = jnp.arange(num_batches * batch_size) < n

    def batch_stats(batch):
        x, y, v = batch
        logits = apply_fn(params, x, None)
        losses = optax.softmax_cross_entropy_with_integer_labels(logits, y)
        correct = (logits.argmax(-1) == y)
        return (jnp.where(v, correct, False).sum(), jnp.where(v, losses, 0.0).sum())

    shaped = (images.reshape((num_batches, batch_size) + images.shape[1:]),
              labels.reshape(num_batches, batch_size), valid.reshape(num_batches, batch_size))
    correct, loss = jax.lax.map(batch_stats, shaped)
    return correct.sum() / n, loss.sum() / n


def evaluate_peers(params, images, labels, *, apply_fn: ApplyFn, batch_size: int = 250):
    """`evaluate` for K models one after another (bounded memory). params: leading axis K.
    Returns (accuracy (K,), loss (K,))."""
    return jax.lax.map(
        lambda p: evaluate(p, images, labels, apply_fn=apply_fn, batch_size=batch_size), params)
