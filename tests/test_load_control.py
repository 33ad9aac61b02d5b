"""The load controller (tandem/spec/load_control.py): its cost fits, the cap it picks in memory- and
compute-bound lanes, and that any cap it sets leaves the output exactly the target's."""
from __future__ import annotations

import itertools
import random

import pytest
from conftest import Scripted, make_pair, random_llama

from tandem.actors.offline import generate
from tandem.params import SamplingParams, SpecParams
from tandem.spec.load_control import (
    Candidate,
    LoadControlConfig,
    LoadController,
    Round,
    StepObservation,
    _expected,
    _Fit,
)

PROMPTS = [[1, 2, 3, 4, 5], [7, 8, 9], list(range(10, 40)), [42]]


def test_line_fit_recovers_a_line_and_shrinks_an_unseen_slope():
    line = _Fit(1, forget=1.0, shrink=0.2)
    for x in range(1, 200, 7):
        line.add(x, 0.5 + 0.01 * x)
    a, b = line.coefficients()
    assert b == pytest.approx(0.01, rel=0.05) and a == pytest.approx(0.5, abs=0.05)  # shrunk by ~2%
    flat = _Fit(1, forget=0.98, shrink=0.2)
    for _ in range(50):
        flat.add(64, 3.0)  # one batch size only: nothing says the cost grows with it
    assert flat.coefficients() == pytest.approx((3.0, 0.0))


def trained(rest, per_position, alpha: float, batch: int, windows=(2, 4, 8, 16), adaedl_len: int | None = None):
    """A controller that has watched steps of a lane whose costs are rest(N) (the step apart
    from drafting, N verified tokens) and per_position(B) (drafting one position for B requests),
    with every request accepting each draft token with probability alpha."""
    ctl = LoadController(LoadControlConfig(forget=1.0))
    for i, k in enumerate(itertools.islice(itertools.cycle(windows), 40)):
        b = max(1, batch - i % 3)  # the batch varies a little as requests come and go
        if adaedl_len is not None:
            k = adaedl_len
        accepted = round(alpha * (1 - alpha**k) / (1 - alpha))  # a geometric run's mean length, capped at k
        rounds = [Round(str(r), k, accepted, k, False, adaedl_len is not None) for r in range(b)]
        ctl.observe(StepObservation(b, b * (k + 1), b, k, k * per_position(b), rest(b * (k + 1))), rounds)
    return ctl


def candidates(batch: int, window: int, adaedl: bool = False) -> list[Candidate]:
    return [Candidate(str(r), window, adaedl, pearl=False) for r in range(batch)]


def test_a_memory_bound_lane_keeps_the_requested_window():
    # batch 1 on a GPU: the verify costs 1.5 ms whatever its length, a draft position 0.05 ms
    ctl = trained(rest=lambda n: 1.5e-3, per_position=lambda b: 5e-5, alpha=0.85, batch=1)
    assert ctl.decide(candidates(1, 8)) is None
    assert ctl.state()["cap"] is None and ctl.state()["steps_observed"] == 40


def test_a_compute_bound_lane_turns_speculation_off():
    # batch 64: every verified token costs 50 us; drafting is not free either
    ctl = trained(rest=lambda n: 1e-3 + 5e-5 * n, per_position=lambda b: 2e-4 + 1e-6 * b, alpha=0.6, batch=64)
    assert ctl.decide(candidates(64, 16)) == 0
    goodput = ctl.state()["goodput_tokens_per_s"]
    assert goodput["0"] == max(goodput.values())


def test_the_cap_shrinks_as_verify_cost_grows_with_load():
    def cap(batch):
        ctl = trained(rest=lambda n: 1.5e-3 + 4e-6 * n, per_position=lambda b: 2.5e-4, alpha=0.85, batch=batch)
        c = ctl.decide(candidates(batch, 16))
        return 16 if c is None else c

    caps = [cap(b) for b in (1, 8, 32, 64)]
    assert caps == sorted(caps, reverse=True) and caps[0] > caps[-1], caps


def test_adaedl_requests_are_judged_at_the_length_they_stop_at():
    # AdaEDL stops at ~3 tokens by itself: a cap of 16 costs nothing more, so none is set
    ctl = trained(rest=lambda n: 1.5e-3, per_position=lambda b: 2.5e-4, alpha=0.85, batch=1, adaedl_len=3)
    assert ctl.decide(candidates(1, 16, adaedl=True)) is None


