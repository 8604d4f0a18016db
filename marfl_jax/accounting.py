"""Privacy accounting for `marfl_jax.dp` with Google's dp-accounting (RDP and PLD accountants).

The mechanism as run: in every iteration in which n_t > 0 peers aggregate, the released aggregate
is a Gaussian mechanism on the sum of the peers' clipped updates (sensitivity S, noise std
z_Delta * S) together with the clip-indicator count (sensitivity 1, noise std sigma_b), which
Andrew et al. (2021, Theorem 1) show equals one Gaussian mechanism of noise multiplier z. Each
peer's participation is modelled as Poisson sampling with rate q_t = n_t / N (the authors'
sample rate). The unit of privacy is one peer's whole dataset (peer-level DP), under the
add-or-remove-one relation.

* RDP: each iteration's event composed exactly (grouped by equal q_t).
* PLD: with varying q_t, every iteration is charged the largest q_t seen (an upper bound: the
  sampled Gaussian's privacy loss grows with q); exact under full or fixed participation.
* The authors' formula (`dp.authors_epsilon`, order 32, and its sweep) at the latest q_t, for
  comparison only.

What the epsilon does not cover is listed in docs/running.md ("Differential privacy").
"""

from __future__ import annotations

import collections
import math

from marfl_jax import dp


class PrivacyAccountant:
    """Counts DP releases (iterations with aggregating peers) and reports epsilons at delta."""

    def __init__(self, num_peers: int, noise_multiplier: float, delta: float,
                 participation: dict[int, int] | None = None, last_participants: int = 0):
        self.num_peers = num_peers
        self.noise_multiplier = noise_multiplier
        self.delta = delta
        # Releases by number of aggregating peers: {n_t: iterations}.
        self.participation = collections.Counter(participation or {})
        self.last_participants = last_participants

    @property
    def steps(self) -> int:
        return sum(self.participation.values())

    def record(self, num_aggregating: int) -> None:
        """One iteration; nothing is released when no peer aggregates."""
        if num_aggregating > 0:
            self.participation[int(num_aggregating)] += 1
            self.last_participants = int(num_aggregating)

    def state(self) -> dict:
        """JSON-able state for checkpoints."""
        return {"participation": {str(k): v for k, v in self.participation.items()},
                "last_participants": self.last_participants}

    @classmethod
    def from_state(cls, num_peers, noise_multiplier, delta, state: dict) -> PrivacyAccountant:
        return cls(num_peers, noise_multiplier, delta,
                   {int(k): v for k, v in state["participation"].items()},
                   state["last_participants"])

    def _events(self, rates_and_counts):
        import dp_accounting  # Deferred: only DP runs need it.

        gaussian = dp_accounting.GaussianDpEvent(self.noise_multiplier)
        return [dp_accounting.SelfComposedDpEvent(
            dp_accounting.PoissonSampledDpEvent(q, gaussian), count)
            for q, count in rates_and_counts]

    def epsilons(self) -> dict[str, float]:
        """`epsilon_rdp`, `epsilon_pld`, `epsilon_authors`, `epsilon_authors_sweep` (inf for z =
        0; 0 before any release) and `dp_releases`."""
        steps = self.steps
        result = {"dp_releases": steps}
        names = ("epsilon_rdp", "epsilon_pld", "epsilon_authors", "epsilon_authors_sweep")
        if steps == 0:
            return {**result, **dict.fromkeys(names, 0.0)}
        if self.noise_multiplier == 0:
            return {**result, **dict.fromkeys(names, math.inf)}
        from dp_accounting import pld, rdp

        rates = sorted((n / self.num_peers, count) for n, count in self.participation.items())
        rdp_accountant = rdp.RdpAccountant()
        for event in self._events(rates):
            rdp_accountant.compose(event)
        pld_accountant = pld.PLDAccountant()
        pld_accountant.compose(self._events([(rates[-1][0], steps)])[0])
        q_last = self.last_participants / self.num_peers
        return {**result,
                "epsilon_rdp": float(rdp_accountant.get_epsilon(self.delta)),
                "epsilon_pld": float(pld_accountant.get_epsilon(self.delta)),
                "epsilon_authors": dp.authors_epsilon(steps, self.delta, q_last,
                                                      self.noise_multiplier),
                "epsilon_authors_sweep": dp.authors_epsilon_sweep(steps, self.delta, q_last,
                                                                  self.noise_multiplier)}
