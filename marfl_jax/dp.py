"""Decentralized DP-FedAvg with adaptive clipping (Andrew et al., 2021), as MAR-FL runs it.

Per iteration, for every peer that aggregates (vmapped: every operation here is elementwise over
the leading peer axis N, or a per-peer reduction):

1. Clip the update since the last aggregate, Delta = theta - theta_ref, to norm S (the peer's
   clip threshold), note the indicator b = [||Delta|| <= S], and add Gaussian noise of std
   z_Delta * S_max / sqrt(n) per coordinate, n = the peers aggregating this iteration and S_max
   the largest of their thresholds, so that the sum of the n noised updates carries noise of
   std z_Delta * S_max, the central level for a sum whose sensitivity is S_max (with equal
   thresholds, as exact averaging keeps them, S_max = S: the authors' noise).
   z_Delta = (z^-2 - (2 sigma_b)^-2)^(-1/2) with sigma_b = n / 20 (Andrew et al.'s split of the
   noise multiplier z between the updates and the clip-indicator count). As the authors, n is
   the count actually aggregating, after dropout (`split_on_aggregating`; else n_0, the peers
   drawn, constant per run); an iteration whose n leaves z_Delta unreal (z >= n/10; the authors'
   code then fails) uses n_0's split, which the config checks up front.
2. Smooth: s <- beta_s * s + Delta~ (server momentum, beta_s = 0.9), and share the model
   theta_ref + eta_s * s (eta_s = 0.1).
3. The algorithm's rounds average the shared models, momentum, s and b over the groups.
4. The averaged indicator is noised with ONE draw per iteration shared by every peer (what the
   authors' identically seeded processes amount to), b~ = clip(mean b + N(0, sigma_b^2) / n, 0,
   1), and each peer moves its threshold geometrically toward the target quantile gamma:
   S <- S * exp(-eta_c * (b~ - gamma)). Peers with equal averaged indicators therefore keep
   equal thresholds. The averaged model becomes the new reference.
Peers that do not aggregate keep everything (their local training carries over into their next
Delta).

With MKD in the same iteration the authors apply the noised update to the model before
distilling (theta = theta_ref + eta_s * Delta~), distil on the KL term only, and then smooth the
post-distillation difference theta - theta_ref without clipping or noising it again; see
`marfl_jax.core.dp`.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp


class Privacy(NamedTuple):
    """The mechanism's settings (the `--dp_*` flags)."""

    noise_multiplier: float  # z.
    initial_clip: float = 0.1  # S_0.
    target_quantile: float = 0.5  # gamma.
    clip_lr: float = 0.2  # eta_c.
    server_lr: float = 0.1  # eta_s.
    server_momentum: float = 0.9  # beta_s.
    nominal_peers: int = 1  # n_0: peers drawn to aggregate per iteration.
    split_on_aggregating: bool = True  # n of z_Delta, sigma_b: aggregating (True) or n_0.

    @property
    def indicator_noise_std(self) -> float:
        """sigma_b = n_0 / 20."""
        return self.nominal_peers / 20.0

    @property
    def update_noise_multiplier(self) -> float:
        """z_Delta = (z^-2 - (2 sigma_b)^-2)^(-1/2); 0 when z = 0. Raises ValueError when not
        real (z >= 2 sigma_b = n_0 / 10)."""
        return update_noise_multiplier(self.noise_multiplier, self.nominal_peers)


def noise_split(settings: Privacy, num_aggregating: jax.Array) -> tuple[jax.Array, jax.Array]:
    """This iteration's (z_Delta, sigma_b) and the n they were computed from (see the module
    docstring, step 1). num_aggregating: () int. Returns three float32 scalars."""
    nominal = jnp.float32(settings.nominal_peers)
    if settings.split_on_aggregating:
        n = num_aggregating.astype(jnp.float32)
        n = jnp.where(n / 10.0 > settings.noise_multiplier, n, nominal)
    else:
        n = nominal
    if settings.noise_multiplier == 0:
        z_delta = jnp.float32(0.0)
    else:
        z_delta = (settings.noise_multiplier**-2 - (n / 10.0) ** -2) ** -0.5
    return z_delta, n / 20.0, n


def update_noise_multiplier(noise_multiplier: float, nominal_peers: int) -> float:
    """z_Delta for z and n_0 peers (see `Privacy`)."""
    if noise_multiplier == 0:
        return 0.0
    two_sigma_b = nominal_peers / 10.0
    if noise_multiplier >= two_sigma_b:
        raise ValueError(f"z_Delta = (z^-2 - (2*sigma_b)^-2)^(-1/2) is not real for z = "
                         f"{noise_multiplier:g} with {nominal_peers} aggregating peers: it "
                         f"needs z < 2*sigma_b = n/10 = {two_sigma_b:g}")
    return (noise_multiplier**-2 - two_sigma_b**-2) ** -0.5


class PrivacyState(NamedTuple):
    """Each peer's DP state; leaves have the leading peer axis N."""

    reference: object  # theta_ref: the last aggregate the peer took part in, a params tree.
    smoothed: object  # s: the smoothed noised update, a params tree.
    clip: jax.Array  # (N,) float32 S.