def test_before_the_lane_has_been_watched_the_cap_is_the_start_cap():
    assert LoadController().decide(candidates(64, 16)) == 5  # LoadControlConfig.start_cap: never far from the best
    assert LoadController().decide(candidates(64, 4)) is None  # windows within it stay as asked
    assert LoadController(LoadControlConfig(start_cap=None)).decide(candidates(64, 16)) is None


@pytest.mark.parametrize("spec", [SpecParams("sd", 6, adaedl=False), SpecParams("sd", 8, adaedl=True),
                                  SpecParams("pearl", 5, adaedl=False), SpecParams("pearl", 5, adaedl=True)],
                         ids=["sd", "sd-adaedl", "pearl", "pearl-adaedl"])
def test_any_cap_keeps_greedy_output_exact(spec):
    target = random_llama(0)
    pair = make_pair(target, random_llama(0, layers=1))  # related drafter: partial acceptance
    ref = [d.token_ids for d in generate(pair, PROMPTS, SamplingParams(max_tokens=24), SpecParams("ar"))]
    ctl = Scripted([0, 2, None, 1, 3])
    done = generate(pair, PROMPTS, SamplingParams(max_tokens=24), spec, controller=ctl)
    assert [d.token_ids for d in done] == ref
    assert ctl.steps > 0 and ctl.lane.accepted + ctl.lane.rejected > 0  # it watched the steps
    assert not ctl.requests  # finished requests leave its table
    assert pair.target.free_slots == pair.draft.free_slots == 8


def test_a_cap_of_zero_decodes_as_ar():
    pair = make_pair(random_llama(0), random_llama(0, layers=1))
    done = generate(pair, PROMPTS, SamplingParams(max_tokens=12), SpecParams("sd", 4, adaedl=False), controller=Scripted([0]))
    assert all(d.stats.drafted == 0 and d.stats.steps == 12 for d in done)


def test_a_cap_falls_at_once_and_rises_at_most_to_double():
    ctl = Scripted([0, None, None, None, None, 3, None])
    caps = [ctl.decide(candidates(4, 8)) for _ in range(7)]
    assert caps == [0, 1, 2, 4, None, 3, 6]  # None: the requests' own window (8)


def test_a_cap_measured_slower_than_another_gives_way_to_it():
    ctl = trained(rest=lambda n: 1.5e-3, per_position=lambda b: 5e-5, alpha=0.85, batch=4)
    assert ctl.decide(candidates(4, 8)) is None  # the model: speculate in full
    for cap, emitted, seconds in ((0, 4, 1e-3), (None, 8, 4e-3)):  # measured: decoding is faster here
        ctl.cap = cap
        for _ in range(14):  # the first 4 of each are start-up (captures, compiles): not counted
            ctl.observe(StepObservation(4, 4, 0, 0, 0.0, seconds, emitted=emitted, step_s=seconds), [])
    ctl.cap = None
    caps = [ctl.decide(candidates(4, 8)[:3] + [Candidate("new", 8, False, False)]) for _ in range(ctl.config.every)]
    assert caps[-1] == 0  # at the next decision
    assert ctl.state()["measured_tokens_per_s"] == {"batch<=4 cap=0": 4000.0, "batch<=4 cap=none": 2000.0}


def test_a_decision_holds_for_its_steps_unless_the_batch_size_changes_bucket():
    ctl = Scripted([3, 5, 2, 4])
    ctl.config = LoadControlConfig(every=8)
    assert ctl.decide(candidates(4, 8)) == 3
    # requests come and go (continuous batching): a decision lasts its `every` steps, so that
    # what it measures (and a probe) is measured; a request that joins drafts to the cap
    assert [ctl.decide(candidates(4, 8)[1:] + [Candidate(f"n{i}", 8, False, False)]) for i in range(7)] == [3] * 7
    assert ctl.decide(candidates(4, 8)) == 5
    assert ctl.decide(candidates(9, 8)) == 2  # 4 -> 9 requests: decided again at once


