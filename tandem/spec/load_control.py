"""Load control (docs/design.md §6): every speculating request's draft length, chosen for the batch's goodput.

Speculation pays while the verifier is memory-bound: verifying k+1 tokens of a request costs
about what decoding one does. As the batch grows the verify forward turns compute-bound and
every drafted token costs verify time whether it is accepted or not: on one H200 with 64
requests, modes that run 2x AR at batch 1 fall to AR's speed or below (BENCHMARKS.md). The
controller picks, every `every` steps (or at once when the batch size changes bucket), a batch
depth K and each request's window w_r <= K for the highest predicted goodput

    goodput = sum_r E_r(w_r) / T,    E_r(w) = (1 - a_r^(w+1)) / (1 - a_r)

    T = F(B, R(B, q), sum_r (w_r + 1)) + D(K', B')        (SD: one after the other)
    T = max(F(...), D(K', B'))                  (PEARL only: drafting beside verifying)
    D(K, B') = K * (d0 + d1 * B') + e0 + e1 * B'

(PEARL: w - 1 judged tokens, no bonus, on w verified rows), with a_r request r's per-token
acceptance (accepted tokens over accepted tokens plus rejections, from a prior of the lane's
own), F the step's cost apart from drafting by requests, the rows the verify forward computes (q:
the plan's longest verified row count, w + 1 for SD, w for PEARL) and the rows it scores, and D
the drafting of
K' = max_r w_r positions for the B' requests that draft: a part per position and a part per step
(the drafter's catch-up forward, launches), both growing with B'. F and D are fitted online by
least squares with forgetting from the lane's own steps (`_Fit`), slopes never negative and
shrunk towards 0 until the steps have varied enough to show them; a step that fed prompts pays
their prefill on top, which both fits take as a regressor of its own (prompts fed) and leave
out of their predictions, since every request pays its prefill once whatever its lengths.

A forward computes a rectangle, every request padded to the longest query and, in a CUDA graph,
both sides rounded up to the graph's bucket: R(B, q) is the engine's (`Engine.forward_rows`). A
request's shorter window saves only its scored rows (the logits, the judging), and a depth costs
what its bucket does: on one H200 a verify of 64 requests with drafts of 5 computed 64 x 8 rows,
as one with drafts of 7, and drafts of 8 computed 64 x 16. The caps therefore include the bucket
edges (7, 15, 31).

For each K the windows are chosen jointly by Dinkelbach's method: at the batch's rate lam, a
request takes the w that maximizes E(w) - lam * (its rows and its share of drafting); w = 0
means it decodes this step. A window left at a request's whole (uncapped) length lets AdaEDL
stop it; L_r for an AdaEDL request is its recent mean chunk length. The cap is the plan's
longest window, and a request that joins before the next decision drafts the plan's median.

Before the fits have seen enough steps the cap is `start_cap`, the static length that is never
far from the best. A cap falls at once but rises at most to double per decision, so when the
fits forget why they capped (a lane that only decodes sees no verify of many tokens) the probe
is a short window, not every request's whole one. The model's choice is then checked against
what the lane measured (tokens/s per batch bucket and cap): a cap measured slower than another
(by more than `tolerance`) gives way to it, a cap once measured faster is measured again when
its rate is old, and where the model predicts under `probe_below` over plain decoding, cap 0 is
measured every probe_every * every steps, so a wrong cost model costs a probe, not the lane's
throughput. The model's cap is its best (of near-ties, within `tie`, the shortest: a long window's
prediction rests on the most extrapolated acceptance and costs, and on one H200 the model's
near-ties at 16 and 64 requests were 8-18% apart measured, the longer slower), but AdaEDL
requests keep their own stops where those are within `tolerance` of the best. Output stays lossless
at any length: the controller changes how many tokens are proposed, never which.
"""
from __future__ import annotations

import math
import statistics
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, NamedTuple

CAPS = (0, 1, 2, 3, 4, 5, 6, 7, 8, 10, 12, 15, 16, 24, 31, 32, 48, 64)


