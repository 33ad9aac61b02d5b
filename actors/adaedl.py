"""AdaEDL: entropy-based early draft stopping (Agrawal et al. 2024, arXiv:2410.18351).

The acceptance probability of a drafted token is bounded below by roughly 1 - sqrt(γ_e · H),
with H the entropy (nats) of the draft distribution at that position. The drafter stops a
chunk as soon as that bound falls under a per-request threshold λ, and λ follows the observed
acceptance rate online (DESIGN §5):

    AR ← β1·AR + (1−β1)·n_acc/n_drafted
    λ' = λ+ε if AR < α;  λ−ε elif n_acc ≠ L;  else λ
    λ  ← β2·λ + (1−β2)·λ'
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field


@dataclass(frozen=True)
class AdaEDLConfig:
    """The paper's defaults; λ₀ is the one knob worth sweeping (the paper uses ~0.3–0.9)."""

    gamma: float = 0.2  # γ_e, scales the entropy inside the bound
    beta1: float = 0.5  # EMA factor of the acceptance rate
    beta2: float = 0.9  # EMA factor of λ
    epsilon: float = 0.01  # step of the λ update
    alpha: float = 0.9  # target acceptance rate; AR starts here
    lambda0: float = 0.5  # initial threshold


@dataclass
class AdaEDLState:
    """One request's threshold and acceptance EMA, kept by the drafter."""

    config: AdaEDLConfig = field(default_factory=AdaEDLConfig)
    lam: float = field(default=-1.0)
    acceptance: float = field(default=-1.0)

    def __post_init__(self) -> None:
        if self.lam < 0:
            self.lam = self.config.lambda0
        if self.acceptance < 0:
            self.acceptance = self.config.alpha

    def should_stop(self, entropy: float) -> bool:
        """Stop before drafting a token whose acceptance lower bound is under λ."""
        return 1.0 - math.sqrt(self.config.gamma * max(entropy, 0.0)) < self.lam

    def update(self, n_drafted: int, n_accepted: int, max_len: int) -> None:
        """Fold one finished draft round into the acceptance EMA and λ."""
        if n_drafted <= 0:
            return
        c = self.config
        self.acceptance = c.beta1 * self.acceptance + (1 - c.beta1) * n_accepted / n_drafted
        if self.acceptance < c.alpha:
            target = self.lam + c.epsilon
        elif n_accepted != max_len:
            target = self.lam - c.epsilon
        else:
            target = self.lam
        self.lam = c.beta2 * self.lam + (1 - c.beta2) * target