def test_cap_zero_is_probed_only_where_the_model_predicts_little_gain():
    def picks(gain):
        ctl, out = LoadController(), []
        for _ in range(16):
            out.append(ctl._measured(4, 3, predicted_gain=gain))
            ctl.steps += 8  # a decision every 8 steps
        return out

    low = picks(1.2)
    assert low.count(0) == 2 and low[0] == low[8] == 0  # at once, then every 64 steps
    assert all(k == 3 for k in picks(2.0))  # clearly worth it: no probe


def test_a_batch_passing_through_a_bucket_is_not_probed():
    """A burst's tail drains 64 -> 0 requests, a few steps in each bucket: a probe of cap 0 there
    measures a bucket the lane is leaving. Where the batch stays a decision long, it probes."""
    ctl = LoadController()
    ctl._choose = lambda candidates, speculating: (3, 1.2)  # little predicted gain: probing territory
    caps = []
    for batch in (64, 32, 16, 8, 4, 2):  # each a bucket of its own, two steps each
        for _ in range(2):
            caps.append(ctl.decide(candidates(batch, 8)))
            ctl.steps += 1
    assert caps == [0, 0] + [3] * 10  # the first decision probes; the draining tail does not
    for _ in range(70):  # the batch stays at 2 requests
        caps.append(ctl.decide(candidates(2, 8)))
        ctl.steps += 1
    assert 0 in caps[12:]
    caps = []
    for i in range(200):  # a batch on a bucket's edge: 8 and 9 requests by turns, every 3 steps
        caps.append(ctl.decide(candidates(8 + (i // 3) % 2, 8)))
        ctl.steps += 1
    assert 0 in caps  # still probed


def test_a_rise_from_cap_zero_starts_where_a_window_can_pay():
    ctl = LoadController()
    ctl.cap = ctl.base = 0
    assert ctl._ramp(None, [Candidate("a", 8, False, pearl=False)]) == 1
    # PEARL's window of 1 yields what decoding does (its chunk's first token is judged the next step)
    assert ctl._ramp(None, [Candidate("a", 8, False, pearl=True)]) == 2
    assert ctl._ramp(1, [Candidate("a", 8, False, pearl=False)]) == 1  # at or under the cap: as chosen


@pytest.mark.parametrize("spec", [SpecParams("auto", 6, adaedl=True), SpecParams("sd", 6, adaedl=False),
                                  SpecParams("pearl", 5, adaedl=True)], ids=["auto", "sd", "pearl"])
def test_per_request_lengths_keep_greedy_output_exact(spec):
    """Every request its own length every step (0 included), drawn independently: the same tokens."""
    from conftest import ScriptedLengths

    pair = make_pair(random_llama(0), random_llama(0, layers=1))
    ref = [d.token_ids for d in generate(pair, PROMPTS, SamplingParams(max_tokens=24), SpecParams("ar"))]
    ctl = ScriptedLengths(5, seed=3)
    done = generate(pair, PROMPTS, SamplingParams(max_tokens=24), spec, controller=ctl)
    assert [d.token_ids for d in done] == ref
    assert sum(d.stats.drafted for d in done) > 0 and pair.target.free_slots == pair.draft.free_slots == 8


def test_auto_requests_get_lengths_without_a_lane_controller():
    """mode auto: the lane chooses; without load_control, requests that name a mode are left alone."""
    from tandem.actors.drafter import LocalDrafter
    from tandem.actors.offline import run_batch
    from tandem.spec.batch import SpecBatch

    pair = make_pair(random_llama(0), random_llama(0, layers=1))
    batch = SpecBatch(pair.target, LocalDrafter(pair.draft), set())
    ref = [d.token_ids for d in generate(pair, PROMPTS, SamplingParams(max_tokens=16), SpecParams("ar"))]
    mixed = [SpecParams("auto", 8, adaedl=True), SpecParams("sd", 4, adaedl=False)] * 2
    done = run_batch(batch, PROMPTS, SamplingParams(max_tokens=16), mixed)
    assert [d.token_ids for d in done] == ref
    assert batch.controller.steps > 0  # it watched the steps of the auto requests' batch


def test_the_controller_sees_the_rows_the_verify_forward_computed():
    """SpecBatch hands the controller its engine's rectangle (to plan with) and, every step, the
    rectangle the verify computed: the batch padded to its longest verified row count."""
    from tandem.actors.drafter import LocalDrafter
    from tandem.actors.offline import run_batch
    from tandem.spec.batch import SpecBatch

    pair = make_pair(random_llama(0), random_llama(0, layers=1))
    seen = []

    class Watching(LoadController):
        def observe(self, step, rounds):
            seen.append((step.forward_rows, step.batch, max(r.judged for r in rounds) + 1))
            super().observe(step, rounds)

    batch = SpecBatch(pair.target, LocalDrafter(pair.draft), set(), Watching())
    assert batch.controller.forward_rows == pair.target.forward_rows
    run_batch(batch, PROMPTS, SamplingParams(max_tokens=12), [SpecParams("auto", 6, adaedl=False)] * len(PROMPTS))
    assert seen and all(rows == pair.target.forward_rows(b, q) for rows, b, q in seen)


def test_joint_lengths_give_long_drafts_where_they_are_accepted():
    """A compute-bound batch: per-token verify cost is real. Requests that accept most drafts keep
    long windows; those that reject them decode (0) instead of dragging the batch's verify."""
    ctl = trained(rest=lambda n: 1e-3 + 2e-5 * n, per_position=lambda b: 1e-4 + 2e-6 * b, alpha=0.7, batch=16)
    good = [Candidate(f"g{i}", 8, False, pearl=False) for i in range(8)]
    poor = [Candidate(f"p{i}", 8, False, pearl=False) for i in range(8)]
    for c in good:  # their history: almost every draft accepted
        ctl.observe(StepObservation(16, 64, 16, 4, 1e-3, 2e-3), [Round(c.rid, 40, 39, 8, False, False)])
    for c in poor:  # theirs: almost every draft rejected at once
        ctl.observe(StepObservation(16, 64, 16, 4, 1e-3, 2e-3), [Round(c.rid, 1, 0, 8, False, False)] * 20)
    ctl._last_probe = ctl.steps  # the lengths, not a probe of cap 0
    ctl.decide(good + poor)
    lengths = {c.rid: ctl.length(c.rid) for c in good + poor}
    long = lengths["g0"] if lengths["g0"] is not None else 8
    assert long >= 3 and all(lengths[c.rid] == lengths["g0"] for c in good)
    assert all(lengths[c.rid] == 0 for c in poor), lengths


def test_the_window_rule_matches_trying_every_window():
    """`_window` (a logarithm) against `_window_scan` (every w): the same value of
    E(w) - lam * cost, over acceptances, prices, depths and both modes."""
    import random

    rng = random.Random(0)
    for _ in range(40):
        b, d1 = rng.uniform(1e-6, 1e-4), rng.uniform(0, 1e-4)
        ctl = trained(rest=lambda n, b=b: 1e-3 + b * n, per_position=lambda m, d1=d1: 1e-4 + d1 * m,
                      alpha=0.8, batch=rng.choice([4, 16, 64]))
        fb = ctl.rest.coefficients()[3]
        _, fd1, _, fe1, _ = ctl.per_position.coefficients()
        for _ in range(50):
            alpha, pearl = rng.choice([0.0, 0.05, 0.5, 0.8, 0.95, 0.99]), rng.random() < 0.3
            ceiling, k, lam = rng.randint(0, 16), rng.randint(1, 16), rng.uniform(0, 4e4)

            def value(w):
                j = w - 1 if pearl and w else w
                return 1.0 if w == 0 else _expected(alpha, j) - lam * (fb * j + fd1 * k + fe1)

            fast, slow = ctl._window(alpha, pearl, ceiling, k, lam), ctl._window_scan(alpha, pearl, ceiling, k, lam)
            assert value(fast) == pytest.approx(value(slow), rel=1e-9, abs=1e-9), (alpha, pearl, ceiling, k, lam)


def test_a_decision_at_64_requests_solves_each_fit_once():
    """Each fit is solved once per observation, not once per request, cap and round of a decision
    (at 64 requests that was ~100 ms of host time inside a step on an H200)."""
    ctl = trained(rest=lambda n: 1e-3 + 2e-5 * n, per_position=lambda b: 1e-4 + 2e-6 * b, alpha=0.8, batch=64)
    solves = []
    for fit in (ctl.rest, ctl.per_position):
        solve = fit._solve
        fit._solve = lambda solve=solve: solves.append(1) or solve()
        fit._coefficients = None
    ctl.decide(candidates(64, 16))
    assert len(solves) == 2


def test_a_stall_does_not_stop_a_lane_from_drafting():
    """A first use of a shape captures a CUDA graph: one draft takes 100 ms, not 0.25. Those steps
    count as stalls, so the cost fits stay those of normal steps and the lane goes on drafting."""
    ctl = LoadController(LoadControlConfig(forget=0.98))
    for i in range(60):
        draft = 0.4 if i in (0, 1, 2, 9, 30) else 8 * 2.5e-4  # captures, early and later
        rounds = [Round("0", 8, 6, 8, False, False)]
        ctl.observe(StepObservation(1, 9, 1, 8, draft, 1.5e-3, emitted=7, step_s=1.5e-3 + draft), rounds)
    cap = ctl.decide(candidates(1, 8))  # batch 1, memory-bound: speculate (6 of 8 accepted: 5 or more)
    assert cap is None or cap >= 5, cap
    assert ctl.state()["draft_position_ms"]["fixed"] < 1.0


def test_drafting_is_measured_again_when_its_cost_is_stale():
    """Decoding only (cap 0) means no new drafting costs: after fresh_steps, one decision drafts
    short windows to measure them again (else a fit that was wrong could never be corrected)."""
    ctl = LoadController()
    ctl.steps = 10
    assert ctl._measured(64, 0, predicted_gain=1.0) == 0  # drafting was measured recently enough
    ctl.steps += ctl.config.fresh_steps
    assert ctl._measured(64, 0, predicted_gain=1.0) == 2
    assert ctl._measured(64, 0, predicted_gain=1.0) == 0  # once


def test_after_a_probe_of_cap_zero_the_cap_comes_back_at_once():
    ctl = Scripted([None])  # the model: no cap
    ctl.base = ctl.cap = 6
    ctl.steps = 100
    ctl._last_probe = 100  # this decision was a probe of cap 0
    ctl.cap = 0
    assert ctl._ramp(None, [Candidate("a", 16, False, pearl=False)]) == 12  # from 6, not from 0


def test_the_verify_cost_tells_a_request_from_a_row():
    """rest = 1 ms + 20 us per request + 3 us per verified row. Fitted on rows alone, a batch of 64
    at k=4 would read the per-request cost as rows' (20/5 + 3 = 7 us a row); apart, long drafts
    stay cheap at a large batch."""
    plane = _Fit(2, forget=1.0, shrink=0.0)
    for batch in (8, 16, 32, 64):
        for k in (0, 2, 4, 8):
            rows = batch * (k + 1)
            plane.add(batch, rows, 1e-3 + 20e-6 * batch + 3e-6 * rows)
    a, per_request, per_row = plane.coefficients()
    assert (a, per_request, per_row) == pytest.approx((1e-3, 20e-6, 3e-6), rel=1e-3)
    assert plane(64, 64 * 5) == pytest.approx(1e-3 + 20e-6 * 64 + 3e-6 * 320)


def test_drafting_cost_tells_a_step_from_a_position():
    """Drafting K positions for B requests costs 0.4 ms + 20 us per request a step (the catch-up
    forward) and 0.2 ms + 3 us per request a position. Per position alone, a lane that drafted 3
    would price 8 positions at 8/3 of 3's cost; apart, the fit prices them right. Until K varies
    the split is unknown and the whole cost counts per position (long drafts over-priced)."""
    def cost(k, b):
        return 0.4e-3 + 20e-6 * b + k * (0.2e-3 + 3e-6 * b)

    ctl = LoadController(LoadControlConfig(forget=1.0))
    for b in (1, 8, 64):
        for _ in range(10):
            ctl.observe(StepObservation(b, b * 4, b, 3, cost(3, b), 1e-3), [])
    assert ctl._draft(8, 64) == pytest.approx(8 / 3 * cost(3, 64), rel=0.02)  # K never varied
    for _ in range(3):
        for b in (1, 8, 64):
            for k in (1, 2, 3, 5, 8, 12):
                ctl.observe(StepObservation(b, b * (k + 1), b, k, cost(k, b), 1e-3), [])
    assert ctl._draft(8, 64) == pytest.approx(cost(8, 64), rel=0.05)
    assert ctl._draft(16, 4) == pytest.approx(cost(16, 4), rel=0.1)


def test_auto_lets_adaedl_stop_a_draft_only_where_one_request_drafts(monkeypatch):
    # in a batch the drafter runs as many positions as the longest draft: a stop saves nothing there
    from tandem.actors.drafter import LocalDrafter
    from tandem.spec.batch import SpecBatch

    seen = []
    propose = LocalDrafter.propose
    monkeypatch.setattr(LocalDrafter, "propose", lambda self, items: seen.append(
        sorted((it.rid, it.adaedl) for it in items)) or propose(self, items))
    target = random_llama(0)
    pair = make_pair(target, random_llama(0, layers=1))
    ref = [d.token_ids for d in generate(pair, PROMPTS[:2], SamplingParams(max_tokens=10), SpecParams("ar"))]
    seen.clear()
    batch = SpecBatch(pair.target, LocalDrafter(pair.draft), pair.stop_ids, None)
    auto, pinned = SpecParams("auto", 4, adaedl=True), SpecParams("sd", 4, adaedl=True)
    out = {"0": [], "1": []}
    batch.add("0", PROMPTS[0], SamplingParams(max_tokens=10), auto)
    for e in batch.step():
        out[e.rid] += e.token_ids
    batch.add("1", PROMPTS[1], SamplingParams(max_tokens=10), pinned)
    while len(batch):
        for e in batch.step():
            out[e.rid] += e.token_ids
    assert seen[0] == [("0", True)]  # alone: AdaEDL stops its draft
    assert [("0", False), ("1", True)] in seen  # beside another: the auto request drafts its length; a pinned one keeps AdaEDL
    assert [out["0"], out["1"]] == ref


def test_a_prompts_prefill_is_fitted_apart_from_the_verify_and_the_draft():
    """Under continuous batching most steps feed a prompt (12 ms in the verify, 3 ms in the draft
    when eager on a GPU). Priced apart, the costs of the lengths come out as without joins."""
    def rest(b, rows):
        return 1.7e-3 + 5e-6 * b + 13e-6 * rows

    def draft(k, b):
        return 0.4e-3 + 20e-6 * b + k * (0.2e-3 + 3e-6 * b)

    ctl = LoadController(LoadControlConfig(forget=1.0))
    for i, (b, k) in enumerate(itertools.product((4, 16, 64), (1, 2, 3, 5, 8))):
        for j in range(6):
            joined = (i + j) % 3  # 0, 1 or 2 prompts this step
            ctl.observe(StepObservation(b, b * (k + 1), b, k, draft(k, b) + 3e-3 * joined,
                                        rest(b, b * (k + 1)) + 12e-3 * joined, joined=joined), [])
    a, per_request, per_forward_row, per_row, per_prompt = ctl.rest.coefficients()
    # every request drafted k here: the rows computed and the rows scored are one regressor
    assert per_forward_row + per_row == pytest.approx(13e-6, rel=0.05) and per_prompt == pytest.approx(12e-3, rel=0.05)
    assert ctl.rest(64, 64 * 6, 64 * 6, 0) == pytest.approx(rest(64, 64 * 6), rel=0.05)
    assert ctl._draft(8, 64) == pytest.approx(draft(8, 64), rel=0.05)
    assert ctl.state()["rest_ms"]["per_prompt"] == pytest.approx(12.0, rel=0.05)


def test_the_measured_rates_leave_out_steps_that_fed_prompts():
    """A prefill is a request's cost whatever the cap: a rate that counted join steps would compare
    how many happened to fall in a decision's steps, not the caps."""
    ctl = LoadController()
    for i in range(24):
        joined = i % 2  # every other step feeds a prompt and takes 3x as long
        ctl.observe(StepObservation(64, 64, 0, 0, 0.0, 4e-3 * (1 + 2 * joined), emitted=64,
                                    step_s=4e-3 * (1 + 2 * joined), joined=joined), [])
    (rate,) = ctl.realized.values()
    assert rate.count == 12 - 4 and rate.rate == pytest.approx(64 / 4e-3)  # (the first 4: start-up, skipped)


def test_a_request_that_joins_between_decisions_drafts_a_planned_requests_median_window(monkeypatch):
    # at 64 requests a few join every step; drafting them to the cap made the cap decide
    ctl = trained(rest=lambda n: 1.5e-3 + 2e-5 * n, per_position=lambda b: 5e-5 * b, alpha=0.85, batch=5)
    def lengths(plan):  # a fixed plan, at the goodput the model predicts for it
        return lambda k, spec, windows, alphas, fixed: (p := plan(k), ctl._goodput(spec, p, alphas, fixed, False))

    monkeypatch.setattr(ctl, "_lengths", lengths(lambda k: [min(k, w) for w in (0, 0, 2, 3, 3)]))
    cap = ctl.decide(candidates(5, 8))
    planned = [ctl.length(str(r)) for r in range(5)]
    assert cap == max(planned) and planned[:2] == [0, 0]  # the cap is the plan's own depth
    assert ctl.length("joined-since") == sorted(planned)[2]  # the median planned window
    monkeypatch.setattr(ctl, "_lengths", lengths(lambda k: [0] * 5))
    for _ in range(ctl.config.every):
        cap = ctl.decide(candidates(5, 8))
    assert cap == 0 and ctl.length("joined-since") == 0  # every request decodes: so do newcomers


def test_the_depth_is_priced_by_the_rows_the_forward_computes():
    """In CUDA graphs a verify computes its bucket's rectangle (64 requests x 8 rows for drafts of
    5, 6 or 7; x 16 for 8): the controller, told so, takes the bucket's edge, 7, which drafts two
    more positions than 5 for the same forward, and not 8, which doubles the forward (one H200's
    costs at 64 requests, T=0)."""
    from tandem.engine.llama import LlamaEngine

    rectangle = LlamaEngine(random_llama(0), max_slots=64, max_context=64, cuda_graphs=True).forward_rows

    def rest(b, computed):
        return 1.5e-3 + 8e-6 * b + 1.4e-6 * computed

    def draft(k, b):
        return 0.34e-3 + 18e-6 * b + k * 0.207e-3

    rng = random.Random(0)

    def accepted(k, alpha=0.87):  # a draft's accepted run: each token with probability alpha
        return next((j for j in range(k) if rng.random() > alpha), k)

    ctl = LoadController(LoadControlConfig(forget=1.0), forward_rows=rectangle)
    for i, k in enumerate(itertools.islice(itertools.cycle((3, 5, 7, 8, 12)), 60)):
        b = 64 - i % 3
        ctl.observe(StepObservation(b, b * (k + 1), b, k, draft(k, b), rest(b, rectangle(b, k + 1)),
                                    forward_rows=rectangle(b, k + 1)),
                    [Round(str(r), k, accepted(k), k, False, False) for r in range(b)])
    assert ctl.decide(candidates(64, 16)) == 7
    assert set(ctl.lengths.values()) <= {7}  # a shorter window saves only its own scored rows
    # without the rectangle (every row priced as computed) it stops short of the edge
    flat = LoadController(LoadControlConfig(forget=1.0))
    for i, k in enumerate(itertools.islice(itertools.cycle((3, 5, 7, 8, 12)), 60)):
        b = 64 - i % 3
        flat.observe(StepObservation(b, b * (k + 1), b, k, draft(k, b), rest(b, rectangle(b, k + 1))), [])
    assert flat.decide(candidates(64, 16)) != 7


def test_adaedl_keeps_its_own_stops_only_where_the_cap_may_rise_that_far():
    # AdaEDL stops at ~13 by itself, within tolerance of the model's best cap (10)
    def ctl_at(base):
        ctl = trained(rest=lambda n: 1.5e-3, per_position=lambda b: 5e-5, alpha=0.85, batch=4, adaedl_len=12)
        ctl.base = ctl.cap = base
        return ctl

    assert ctl_at(None).decide(candidates(4, 16, adaedl=True)) is None  # no cap to rise from: its own stops
    # from a cap of 6 the rise limit (12) cannot reach "none": the model's best, not a ramped 12
    # that neither the model nor AdaEDL chose
    ctl = ctl_at(6)
    cap, goodput = ctl.decide(candidates(4, 16, adaedl=True)), ctl.state()["goodput_tokens_per_s"]
    assert cap == 10 and goodput["10"] == max(goodput.values())