@dataclass
class LoadControlConfig:
    every: int = 8  # re-decide every this many steps (and when the batch size crosses a power of two)
    warmup_steps: int = 8  # steps observed before the model's first cap
    start_cap: int | None = 5  # the cap until then: the static length that is never far from the best
    forget: float = 0.98  # per-step weight kept by the fits' running sums (~50 steps of memory)
    shrink: float = 0.2  # slope prior, in units of the mean regressor squared
    step_shrink: float = 5.0  # the prior on drafting's per-step slopes, likewise
    tolerance: float = 0.03  # a cap measured this much faster than another replaces it
    tie: float = 0.005  # caps predicted within this of the best goodput are ties (the shortest wins)
    prior_acceptance: float = 0.7  # per-token acceptance before a lane has seen any
    # pseudo-tokens of the lane's acceptance in each request's estimate: with 4, a few lucky verifies
    # gave a request a long window and the whole batch drafted as long (one H200, T=0.7, 4 requests:
    # auto's steps 25% slower than SD k=8's at the same mean draft)
    prior_weight: float = 16.0
    probe_every: int = 8  # probe cap 0 every probe_every * every steps where the predicted gain is small
    probe_below: float = 1.5  # probe only where the model predicts less than this gain over cap 0
    fresh_steps: int = 256  # a measured rate older than this many steps is measured again
    per_request: bool = True  # under the cap, each request's own length (False: the cap for all)


class _Fit:
    """y = a + sum_i b_i * x_i by weighted least squares with forgetting, the slopes shrunk towards
    0 (by `shrink` times the regressor's mean squared) until the data vary enough to show them, and
    never negative (a cost never falls with more work: a slope that would is dropped and the rest
    refitted). With one regressor a line, with two a plane. shrink: one for all slopes, or one each."""

    def __init__(self, n: int, forget: float, shrink: float | tuple[float, ...]) -> None:
        self.n, self.forget = n, forget
        self.shrink = tuple(shrink) if isinstance(shrink, tuple) else (shrink,) * n
        self.w = 0.0
        self.sx, self.sy = [0.0] * n, 0.0
        self.sxx = [[0.0] * n for _ in range(n)]
        self.sxy = [0.0] * n
        self._coefficients: tuple[float, ...] | None = None  # solved once per add, not per use

    def add(self, *xy: float) -> None:
        *x, y = xy
        f = self.forget
        self._coefficients = None
        self.w, self.sy = f * self.w + 1, f * self.sy + y
        for i in range(self.n):
            self.sx[i] = f * self.sx[i] + x[i]
            self.sxy[i] = f * self.sxy[i] + x[i] * y
            for j in range(self.n):
                self.sxx[i][j] = f * self.sxx[i][j] + x[i] * x[j]

    @property
    def seen(self) -> bool:
        return self.w > 0

    def coefficients(self) -> tuple[float, ...]:
        """(a, b_1, ..., b_n). A decision asks thousands of times between two adds (64 requests x
        caps x Dinkelbach rounds), so the solve is kept until the next add."""
        if self._coefficients is None:
            self._coefficients = self._solve()
        return self._coefficients

    def _solve(self) -> tuple[float, ...]:
        w = self.w
        mx, my = [s / w for s in self.sx], self.sy / w
        # centred sums: the slopes' evidence, each shrunk by its prior
        cov = [[self.sxx[i][j] - w * mx[i] * mx[j] + (self.shrink[i] * mx[i] * mx[i] + 1e-12 if i == j else 0.0)
                for j in range(self.n)] for i in range(self.n)]
        rhs = [self.sxy[i] - w * mx[i] * my for i in range(self.n)]
        free = list(range(self.n))
        b = [0.0] * self.n
        while free:
            sol = _solve([[cov[i][j] for j in free] for i in free], [rhs[i] for i in free])
            b = [0.0] * self.n
            for i, v in zip(free, sol):
                b[i] = v
            worst = min(free, key=lambda i: b[i])
            if b[worst] >= 0:
                break
            free.remove(worst)
            b[worst] = 0.0
        return (my - sum(bi * m for bi, m in zip(b, mx)), *b)

    def __call__(self, *x: float) -> float:
        a, *b = self.coefficients()
        return max(0.0, a + sum(bi * xi for bi, xi in zip(b, x)))


