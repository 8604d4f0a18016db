"""Stages of decentralized DP-FedAvg with adaptive clipping (`marfl_jax.dp` has the math).

`privatize` is DP's step 1 (clip and noise each aggregating peer's update since its reference);
`private_aggregate` replaces the plain aggregation with steps 2-4 (smooth, share, average models,
momentum, s and the clip indicators, move the thresholds). With MKD in the same iteration the
chain puts two more stages around the distillation, as the authors do: `noised_model_teaches`
(peers distil starting from theta_ref + eta_s * Delta~) and `distilled_update` (the update that
is smoothed becomes the post-distillation difference, neither clipped nor noised again).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from marfl_jax import dp, mixing
from marfl_jax.core.stage import Context, Privatized, Stage, Step

# The key of DP's per-peer state (`dp.PrivacyState`) in `FLState.stages`.
PRIVACY = "privacy"


def privatize(privacy: dp.Privacy) -> Stage:
    """Sets `step.privatized`: every peer's clipped, noised update since its reference (only
    the aggregating peers' are used), the unclipped indicators and the norms. Initialises DP's
    state, `FLState.stages[PRIVACY]` (`dp.init_state`: references = the initial models, clip
    thresholds = --dp_initial_clip), which the other DP stages share."""

    def stage(step: Step, context: Context):
        update, unclipped, norms = dp.privatize(context.keys.dp_noise, step.peers.params,
                                                step.stage_state(PRIVACY), step.aggregating,
                                                privacy)
        return step._replace(privatized=Privatized(update, unclipped, norms)), {}

    return Stage(stage, init=lambda peers: dp.init_state(peers.params, privacy.initial_clip),
                 state=PRIVACY)


def noised_model_teaches(privacy: dp.Privacy) -> Stage:
    """Aggregating peers' models become theta_ref + eta_s * Delta~ before MKD."""

    def stage(step: Step, context: Context):
        peers = step.peers
        noised_model = dp.apply_delta(step.stage_state(PRIVACY).reference, step.privatized.update,
                                      privacy.server_lr)
        params = dp.where_peers(step.aggregating, noised_model, peers.params)
        return step._replace(peers=peers._replace(params=params)), {}

    return Stage(stage)


def distilled_update() -> Stage:
    """The update to smooth becomes theta - theta_ref after MKD (not clipped or noised)."""

    def stage(step: Step, context: Context):
        update = jax.tree.map(jnp.subtract, step.peers.params,
                              step.stage_state(PRIVACY).reference)
        return step._replace(privatized=step.privatized._replace(update=update)), {}

    return Stage(stage)


def private_aggregate(privacy: dp.Privacy, mixer: mixing.Mixer, indicators: mixing.Mixer, *,
                      share_momentum: bool = True) -> Stage:
    """DP's steps 2-4 over the schedule's groups; the averaged model becomes each aggregating
    peer's reference. Non-aggregating peers keep everything. The shared tensors (model,
    momentum unless `share_momentum=False`, the smoothed noised update) are combined by the
    run's round function `mixer` (the mean; with a lossy codec the wire's combine of coded
    copies, the noise in them before encoding); the clip indicators, float32 scalars, by
    `indicators` (the plain mean: their mean is the adaptive clip's quantile estimate). When
    both are one mixer and momentum is shared, the four are mixed in one pass.

    Info: `consensus_before` (of the shared models), `aggregating` (n), `dp_split_peers` (the n
    of this iteration's noise split), `dp_clip` (mean S before
    the update), `dp_unclipped` (fraction of unclipped updates), `dp_update_norm` (mean norm
    before clipping), the last three over the aggregating peers.
    """

    def stage(step: Step, context: Context):
        peers, private, aggregating = step.peers, step.privatized, step.aggregating
        state = step.stage_state(PRIVACY)
        smoothed = dp.where_peers(aggregating, dp.smooth(
            state.smoothed, private.update, privacy.server_momentum), state.smoothed)
        shared = dp.where_peers(aggregating, dp.apply_delta(state.reference, smoothed,
                                                            privacy.server_lr), peers.params)
        before = mixing.consensus_distance(shared, step.took_part)
        if mixer is indicators and share_momentum:
            shared, opt_state, smoothed, mean_indicator = mixing.mix(
                (shared, peers.opt_state, smoothed, private.unclipped), step.schedule, mixer)
        else:
            payloads = (shared, smoothed) + ((peers.opt_state,) if share_momentum else ())
            mixed = mixing.mix(payloads, step.schedule, mixer)
            shared, smoothed = mixed[:2]
            opt_state = mixed[2] if share_momentum else peers.opt_state
            mean_indicator = mixing.mix(private.unclipped, step.schedule, indicators)
        num_aggregating = aggregating.sum()
        clip = jnp.where(aggregating, dp.update_clip(context.keys.dp_clip, state.clip,
                                                     mean_indicator, num_aggregating, privacy),
                         state.clip)
        new_privacy = dp.PrivacyState(dp.where_peers(aggregating, shared, state.reference),
                                      smoothed, clip)
        count = jnp.maximum(num_aggregating, 1)
        peers = peers._replace(params=dp.where_peers(aggregating, shared, peers.params),
                               opt_state=opt_state)
        return step._replace(peers=peers).with_stage_state(PRIVACY, new_privacy), {
            "consensus_before": before,
            "aggregating": num_aggregating,
            "dp_split_peers": dp.noise_split(privacy, num_aggregating)[2],
            "dp_clip": jnp.where(aggregating, state.clip, 0).sum() / count,
            "dp_unclipped": jnp.where(aggregating, private.unclipped, 0).sum() / count,
            "dp_update_norm": jnp.where(aggregating, private.norms, 0).sum() / count,
        }

    return Stage(stage)
