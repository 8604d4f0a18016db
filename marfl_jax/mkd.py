"""Moshpit Knowledge Distillation (MKD): peers learn from their group mates' predictions.

As the MAR-FL authors implement it (docs/design.md, "MKD"): in iterations t < K, before the
ordinary averaging, every peer walks the same G rounds of groups once more. In each round it
receives its group mates' weights (weights only: one payload per message), scores every mate as a
teacher by KL(teacher || student) at temperature tau on `batches` fresh mini-batches of its own
data, keeps the l = max(1, floor(rho * candidates)) lowest-KL mates (ties: the lower peer id),
averages their logits, and trains one pass over those batches on

    lambda * tau^2 * KL(avg teacher || student) + (1 - lambda) * CE,   lambda = max(0, 1 - t/K)

with the same momentum SGD as local training. The authors' "no blending" mode uses KL * tau^2 +
CE in every KD iteration; with DP they drop the CE term (`include_ce=False`). Then weight +
momentum averaging runs over the same groups.

Vectorization: a round's groups are turned into a (N, C) table of each peer's mates (C = the
largest group size - 1, static). Teacher forward passes run without copying any parameters:
peer q evaluates its own model on the batches of each of its mates, (N, C * B) examples per
batch, and each student then gathers the logits its mates computed on its data (groups are
symmetric, so mate q of p finds p in its own table). Memory per distillation batch: one forward
pass of N * (C + 1) * B examples.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from marfl_jax import local, mixing


class Distillation(NamedTuple):
    """MKD's settings (the `--mkd_*` flags)."""

    iterations: int = 40  # K: KD runs in iterations t < K.
    temperature: float = 3.0  # tau.
    teacher_fraction: float = 0.4  # rho; 1.0 keeps every candidate.
    batches: int = 8  # Distillation mini-batches per round (batch size = the local B).
    blend: bool = True  # False: the authors' "no blending" mode (KL * tau^2 + CE always).
    include_ce: bool = True  # False under DP: the CE term would leak the peer's labels.

    def active(self, iteration: int) -> bool:
        return iteration < self.iterations

    def weight(self, iteration: int) -> float:
        """lambda = max(0, 1 - t/K): the KL term's share of the loss in iteration t."""
        return max(0.0, 1.0 - iteration / self.iterations)


def kl_divergence(teacher_logits: jax.Array, student_logits: jax.Array,
                  temperature: float) -> jax.Array:
    """KL(teacher || student) of the temperature-softened distributions, averaged over the batch
    (PyTorch's `kl_div(..., reduction='batchmean')`).

    Args:
      teacher_logits, student_logits: (..., B, classes).
    Returns:
      (...) float32.
    """
    teacher_log_p = jax.nn.log_softmax(teacher_logits / temperature, axis=-1)
    student_log_p = jax.nn.log_softmax(student_logits / temperature, axis=-1)
    per_example = jnp.sum(jnp.exp(teacher_log_p) * (teacher_log_p - student_log_p), axis=-1)
    return per_example.mean(axis=-1)


def distillation_loss(student_logits: jax.Array, teacher_logits: jax.Array, labels: jax.Array,
                      weight: jax.Array, distillation: Distillation) -> jax.Array:
    """The loss of one distillation step. student/teacher logits (B, classes), labels (B,),
    weight = lambda (scalar). Returns a scalar."""
    tau = distillation.temperature
    kl = kl_divergence(teacher_logits, student_logits, tau) * tau**2
    if not distillation.include_ce:
        return kl
    ce = local.cross_entropy(student_logits, labels)
    if not distillation.blend:
        return kl + ce
    return weight * kl + (1.0 - weight) * ce


def teacher_counts(teacher_fraction: float, max_mates: int) -> np.ndarray:
    """l for every possible number of candidates n = 0..C: max(1, int(rho * n)), 0 when n = 0.
    Computed on the host in float64, as the authors' Python does. Returns (C + 1,) int32."""
    counts = [max(1, int(teacher_fraction * n)) if n else 0 for n in range(max_mates + 1)]
    return np.asarray(counts, np.int32)


class Mates(NamedTuple):
    """Each peer's group mates in one round, ordered by peer id. All (N, C)."""

    ids: jax.Array  # int32 mate peer ids (arbitrary where not valid).
    valid: jax.Array  # bool.
    slot_of_self: jax.Array  # int32: where this peer sits in mate ids[p, c]'s own table.


def group_mates(group_ids: jax.Array, num_groups: int, max_mates: int) -> Mates:
    """The mates table of one round.

    Args:
      group_ids: (N,) int32 in [-1, num_groups); -1 = absent (no mates).
      num_groups: static bound on the ids.
      max_mates: C, static; every group must have at most C + 1 members.
    """
    num_peers = group_ids.shape[0]
    present = group_ids >= 0
    segment = jnp.where(present, group_ids, num_groups)
    order = jnp.argsort(segment, stable=True)  # Members of a group are contiguous, by peer id.
    sizes = jax.ops.segment_sum(jnp.ones_like(segment), segment, num_segments=num_groups + 1)
    starts = jnp.cumsum(sizes) - sizes
    rank = mixing.rank_in_group(group_ids, num_groups)[:, None]  # (N, 1)
    slot = jnp.arange(max_mates, dtype=jnp.int32)[None, :]  # (1, C)
    mate_rank = slot + (slot >= rank)  # Skip oneself.
    position = jnp.clip(starts[segment][:, None] + mate_rank, 0, num_peers - 1)
    valid = present[:, None] & (mate_rank < sizes[segment][:, None])
    slot_of_self = jnp.where(rank < mate_rank, rank, rank - 1)
    return Mates(order[position].astype(jnp.int32), valid, slot_of_self.astype(jnp.int32))