def _solve(m: list[list[float]], v: list[float]) -> list[float]:
    """m z = v by Gaussian elimination with partial pivoting (m small, symmetric positive definite)."""
    n = len(v)
    a = [row[:] + [v[i]] for i, row in enumerate(m)]
    for c in range(n):
        p = max(range(c, n), key=lambda r: abs(a[r][c]))
        a[c], a[p] = a[p], a[c]
        for r in range(c + 1, n):
            f = a[r][c] / a[c][c]
            for k in range(c, n + 1):
                a[r][k] -= f * a[c][k]
    z = [0.0] * n
    for r in reversed(range(n)):
        z[r] = (a[r][n] - sum(a[r][k] * z[k] for k in range(r + 1, n))) / a[r][r]
    return z


@dataclass
class _Acceptance:
    """One request's per-token acceptance: accepted tokens and rejections, with a prior."""

    accepted: float = 0.0
    rejected: float = 0.0
    mean_len: float | None = None  # of its uncapped chunks (AdaEDL's own stopping)

    def alpha(self, prior: float, weight: float) -> float:
        a = (self.accepted + weight * prior) / (self.accepted + self.rejected + weight)
        return min(a, 0.99)


class Round(NamedTuple):
    """One request in one step, as the controller counts it (SpecBatch.step measures it)."""

    rid: str
    judged: int  # draft tokens its verify judged
    accepted: int  # of those, accepted
    drafted: int  # the chunk it drafted this step
    capped: bool  # the cap shortened its window
    adaedl: bool


@dataclass
class StepObservation:
    """What one step did, as the controller needs it (SpecBatch.step measures it)."""

    batch: int  # requests in the step
    verified_tokens: int  # rows the verify scored: SD a chunk + 1, PEARL its pending + 1, AR 1
    drafting: int  # requests that drafted
    positions: int  # the longest chunk drafted (the positions a batched draft runs)
    draft_s: float  # drafting compute
    rest_s: float  # the step's time apart from drafting (verify, judging, waiting, bookkeeping)
    concurrent: bool = False  # drafting ran beside the verify (PEARL with a drafter of its own)
    emitted: int = 0  # tokens the step gave its requests
    step_s: float = 0.0  # the step's wall time
    joined: int = 0  # requests whose prompt this step fed (their first step): a prefill's time
    forward_rows: int = 0  # rows the verify forward computed (its padded rectangle); 0: verified_tokens


@dataclass
class Candidate:
    rid: str
    window: int  # what it would draft uncapped (max_draft, room-limited)
    adaedl: bool
    pearl: bool  # PEARL drafts beside the verify where its drafter can (the steps say whether it did)


