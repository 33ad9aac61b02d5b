"""AdaEDL: entropy-based early draft stopping (Agrawal et al. 2024, arXiv:2410.18351).

The acceptance probability of a drafted token is bounded below by roughly 1 - sqrt(γ_e · H),
with H the entropy (nats) of the draft distribution at that position. The drafter stops a
chunk as soon as that bound falls under a per-request threshold λ, and λ follows the observed
acceptance rate online (docs/design.md §5):

    AR ← β1·AR + (1−β1)·n_acc/n_drafted
    λ' = λ+ε if AR < α;  λ−ε elif n_acc ≠ L;  else λ
    λ  ← β2·λ + (1−β2)·λ'

By default (stop="cost") the drafter uses a cost-aware stop instead of the fixed threshold.
With c the cost ratio (a draft position costs 1/c of a step without drafting, measured online
by the drafter unless configured) and with S_i the estimated probability that the first i drafted
tokens all survive, a round of k drafts yields 1 + Σ S_i tokens for c + k draft-step times, and
one more draft token is worth its cost only while its survival S_{k+1} exceeds that rate:

    draft on  ⟺  S_k · p_{k+1}  >  (1 + Σ_{i≤k} S_i) / (c + k)

Where the drafter drafts a whole piece of positions per device program (tandem/actors/drafter.py), a
stop inside the piece saves no draft time and a verify of a few more tokens costs almost
nothing (H200: 6 vs 9 tokens, 1.31 vs 1.40 ms), so dropping drafted tokens only loses tokens:
on the H200 pair, stopping token by token inside pieces of 8 paid for 8 positions and kept 4.4
(1.51x AR against static k=8's 2.02x). The cost rule therefore decides at piece boundaries only,
keeping every drafted token: draft another piece of P while its mean survival beats the rate,
with the acceptance of its tokens estimated from the last drafted token's entropy.

c is measured by `CostRatio`: a round of k drafted positions costs about e + d·k (a fixed part, the
drafter's catch-up forward and launches, and a part per position, a piece's launch spread over its
positions), so one more position costs d and a round's time apart from its positions is the step's
own plus e: c = (step + e) / d. Taking the mean time per position for d instead counts the fixed
part k times over: on one H200 at batch 1 that gave c ≈ 5 where the marginal cost gives ≈ 9, and
rounds stopped at 5 drafts where static k=8 ran faster.

p is the acceptance of a token drafted at entropy H, learned online from the verifier's
verdicts (`AcceptanceTable`, binned by the paper's bound 1 − sqrt(γ_e·H), which is its prior).
The bound alone is far too pessimistic for a draft distilled from its target: on the H200 pair
(c ≈ 6) it stopped rounds at 1.6 tokens where the best static k was 5.
"""
from __future__ import annotations

import math
import statistics
from collections import deque
from dataclasses import dataclass, field
from typing import Literal

from tandem.errors import TandemError


@dataclass(frozen=True)
class AdaEDLConfig:
    """The paper's defaults; λ₀ is the one knob worth sweeping (the paper uses ~0.3–0.9).
    λ and its update drive the stop only with stop="paper"."""

    gamma: float = 0.2  # γ_e, scales the entropy inside the bound
    beta1: float = 0.5  # EMA factor of the acceptance rate
    beta2: float = 0.9  # EMA factor of λ
    epsilon: float = 0.01  # step of the λ update
    alpha: float = 0.9  # target acceptance rate; AR starts here
    lambda0: float = 0.5  # initial threshold
    stop: Literal["cost", "paper"] = "cost"  # the cost-aware stop (above) or the paper's λ rule
    cost_ratio: float | None = None  # c for stop="cost"; None: measured online by the drafter

    def __post_init__(self) -> None:
        if self.stop not in ("cost", "paper"):
            raise TandemError(f"AdaEDL stop must be 'cost' or 'paper', got {self.stop!r}")
        if self.cost_ratio is not None and not self.cost_ratio > 0:
            raise TandemError(f"AdaEDL cost ratio must be > 0 (a step's time over one more draft token's), got {self.cost_ratio}")