def select_teachers(scores: jax.Array, valid: jax.Array, counts: np.ndarray) -> jax.Array:
    """The l lowest-score valid candidates of each peer (ties: the lower slot, i.e. peer id).

    Args:
      scores: (N, C) float KL of each candidate teacher.
      valid: (N, C) bool.
      counts: (C + 1,) l for n valid candidates (`teacher_counts`).
    Returns:
      (N, C) bool.
    """
    masked = jnp.where(valid, scores, jnp.inf)
    order = jnp.argsort(masked, axis=-1, stable=True)
    rank = jnp.argsort(order, axis=-1)  # Each candidate's place in its peer's sorted order.
    keep = jnp.asarray(counts)[valid.sum(axis=-1)]
    return valid & (rank < keep[:, None])


class RoundStats(NamedTuple):
    """Per-peer outcomes of one distillation round, all (N,)."""

    distilled: jax.Array  # bool: had at least one teacher and trained.
    teachers: jax.Array  # int32 teachers kept.
    teacher_kl: jax.Array  # Mean KL of the kept teachers (0 if none).
    loss: jax.Array  # Mean distillation loss over the pass (0 if not distilled).


def teacher_logits(params, images: jax.Array, mates: Mates, *, apply_fn, teacher_params=None):
    """Every peer's student logits and its candidate teachers' logits on its own batches.

    Args:
      params: leaves (N, ...).
      images: (N, k, B, ...) each peer's distillation batches.
      mates: the round's `Mates`, (N, C).
      teacher_params: the models as the mates receive them (a lossy codec's decoded copies;
        default `params`).
    Returns:
      (student (N, k, B, classes), teachers (N, C, k, B, classes)).
    """
    num_peers, num_batches, batch = images.shape[:3]
    max_mates = mates.ids.shape[1]
    teachers_params = params if teacher_params is None else teacher_params

    def evaluate(p, inputs):  # Evaluation mode, as the authors score teachers.
        return apply_fn(p, inputs, None)

    def one_batch(x):  # x: (N, B, ...) the peers' i-th batch.
        student = jax.vmap(evaluate)(params, x)
        mates_x = x[mates.ids].reshape((num_peers, max_mates * batch) + x.shape[2:])
        # Peer q's model (as its mates decode it) on its mates' data.
        computed = jax.vmap(evaluate)(teachers_params, mates_x)
        computed = computed.reshape(num_peers, max_mates, batch, -1)
        return student, computed[mates.ids, mates.slot_of_self]  # What p's mates said on p's.

    student, teachers = jax.lax.map(one_batch, jnp.swapaxes(images, 0, 1))
    return jnp.swapaxes(student, 0, 1), jnp.moveaxis(teachers, 0, 2)


def distill_round(params, opt_state, group_ids: jax.Array, images: jax.Array, labels: jax.Array,
                  weight: jax.Array, *, distillation: Distillation, num_groups: int,
                  max_mates: int, apply_fn, optimizer: optax.GradientTransformation,
                  learners: jax.Array | None = None, keys: jax.Array | None = None,
                  roundtrip=None):
    """One MKD round for all peers: score the mates, keep the best, train one pass.

    Args:
      params, opt_state: leaves (N, ...).
      group_ids: (N,) this round's groups (-1 = absent).
      images: (N, k, B, ...) float32 distillation batches; labels: (N, k, B) int32.
      weight: lambda, a scalar.
      learners: (N,) bool, peers allowed to train (default all); the others still teach.
      keys: (N,) per-peer dropout keys for the training pass, or None.
      roundtrip: a lossy codec's params -> decoded params: teachers are the mates' models as
        received (None: exact).
    Returns:
      (params, opt_state, RoundStats). Peers without a teacher keep their state.
    """
    mates = group_mates(group_ids, num_groups, max_mates)
    student, teachers = teacher_logits(
        params, images, mates, apply_fn=apply_fn,
        teacher_params=None if roundtrip is None else roundtrip(params))
    kl = kl_divergence(teachers, student[:, None], distillation.temperature)  # (N, C, k)
    scores = kl.sum(axis=-1)  # Summed over the k batches, as the authors do.
    selected = select_teachers(scores, mates.valid, teacher_counts(distillation.teacher_fraction,
                                                                   max_mates))
    num_teachers = selected.sum(axis=-1)
    share = selected / jnp.maximum(num_teachers, 1)[:, None]
    target = jnp.einsum("nc,nckbl->nkbl", share, teachers)  # Mean logits of the kept teachers.

    def loss_fn(p, batch, rng):
        x, y, t = batch
        return distillation_loss(apply_fn(p, x, rng), t, y, weight, distillation)

    def peer_pass(p, s, x, y, t, key):
        p, s, losses = local.sgd_pass(p, s, (x, y, t), loss_fn, key, optimizer=optimizer)
        return p, s, losses.mean()

    new_params, new_state, losses = jax.vmap(peer_pass)(params, opt_state, images, labels,
                                                        target, keys)
    distilled = num_teachers > 0
    if learners is not None:
        distilled = distilled & learners

    def keep(new, old):
        return jnp.where(distilled.reshape((-1,) + (1,) * (new.ndim - 1)), new, old)

    stats = RoundStats(
        distilled, num_teachers.astype(jnp.int32),
        jnp.where(distilled, (scores * share).sum(-1), 0.0) / images.shape[1],
        jnp.where(distilled, losses, 0.0))
    return jax.tree.map(keep, new_params, params), jax.tree.map(keep, new_state, opt_state), stats