def init_state(params, initial_clip: float) -> PrivacyState:
    """Reference = a copy of the initial models (a separate buffer: the state is donated), s = 0,
    S = S_0 for every peer."""
    num_peers = jax.tree.leaves(params)[0].shape[0]
    return PrivacyState(jax.tree.map(jnp.copy, params), jax.tree.map(jnp.zeros_like, params),
                        jnp.full((num_peers,), initial_clip, jnp.float32))


def peer_norms(tree) -> jax.Array:
    """Each peer's global L2 norm over all leaves. Leaves (N, ...) -> (N,) float32."""
    squares = [jnp.sum(jnp.square(x.reshape(x.shape[0], -1)), axis=1)
               for x in jax.tree.leaves(tree)]
    return jnp.sqrt(sum(squares))


def _per_peer(values: jax.Array, like: jax.Array) -> jax.Array:
    return values.reshape((-1,) + (1,) * (like.ndim - 1))


def clip_and_noise(key: jax.Array, delta, clip: jax.Array, noise_std: jax.Array):
    """Clips each peer's update to its threshold and adds Gaussian noise.

    Args:
      delta: tree with leaves (N, ...).
      clip: (N,) thresholds S.
      noise_std: (N,) or scalar std of the noise per coordinate.
    Returns:
      (noised delta tree, unclipped (N,) float32 indicator b, norms (N,) before clipping).
    """
    norms = peer_norms(delta)
    scale = jnp.minimum(1.0, clip / (norms + 1e-8))  # The authors' 1e-8 guard.
    leaves, treedef = jax.tree.flatten(delta)
    keys = jax.random.split(key, len(leaves))
    std = jnp.broadcast_to(noise_std, norms.shape)
    noised = [x * _per_peer(scale, x) + _per_peer(std, x) * jax.random.normal(k, x.shape, x.dtype)
              for x, k in zip(leaves, keys, strict=True)]
    return (jax.tree.unflatten(treedef, noised), (norms <= clip).astype(jnp.float32), norms)


def privatize(key: jax.Array, params, state: PrivacyState, aggregating: jax.Array,
              settings: Privacy):
    """Step 1 for every peer: the clipped, noised update since the reference.

    Args:
      params: the peers' models after local training, leaves (N, ...).
      aggregating: (N,) bool, the n peers aggregating this iteration: their largest threshold
        sets the noise.
    Returns:
      (noised delta tree, indicator (N,), norms (N,)).
    """
    delta = jax.tree.map(jnp.subtract, params, state.reference)
    num_aggregating = aggregating.sum()
    z_delta, _, _ = noise_split(settings, num_aggregating)
    largest_clip = jnp.where(aggregating, state.clip, 0.0).max()
    noise_std = z_delta * largest_clip / jnp.sqrt(jnp.maximum(num_aggregating, 1)
                                                  .astype(jnp.float32))
    return clip_and_noise(key, delta, state.clip, noise_std)


def apply_delta(reference, delta, server_lr: float):
    """theta_ref + eta_s * delta (the authors' `apply_delta_to_model`)."""
    return jax.tree.map(lambda r, d: r + server_lr * d, reference, delta)


def smooth(smoothed, delta, server_momentum: float):
    """s <- beta_s * s + delta."""
    return jax.tree.map(lambda s, d: server_momentum * s + d, smoothed, delta)


def update_clip(key: jax.Array, clip: jax.Array, mean_indicator: jax.Array,
                num_aggregating: jax.Array, settings: Privacy) -> jax.Array:
    """Step 4: the averaged indicator plus one shared draw of N(0, sigma_b^2) / n; each peer
    moves its S. clip, mean_indicator: (N,). Returns (N,) new thresholds."""
    n = jnp.maximum(num_aggregating, 1).astype(jnp.float32)
    _, sigma_b, _ = noise_split(settings, num_aggregating)
    noise = jax.random.normal(key, ()) * sigma_b / n
    noisy = jnp.clip(mean_indicator + noise, 0.0, 1.0)
    return clip * jnp.exp(-settings.clip_lr * (noisy - settings.target_quantile))


def where_peers(mask: jax.Array, new, old):
    """Per-peer select over trees: new where mask (N,) else old."""
    return jax.tree.map(lambda a, b: jnp.where(_per_peer(mask, a), a, b), new, old)


def authors_epsilon(steps: int, delta: float, sample_rate: float, noise_multiplier: float,
                    order: float = 32.0) -> float:
    """The authors' RDP-style bound at one order l: q^2 T l / (2 z^2) + log(1/delta) / (l - 1).
    (Not a valid subsampled-Gaussian RDP bound; reported only for comparison.)"""
    if noise_multiplier == 0:
        return math.inf
    return (sample_rate**2 * steps * order / (2 * noise_multiplier**2)
            + math.log(1 / delta) / (order - 1))


def authors_epsilon_sweep(steps: int, delta: float, sample_rate: float,
                          noise_multiplier: float) -> float:
    """The authors' bound minimized over their orders 1.1..10.9 and 11..64."""
    orders = [1 + x / 10.0 for x in range(1, 100)] + list(range(11, 65))
    return min(authors_epsilon(steps, delta, sample_rate, noise_multiplier, order)
               for order in orders)