class CostRatio:
    """AdaEDL's c = (a step's time outside drafting + drafting's fixed part e) / one more position d.

    Drafting k positions costs e + d·k; (k, seconds) of the drafter's rounds are fitted by least
    squares with forgetting (a round of pieces pays a launch per piece, which d then carries: the
    right price for the decision to draft one more piece). Until the rounds' lengths have varied
    (a static window drafts one k: e and d cannot be told apart), d is the mean time per position
    and e is 0. d never falls under half the mean time per position, so c stays under
    (step + a round's time) / half that, whatever the fit makes of rounds whose batch also
    changed (their time barely growing with their length). Rounds that fed a new prompt and
    stalls (over STALL x the median time per position: a capture, a compile) are left out.
    None until a step and a round have been measured."""

    FORGET = 0.95  # per round: ~20 rounds of memory
    SPREAD = 0.05  # relative spread of the lengths (std / mean) from which e and d are told apart
    EMA = 0.9  # smoothing of the step time
    STALL = 4.0

    def __init__(self) -> None:
        self.w = self.sx = self.sy = self.sxx = self.sxy = 0.0
        self.step_s: float | None = None
        self._recent: deque[float] = deque(maxlen=32)  # seconds per position of recent rounds

    def step(self, seconds: float) -> None:
        """A step's time outside drafting."""
        self.step_s = seconds if self.step_s is None else self.EMA * self.step_s + (1 - self.EMA) * seconds

    def draft(self, positions: int, seconds: float, prefilled: bool = False) -> None:
        """A round that drafted `positions` positions in `seconds`; prefilled: it also fed a new
        request's prompt (its time is the prompt's, not drafting's)."""
        if positions <= 0 or prefilled:
            return
        per = seconds / positions
        stall = len(self._recent) >= 4 and per > self.STALL * statistics.median(self._recent)
        self._recent.append(per)
        if stall:
            return
        f = self.FORGET
        self.w, self.sx, self.sy = f * self.w + 1, f * self.sx + positions, f * self.sy + seconds
        self.sxx, self.sxy = f * self.sxx + positions * positions, f * self.sxy + positions * seconds

    def parts(self) -> tuple[float, float] | None:
        """(e, d): drafting's fixed seconds and seconds per position (None: no round yet)."""
        if self.w <= 0 or self.sx <= 0:
            return None
        mx, my = self.sx / self.w, self.sy / self.w
        var = self.sxx / self.w - mx * mx
        if var > (self.SPREAD * mx) ** 2:
            d = max((self.sxy / self.w - mx * my) / var, 0.5 * my / mx)
            e = my - d * mx
            if e >= 0:
                return e, d
        return 0.0, my / mx

    @property
    def value(self) -> float | None:
        parts = self.parts()
        if parts is None or self.step_s is None or parts[1] <= 0:
            return None
        e, d = parts
        return (self.step_s + e) / d


class AcceptanceTable:
    """P(a drafted token is accepted | the ones before it were), by the entropy it was drafted at.

    Binned by the AdaEDL bound b = 1 − sqrt(γ_e·H) ∈ [0, 1]; each bin starts at its bound with
    PRIOR pseudo-observations and forgets old verdicts at rate DECAY (the text drifts).
    """

    BINS = 20
    PRIOR = 2.0
    DECAY = 0.999

    def __init__(self, gamma: float) -> None:
        self.gamma = gamma
        centers = [(i + 0.5) / self.BINS for i in range(self.BINS)]
        self.accepted = [self.PRIOR * c for c in centers]
        self.seen = [self.PRIOR] * self.BINS

    def _bin(self, entropy: float) -> int:
        bound = 1.0 - math.sqrt(self.gamma * max(entropy, 0.0))
        return min(self.BINS - 1, max(0, int(bound * self.BINS)))

    def p(self, entropy: float) -> float:
        i = self._bin(entropy)
        return self.accepted[i] / self.seen[i]

    def observe(self, entropies: list[float], n_accepted: int) -> None:
        """One judged round: the first n_accepted tokens were accepted, the next one rejected,
        the rest never judged (they tell nothing about acceptance given survival)."""
        for i, h in enumerate(entropies[: n_accepted + 1]):
            b = self._bin(h)
            self.seen[b] = self.seen[b] * self.DECAY + 1.0
            self.accepted[b] = self.accepted[b] * self.DECAY + (1.0 if i < n_accepted else 0.0)


