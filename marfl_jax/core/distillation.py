"""Stage: Moshpit Knowledge Distillation over the iteration's groups (`marfl_jax.mkd`)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from marfl_jax import data as data_lib
from marfl_jax import mkd
from marfl_jax.core.stage import Context, Stage, Step

_NO_DISTILLATION = ("distilled_peers", "distill_teachers", "distill_kl", "distill_loss")


def distill(distillation: mkd.Distillation, *, num_groups: int, max_group_size: int, apply_fn,
            optimizer, batch_size: int, model_dropout: bool = False, roundtrip=None) -> Stage:
    """One MKD round per aggregation round, over the same groups, with lambda from the context
    (`roundtrip`: the codec's, so teachers are the mates' models as received).

    Each round draws fresh distillation batches from every peer's data (the authors re-shuffle
    their loader on each call). Peers without data still teach but do not learn.
    Info (means over rounds): `distilled_peers`, `distill_teachers`, `distill_kl`,
    `distill_loss`.
    """

    def stage(step: Step, context: Context):
        if max_group_size < 2:  # Nobody ever has a mate.
            return step, {name: jnp.float32(0.0) for name in _NO_DISTILLATION}
        data, keys = context.data, context.keys
        params, opt_state = step.peers.params, step.peers.opt_state
        stats = []
        for r, group_ids in enumerate(step.schedule):
            peer_keys = jax.random.split(jax.random.fold_in(keys.distill, r), context.num_peers)
            index = data_lib.sample_peer_batches(peer_keys, data.table, data.counts,
                                                 distillation.batches, batch_size)
            dropout_keys = (jax.vmap(lambda k, r=r: jax.random.fold_in(k, r))(
                keys.distill_dropout) if model_dropout else None)
            params, opt_state, round_stats = mkd.distill_round(
                params, opt_state, group_ids, data_lib.preprocess(data.x_train[index]),
                data.y_train[index], context.distill_weight, distillation=distillation,
                num_groups=num_groups, max_mates=max_group_size - 1, apply_fn=apply_fn,
                optimizer=optimizer, learners=data.counts > 0, keys=dropout_keys,
                roundtrip=roundtrip)
            stats.append(round_stats)
        distilled = jnp.stack([s.distilled for s in stats])  # (G, N)
        count = jnp.maximum(distilled.sum(), 1)

        def mean_over_distilled(values):
            return jnp.where(distilled, jnp.stack(values), 0).sum() / count

        step = step._replace(peers=step.peers._replace(params=params, opt_state=opt_state))
        return step, {
            "distilled_peers": distilled.sum(axis=1).mean(),
            "distill_teachers": mean_over_distilled([s.teachers for s in stats]),
            "distill_kl": mean_over_distilled([s.teacher_kl for s in stats]),
            "distill_loss": mean_over_distilled([s.loss for s in stats]),
        }

    return Stage(stage)
