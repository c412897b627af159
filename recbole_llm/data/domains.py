"""Multi-domain mixing for CALRec's Stage I (CALRec §3.3, METHODS.md §1.4).

Stage I trains on a mixture of domains; domain c is drawn with probability

    p_c = n_c^power / sum_k n_k^power,   power = 0.3 in the paper (n_c = number of users of domain c)

which up-samples small domains relative to their size. A domain is a value of an item field (the first
genre of the target item, say) or a whole dataset.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np


def domain_probabilities(sizes: Mapping[str, int], power: float = 0.3) -> dict[str, float]:
    """``{domain: p_c}`` with ``p_c`` proportional to ``size ** power``; empty domains get no probability."""
    kept = {name: float(size) ** power for name, size in sizes.items() if size > 0}
    if not kept:
        raise ValueError("domain mixture: every domain is empty")
    total = sum(kept.values())
    return {name: weight / total for name, weight in kept.items()}


def first_token(value: str, missing: str = "unknown") -> str:
    """The first whitespace-separated token of a ``token_seq`` value (``"Animation Comedy"`` -> ``"Animation"``)."""
    parts = str(value or "").split()
    return parts[0] if parts else missing


class DomainMixture:
    """Draws example indices: first a domain by ``p_c``, then an example of that domain uniformly.

    Args:
        domains: ``{domain: example indices}``.
        users: ``{domain: number of users}`` (n_c); default: the number of examples.
    """

    def __init__(self, domains: Mapping[str, Sequence[int]], power: float = 0.3, users: Mapping[str, int] | None = None,
                 seed: int = 0):
        self.domains = {name: np.asarray(indices) for name, indices in domains.items() if len(indices)}
        sizes = users or {name: len(indices) for name, indices in self.domains.items()}
        self.probabilities = domain_probabilities({name: sizes[name] for name in self.domains}, power)
        self.names = list(self.probabilities)
        self._p = np.array([self.probabilities[name] for name in self.names])
        self.rng = np.random.default_rng(seed)

    def sample(self, count: int) -> list[tuple[str, int]]:
        """``count`` draws of ``(domain, example index)``."""
        picks = self.rng.choice(len(self.names), size=count, p=self._p)
        return [(self.names[c], int(self.rng.choice(self.domains[self.names[c]]))) for c in picks]