@dataclass
class AdaEDLState:
    """One request's threshold and acceptance EMA, kept by the drafter."""

    config: AdaEDLConfig = field(default_factory=AdaEDLConfig)
    lam: float = field(default=-1.0)
    acceptance: float = field(default=-1.0)

    table: AcceptanceTable | None = None  # the drafter's, shared by its requests (cost-aware stop)
    mean_length: float = 0.0  # EMA (β1) of this request's drafted chunk lengths

    def __post_init__(self) -> None:
        if self.lam < 0:
            self.lam = self.config.lambda0
        if self.acceptance < 0:
            self.acceptance = self.config.alpha
        self.begin_round()

    def should_stop(self, entropy: float) -> bool:
        """The paper's rule: stop before drafting a token whose acceptance lower bound is under λ."""
        return 1.0 - math.sqrt(self.config.gamma * max(entropy, 0.0)) < self.lam

    def begin_round(self, table: AcceptanceTable | None = None, cost_ratio: float | None = None) -> None:
        """A new chunk starts: `table` holds the acceptance estimates for this request's sampling,
        `cost_ratio` is c (None: not known yet, the paper's rule decides this round)."""
        self.table = table or self.table
        self._cost_ratio = cost_ratio if self.config.stop == "cost" else None
        self._survive, self._expected, self._drafted = 1.0, 1.0, 0

    def stop_before(self, entropy: float) -> bool:
        """Whether the chunk ends before a token drafted at this entropy (never before the first);
        called in order for each candidate token of the round."""
        c = self._cost_ratio
        if c is not None and self.table is not None:
            survive = self._survive * self.table.p(entropy)
            if self._drafted and survive < self._expected / (c + self._drafted):
                return True
            self._survive, self._expected = survive, self._expected + survive
        elif self._drafted and self.should_stop(entropy):
            return True
        self._drafted += 1
        return False

    @property
    def by_piece(self) -> bool:
        """The cost rule, c known: decide at piece boundaries (draft_on), keep whole pieces."""
        return self._cost_ratio is not None and self.table is not None

    def draft_on(self, entropies: list[float], piece: int) -> bool:
        """Fold a drafted piece into the round; whether drafting `piece` more positions pays."""
        for h in entropies:
            self._survive *= self.table.p(h)
            self._expected += self._survive
            self._drafted += 1
        if not entropies:
            return True
        p = self.table.p(entropies[-1])
        gain = sum(self._survive * p**j for j in range(1, piece + 1)) / piece
        return gain > self._expected / (self._cost_ratio + self._drafted)

    def update(self, n_drafted: int, n_accepted: int, max_len: int, entropies: list[float] | None = None) -> None:
        """Fold one finished draft round into the acceptance EMA and λ (and the acceptance table)."""
        if n_drafted <= 0:
            return
        if entropies and self.table is not None:
            self.table.observe(entropies, n_accepted)
        c = self.config
        self.mean_length = c.beta1 * self.mean_length + (1 - c.beta1) * n_drafted
        self.acceptance = c.beta1 * self.acceptance + (1 - c.beta1) * n_accepted / n_drafted
        if self.acceptance < c.alpha:
            target = self.lam + c.epsilon
        elif n_accepted != max_len:
            target = self.lam - c.epsilon
        else:
            target = self.lam
        self.lam = c.beta2 * self.lam + (1 - c.beta2) * target
