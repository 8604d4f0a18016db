"""Local training and evaluation, written for one peer and vmapped over the peer axis.

Momentum SGD exactly as the paper's authors implement it (docs/design.md §3.1):
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
    """Mean softmax cross-entropy. logits (B, C), labels (B,) int -> scalar.

    Written with a one-hot product rather than optax's integer-label form: that one picks the
    label's logit with `take_along_axis`, whose gradient is a float scatter-add (serialised
    under XLA's deterministic GPU ops); this gradient, softmax - one_hot, is elementwise."""
    one_hot = jax.nn.one_hot(labels, logits.shape[-1], dtype=logits.dtype)
    return -(one_hot * jax.nn.log_softmax(logits)).sum(-1).mean()


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


def peers_local_sgd(params, opt_state, images, labels, active, keys=None, *, apply_fn,
                    optimizer, peer_chunk: int = 0):
    """`local_sgd` for every peer at once; inactive peers keep their state.

    With `peer_chunk` = C > 0 the peers are trained C at a time in a `fori_loop` that updates the
    (donated) state in place, chunk after chunk (the last one overlapping the one before when C
    does not divide N): memory beyond the state is one chunk's gradients and activations, and a
    chunk's parameters stay in cache through all of its fused local steps. The results equal the
    all-at-once path's.

    Args:
      params, opt_state: pytrees with leading peer axis N.
      images: (N, b, B, ...); labels: (N, b, B); active: (N,) bool.
      keys: (N,) per-peer dropout keys, or None.
      peer_chunk: peers per chunk (0 = all at once).
    Returns:
      (params, opt_state, losses (N,)); the loss of an inactive peer is 0.
    """
    one_peer = jax.vmap(lambda p, s, x, y, k: local_sgd(p, s, x, y, k, apply_fn=apply_fn,
                                                        optimizer=optimizer))

    def update(p, s, x, y, a, k):  # Leaves with a leading axis of some peers.
        new_p, new_s, losses = one_peer(p, s, x, y, k)

        def keep_inactive(new, old):
            return jnp.where(a.reshape((-1,) + (1,) * (new.ndim - 1)), new, old)

        return (jax.tree.map(keep_inactive, new_p, p), jax.tree.map(keep_inactive, new_s, s),
                jnp.where(a, losses, 0.0))

    num_peers = active.shape[0]
    if not peer_chunk or peer_chunk >= num_peers:
        return update(params, opt_state, images, labels, active, keys)
    num_chunks = -(-num_peers // peer_chunk)
    inputs = (images, labels, active, keys)

    def take(x, start):
        return jax.lax.dynamic_slice_in_dim(x, start, peer_chunk)

    def chunk_start(i):  # When C does not divide N, the last chunk overlaps the one before.
        return jnp.minimum(i * peer_chunk, num_peers - peer_chunk)

    def train_chunk(state, i):
        """Chunk i's new (params, opt_state, losses), leading axis C. Peers of an overlapping
        last chunk that are already trained are kept as they are."""
        start = chunk_start(i)
        p, s, losses = jax.tree.map(lambda x: take(x, start), state)
        x, y, a, k = jax.tree.map(lambda x: take(x, start), inputs)
        fresh = start + jnp.arange(peer_chunk) >= i * peer_chunk
        new_p, new_s, new_losses = update(p, s, x, y, a & fresh, k)
        return new_p, new_s, jnp.where(fresh, new_losses, losses)

    def write_chunk(state, new, start):
        return jax.tree.map(lambda full, part: jax.lax.dynamic_update_slice_in_dim(
            full, part, start, 0), state, new)

    # Chunk i's results are written in step i + 1, inside the loop. Fused straight into the
    # writes, one leaf's update would read another leaf's old buffer while that is overwritten
    # in place, and XLA would copy every peer's state on every chunk (it did with b = 1);
    # carried to the next step, the results are a buffer of their own and the writes stay in
    # place. Step 0 writes chunk 0 back unchanged.
    def step(i, carry):
        state, pending = carry
        state = write_chunk(state, pending, chunk_start(jnp.maximum(i - 1, 0)))
        pending = jax.lax.cond(i < num_chunks, lambda: train_chunk(state, i), lambda: pending)
        return state, pending

    state = (params, opt_state, jnp.zeros(num_peers, jnp.float32))
    unchanged = jax.tree.map(lambda x: take(x, 0), state)
    state, _ = jax.lax.fori_loop(0, num_chunks + 1, step, (state, unchanged))
    return state


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