@dataclass
class LoadController:
    config: LoadControlConfig = field(default_factory=LoadControlConfig)
    # R(B, q): the rows a forward of B requests of at most q tokens computes (the verifier engine's
    # forward_rows; SpecBatch sets it). None: the rows scored.
    forward_rows: Callable[[int, int], int] | None = None

    def __post_init__(self) -> None:
        c = self.config
        # F(B, R, N): seconds against requests, the rows the forward computed and the rows it
        # scored. Rows alone would read a batch's per-request cost as a per-row cost (rows =
        # batch x (k + 1) at a fixed k): long drafts would look dear at a large batch.
        # Where every request verifies alike the two row counts are one regressor: the scored rows'
        # slope is shrunk harder, so the fit gives such a cost to the rows computed (what the
        # forward does) until windows of different lengths in one step tell them apart.
        self.rest = _Fit(4, c.forget, (c.shrink, c.shrink, c.step_shrink, 0.01))  # + prompts fed (observe)
        # Drafting K positions for B' requests: K * (d0 + d1 * B') + e0 + e1 * B', the e part a
        # step's own (the drafter's catch-up forward, launches). Fitted per position, against
        # (B', 1 / K, B' / K): with the e slopes shrunk to 0 until K has varied, a cost the fit
        # cannot yet split counts per position, which over-prices long drafts, not short ones (B' / K
        # and B' are one regressor while K is fixed: the per-step slope is shrunk harder).
        self.per_position = _Fit(4, c.forget, (c.shrink, c.step_shrink, c.step_shrink, 0.01))
        self.requests: dict[str, _Acceptance] = {}
        self.lane = _Acceptance()
        self.steps = 0
        self.overlap = 0.0  # how often a step with drafting ran it beside the verify (EMA)
        self.cap: int | None = None  # None: no cap (what requests ask for)
        self.base: int | None = None  # the cap the next rise starts from (the cap, unless it was a probe)
        self.lengths: dict[str, int] = {}  # each request's length under the cap, where the model chose one
        self.newcomer: int | None = None  # the length of a request that joined since (None: the cap)
        self._decided: frozenset[str] = frozenset()  # the requests the last decision planned for
        self._since = 0
        self.last_goodput: dict[int, float] = {}
        self.realized: dict[tuple[int, int], _Rate] = {}  # (batch bucket, cap or -1 for none): measured
        self._last_probe = -(1 << 30)  # the step of the last probe of cap 0
        # Steps that captured a CUDA graph or compiled a kernel (a first use of a shape) take 100-1000x
        # a normal one: they are counted as stalls, not as costs (else one capture keeps a lane from
        # drafting for hundreds of steps).
        self._rest_typical, self._position_typical = _Typical(), _Typical()
        self._drafted_at = 0  # the step of the last drafting cost observed
        self._batch = 0  # requests at the last decision
        self._entered = -(1 << 30)  # the step the batch size entered its bucket (the first: long ago)
        self._left = 0  # the bucket it came from

    # -- observing ---------------------------------------------------------------------------
    def observe(self, step: StepObservation, rounds: list[Round]) -> None:
        self.steps += 1
        # The measured rates leave out steps that fed prompts: a prefill is the request's cost
        # whatever the cap, and at 64 requests some 60% of steps feed one, 3x a normal step; in
        # a decision's 8 steps, how many happened to was what a rate compared.
        if step.step_s > 0 and not step.joined:
            key = (_bucket(step.batch), -1 if self.cap is None else self.cap)
            rate = self.realized.setdefault(key, _Rate())
            if rate.typical.accept(step.step_s / max(step.emitted, 1)):
                rate.add(step.emitted, step.step_s, self.steps, self.config.forget)
        # A step that fed prompts pays their prefill on top (10+ ms on a GPU when eager), in the
        # verify and in drafting; under continuous batching most steps admit a request. The fits
        # give it a regressor of its own (prompts fed) and predict for steps that feed none: every
        # request pays its prefill once whatever the lengths. Such steps skip the stall filter,
        # which compares a step with the recent median of steps that fed none.
        j = step.joined
        if j or self._rest_typical.accept(step.rest_s / max(step.verified_tokens, 1)):
            self.rest.add(step.batch, step.forward_rows or step.verified_tokens, step.verified_tokens, j, step.rest_s)
        if step.positions > 0 and step.drafting > 0:
            if j or self._position_typical.accept(step.draft_s / step.positions):
                k, b = step.positions, step.drafting
                self.per_position.add(b, 1 / k, b / k, j / k, step.draft_s / k)
                self._drafted_at = self.steps
            self.overlap = 0.9 * self.overlap + 0.1 * float(step.concurrent)
        self._acceptance(rounds)

    def _acceptance(self, rounds: list[Round]) -> None:
        for rid, judged, accepted, drafted, capped, adaedl in rounds:
            if judged > 0:
                rejected = 1.0 if accepted < judged else 0.0
                for acc in (self.requests.setdefault(rid, _Acceptance()), self.lane):
                    acc.accepted += min(accepted, judged)
                    acc.rejected += rejected
            if adaedl and not capped and drafted > 0:
                r = self.requests.setdefault(rid, _Acceptance())
                r.mean_len = drafted if r.mean_len is None else 0.8 * r.mean_len + 0.2 * drafted

    def finish(self, rid: str) -> None:
        self.requests.pop(rid, None)

    def length(self, rid: str) -> int | None:
        """The draft length for a request this step: its own under the cap; for a request that
        joined since the decision, a planned request's typical length; else the cap (None: none)."""
        own = self.lengths.get(rid, None if rid in self._decided else self.newcomer)
        if own is None:
            return self.cap
        return own if self.cap is None else min(own, self.cap)

    # -- deciding ----------------------------------------------------------------------------
    def decide(self, candidates: list[Candidate]) -> int | None:
        """The cap for the next steps (None: none), re-decided every `every` steps or when the
        batch size crosses a power of two (requests joining and leaving do not re-decide: a
        decision's steps are what its measured rate and probes need): the model's choice, its
        rise limited, then checked against the rates the lane measured."""
        self._since += 1
        if self._batch and _bucket(len(candidates)) == _bucket(self._batch) and self._since < self.config.every:
            return self.cap  # a request that joined meanwhile drafts to the cap
        self._since = 0
        speculating = [c for c in candidates if c.window > 0]
        if not speculating:  # nothing to cap: keep the cap for when drafting requests come back
            return self.cap
        bucket, last = _bucket(len(candidates)), _bucket(self._batch)
        if self._batch and bucket != last:
            if bucket != self._left:  # a batch on a bucket's edge (8 <-> 9 requests) stays steady
                self._entered = self.steps
            self._left = last
        self._batch = len(candidates)
        chosen, gain = self._choose(candidates, speculating)
        chosen = self._ramp(chosen, speculating)
        base = self.base
        self.cap = self._measured(len(candidates), chosen, gain)
        # A probe lasts one decision: the next one ramps from the cap before it, not from the probe.
        self.base = base if self._last_probe == self.steps else self.cap
        return self.cap

    def _ramp(self, chosen: int | None, speculating: list[Candidate]) -> int | None:
        """A cap falls at once but rises at most to double per decision (from 0: to the smallest
        window that can pay, 1, or 2 for PEARL, whose window of 1 yields what decoding does): a fit
        that forgot why it capped probes with short windows, not every request's whole window."""
        if self.base is None or (chosen is not None and chosen <= self.base):
            return chosen
        floor = 2 if all(c.pearl for c in speculating) else 1
        grown = max(floor, 2 * self.base)
        chosen = grown if chosen is None or chosen > grown else chosen
        return None if chosen >= max(c.window for c in speculating) else chosen

    def _choose(self, candidates: list[Candidate], speculating: list[Candidate]) -> tuple[int | None, float]:
        """The model's cap (None: none) and its predicted goodput over cap 0's."""
        if self.steps < self.config.warmup_steps or not self.per_position.seen:
            start = self.config.start_cap
            return (None if start is None or start >= max(x.window for x in speculating) else start), math.inf
        c = self.config
        seen = self.lane.accepted + self.lane.rejected
        lane_alpha = self.lane.alpha(c.prior_acceptance, c.prior_weight) if seen else c.prior_acceptance
        alphas = [self.requests.get(x.rid, _Acceptance()).alpha(lane_alpha, c.prior_weight) for x in speculating]
        lengths = {x.rid: self._uncapped(x) for x in speculating}
        top = max(lengths.values())
        overlapped = all(x.pearl for x in speculating) and self.overlap > 0.5
        fixed = len(candidates) - len(speculating)  # AR requests: one token each, one verified row
        # built apart, then swapped in: state() may read them from another thread
        goodput, plans, all_windows = {}, {}, {}
        for k in [k for k in CAPS if k < top] + [top]:
            windows = [min(k, lengths[x.rid]) for x in speculating]
            if c.per_request and not overlapped and k > 0:
                windows, goodput[k] = self._lengths(k, speculating, windows, alphas, fixed)
            else:
                goodput[k] = self._goodput(speculating, windows, alphas, fixed, overlapped)
            # a request left its whole (uncapped) window gets no length of its own: AdaEDL stops it
            plans[k] = {x.rid: w for x, w in zip(speculating, windows) if w < lengths[x.rid]}
            all_windows[k] = windows
        self.last_goodput = goodput
        best = max(goodput.values())
        chosen = min(k for k, g in goodput.items() if g >= (1 - c.tie) * best)
        if (any(x.adaedl for x in speculating) and goodput[top] >= (1 - c.tolerance) * best
                and (self.base is None or top <= 2 * self.base)):
            # AdaEDL's own stops: its long drafts come where acceptance runs high, which E(w) at
            # the mean acceptance does not credit. Only where the cap may rise that far at once:
            # else the rise limit would turn "no cap" into a cap between the model's best and none
            # that neither chose (on one H200 at 4 requests, caps of 10-12 ramped from 5-6 ran
            # 16-row verifies and three more draft positions for 2% more tokens a verify than a
            # cap of 7: 0.86x its tokens/s), and each rise, a cap never measured, escapes the
            # measured rates' veto.
            chosen = top
        gain = goodput[chosen] / max(goodput[0], 1e-12)
        if c.per_request:
            self.lengths, self._decided = plans[chosen], frozenset(x.rid for x in candidates)
            # A request that joins before the next decision drafts what a planned request
            # typically does (the median window), and the cap is the plan's own depth: past its
            # longest window it would only lengthen newcomers' drafts (at 64 requests a few join
            # every step). The median did better in benchmarks/controller_sim.py than the window
            # the plan would give a request of the lane's mean acceptance.
            self.newcomer = statistics.median_low(all_windows[chosen])
            chosen = min(chosen, max(all_windows[chosen]))
        else:
            self.lengths, self.newcomer = {}, None
        return (None if chosen >= top else chosen), gain

    def _goodput(self, speculating: list[Candidate], windows: list[int], alphas: list[float], fixed: int,
                 overlapped: bool) -> float:
        """Predicted tokens per second of a step with these windows (and `fixed` AR requests);
        alphas: the speculating requests' acceptances, in order."""
        tokens, rows, query = fixed, fixed, 1
        for x, w, alpha in zip(speculating, windows, alphas):
            # SD verifies its w drafts and a bonus row; PEARL its w - 1 pending tokens and the
            # last verified one, and the chunk's first token is judged there: w - 1 + 1 rows
            judged = w - 1 if x.pearl and w > 0 else w
            tokens += (1 - alpha ** (judged + 1)) / (1 - alpha)  # _expected, inline: the hot loop
            rows += judged + 1
            if judged >= query:
                query = judged + 1
        drafting = sum(w > 0 for w in windows)
        draft = self._draft(max(windows), drafting) if drafting else 0.0
        batch = fixed + len(speculating)
        # without the engine's rectangle the rows computed are the rows scored, as observe() takes them
        computed = rows if self.forward_rows is None else self.forward_rows(batch, query)
        rest = self.rest(batch, computed, rows, 0)
        step = max(rest, draft) if overlapped else rest + draft
        return tokens / step if step > 0 else 0.0

    def _lengths(self, k: int, speculating: list[Candidate], ceilings: list[int], alphas: list[float],
                 fixed: int) -> tuple[list[int], float]:
        """Each request's window under a batch depth of k, chosen jointly (Dinkelbach's method for
        a ratio), and the plan's predicted tokens per second: with the batch's tokens per second
        at lam, a request takes the window w that maximizes E(w) - lam * (its cost: w more scored
        rows, and k draft positions of one more drafting request when w > 0; the forward's
        rectangle is the plan's longest window's); lam is then the plan's own rate, until it stops
        rising. A request whose acceptance does not pay for its rows decodes (w = 0) while others
        draft."""
        windows = list(ceilings)
        lam = self._goodput(speculating, windows, alphas, fixed, False)
        b = self.rest.coefficients()[3]
        _, d1, _, e1, _ = self.per_position.coefficients()
        for _ in range(6):
            plan = [_best_window(alpha, x.pearl, ceiling, lam, b, d1 * k + e1)
                    for x, alpha, ceiling in zip(speculating, alphas, ceilings)]
            rate = self._goodput(speculating, plan, alphas, fixed, False)
            if rate <= lam * (1 + 1e-6):
                break
            windows, lam = plan, rate
        return windows, lam

    def _window(self, alpha: float, pearl: bool, ceiling: int, k: int, lam: float) -> int:
        """The window w <= ceiling maximizing E(w) - lam * (w scored rows, and k draft positions
        of one more drafting request when w > 0); 0: decode. E is concave in the judged tokens j
        (its step from j - 1 to j is alpha^j) and each costs lam * b, so the best j >= 1 is the
        last with alpha^j > lam * b: a logarithm, not a scan over windows (a decision at 64
        requests evaluates this thousands of times; `_window_scan` is the reference)."""
        b = self.rest.coefficients()[3]  # per scored row (the forward's rows are the depth's)
        _, d1, _, e1, _ = self.per_position.coefficients()  # per drafting request: per position, per step
        return _best_window(alpha, pearl, ceiling, lam, b, d1 * k + e1)

    def _window_scan(self, alpha: float, pearl: bool, ceiling: int, k: int, lam: float) -> int:
        """`_window` by trying every w (the slow reference the tests compare it with)."""
        b = self.rest.coefficients()[3]
        _, d1, _, e1, _ = self.per_position.coefficients()
        best_w, best_v = 0, 1.0
        for w in range(1, ceiling + 1):
            judged = w - 1 if pearl else w
            value = _expected(alpha, judged) - lam * (b * judged + d1 * k + e1)
            if value > best_v:
                best_v, best_w = value, w
        return best_w

    def _measured(self, batch: int, chosen: int | None, predicted_gain: float) -> int | None:
        """The measured rates (tokens/s per batch bucket and cap) overrule the model: a cap measured
        slower than another (by more than `tolerance`) gives way to it, and a cap measured faster
        than the one kept, but long ago, is measured again. Where the model predicts little gain
        over decoding, cap 0 is measured every probe_every * every steps."""
        c, bucket = self.config, _bucket(batch)
        # Probes only where the batch size has stayed in its bucket a decision long: a batch passing
        # through (a burst's tail draining 64 -> 0 in a few steps each bucket) would pay for
        # measurements it leaves behind (on one H200 the tail of a 64-request row probed 0, 1, 2
        # for 23 of its 120 steps).
        steady = self.steps - self._entered >= c.every
        seen = {k: r for (b, k), r in self.realized.items() if b == bucket and r.count >= c.every // 2}
        fresh = {k: r.rate for k, r in seen.items() if self.steps - r.last < c.fresh_steps}
        key = -1 if chosen is None else chosen
        if (key != 0 and 0 not in fresh and predicted_gain < c.probe_below and steady
                and self.steps - self._last_probe >= c.probe_every * c.every):
            self._last_probe = self.steps
            return 0  # probe: what does decoding alone give at this batch size now?
        if key == 0 and self.steps - self._drafted_at >= c.fresh_steps and self.steps - self._last_probe >= c.every:
            self._last_probe = self._drafted_at = self.steps
            return 2  # probe: drafting's cost is old news; measure it again
        best = max(fresh, key=fresh.get, default=None)
        if best is not None and key in fresh and fresh[best] > (1 + c.tolerance) * fresh[key]:
            key = best
        if key in fresh and steady and self.steps - self._last_probe >= 2 * c.every:
            stale = [k for k, r in seen.items() if k not in fresh and r.rate > (1 + c.tolerance) * fresh[key]]
            if stale:  # it was faster here once: is it still?
                self._last_probe = self.steps
                key = max(stale, key=lambda k: seen[k].rate)
        return None if key == -1 else key

    def _draft(self, positions: int, drafting: int) -> float:
        """Predicted drafting seconds: `positions` positions for `drafting` requests."""
        d0, d1, e0, e1, _ = self.per_position.coefficients()
        return max(0.0, positions * (d0 + d1 * drafting) + e0 + e1 * drafting)

    def _uncapped(self, x: Candidate) -> int:
        mean = self.requests.get(x.rid, _Acceptance()).mean_len if x.adaedl else None
        return x.window if mean is None else max(1, min(x.window, math.ceil(mean)))

    def state(self) -> dict:
        """For the lane's load() and metrics: the cap, the fitted costs and what was compared."""
        rest = self.rest.coefficients() if self.rest.seen else (None,) * 5
        pos = self.per_position.coefficients() if self.per_position.seen else (None,) * 5
        depth = self.cap if self.cap is not None else max((int(k) for k in self.last_goodput), default=None)
        now = self.realized.get((_bucket(self._batch), -1 if self.cap is None else self.cap))
        return {"cap": self.cap, "lengths": dict(self.lengths), "steps_observed": self.steps,
                "predicted_tokens_per_s": self.last_goodput.get(depth),
                "measured_tokens_per_s_now": now.rate if now is not None and now.count else None,
                "rest_ms": {"fixed": _ms(rest[0]), "per_request": _ms(rest[1]), "per_forward_row": _ms(rest[2]),
                            "per_token": _ms(rest[3]), "per_prompt": _ms(rest[4])},
                "draft_position_ms": {"fixed": _ms(pos[0]), "per_request": _ms(pos[1])},
                "draft_step_ms": {"fixed": _ms(pos[2]), "per_request": _ms(pos[3]), "per_prompt": _ms(pos[4])},
                "lane_acceptance": self.lane.alpha(self.config.prior_acceptance, self.config.prior_weight),
                "goodput_tokens_per_s": {str(k): round(v, 1) for k, v in self.last_goodput.items()},
                "measured_tokens_per_s": {f"batch<={b} cap={'none' if k == -1 else k}": round(r.rate, 1)
                                          for (b, k), r in sorted(self.realized.items())}}


class _Typical:
    """Whether a measurement is typical: after the first `skip` (start-up: captures, compiles),
    one at most `factor` times the median of the recent ones."""

    def __init__(self, window: int = 32, skip: int = 4, factor: float = 4.0) -> None:
        self.recent: deque[float] = deque(maxlen=window)
        self.skip, self.factor, self.seen = skip, factor, 0

    def accept(self, value: float) -> bool:
        self.seen += 1
        typical = self.seen > self.skip and value <= self.factor * statistics.median(self.recent)
        self.recent.append(value)
        return typical


@dataclass
class _Rate:
    """Tokens per second measured at one (batch bucket, cap), with forgetting."""

    tokens: float = 0.0
    seconds: float = 0.0
    count: int = 0  # steps measured
    last: int = 0  # the controller's step count at the last update
    typical: _Typical = field(default_factory=_Typical)

    def add(self, tokens: int, seconds: float, step: int, forget: float) -> None:
        self.tokens, self.seconds = forget * self.tokens + tokens, forget * self.seconds + seconds
        self.count, self.last = self.count + 1, step

    @property
    def rate(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0


def _bucket(batch: int) -> int:
    return 1 << max(0, batch - 1).bit_length()  # 1, 2, 4, 8, ...


def _best_window(alpha: float, pearl: bool, ceiling: int, lam: float, b: float, drafting: float) -> int:
    """LoadController._window with its costs given: b seconds per scored row, `drafting` seconds
    for one more drafting request (k positions and a step's share)."""
    extra = 1 if pearl else 0  # PEARL judges w - 1 of its w rows
    if ceiling <= extra or alpha <= 0.0:
        return 0
    price = lam * b  # what one more judged token costs, in tokens
    if price <= 0.0 or alpha >= 1.0:
        judged = ceiling - extra
    elif price >= 1.0:
        judged = 1
    else:
        judged = max(1, math.ceil(math.log(price) / math.log(alpha) - 1e-12) - 1)
    w = min(judged + extra, ceiling)
    judged = w - extra
    value = _expected(alpha, judged) - lam * (b * judged + drafting)
    return w if value > 1.0 else 0  # w = 0: one token (AR), one row (counted in both)


def _expected(alpha: float, window: int) -> float:
    """Tokens a verify yields for a window of drafts at per-token acceptance alpha (with the bonus)."""
    return (1 - alpha ** (window + 1)) / (1 - alpha)


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else 1000 * seconds
