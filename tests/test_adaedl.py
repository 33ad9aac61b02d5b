import math

import pytest
from conftest import make_pair

from tandem.actors.drafter import LocalDrafter
from tandem.actors.offline import generate
from tandem.engine.llama import LlamaEngine
from tandem.errors import TandemError
from tandem.params import SamplingParams, SpecParams
from tandem.spec.adaedl import AcceptanceTable, AdaEDLConfig, AdaEDLState, CostRatio
from tandem.spec.messages import DraftItem, DraftRound


def test_stop_rule_is_the_entropy_lower_bound():
    s = AdaEDLState(AdaEDLConfig(gamma=0.2, lambda0=0.5))
    # 1 - sqrt(0.2 * H) < 0.5  <=>  H > 1.25
    assert not s.should_stop(1.2)
    assert s.should_stop(1.3)
    assert not s.should_stop(0.0)


def test_update_raises_lambda_when_acceptance_is_low():
    c = AdaEDLConfig(lambda0=0.5)
    s = AdaEDLState(c)
    s.update(n_drafted=4, n_accepted=0, max_len=8)
    assert math.isclose(s.acceptance, 0.5 * 0.9 + 0.5 * 0.0)
    assert math.isclose(s.lam, 0.9 * 0.5 + 0.1 * (0.5 + 0.01))


def test_update_lowers_lambda_when_acceptance_is_high_but_round_was_cut():
    s = AdaEDLState(AdaEDLConfig(lambda0=0.5))
    s.update(n_drafted=3, n_accepted=3, max_len=8)  # AR stays 0.95 >= 0.9, n_acc != L
    assert math.isclose(s.acceptance, 0.5 * 0.9 + 0.5 * 1.0)
    assert math.isclose(s.lam, 0.9 * 0.5 + 0.1 * (0.5 - 0.01))


def test_update_keeps_lambda_when_full_window_accepted():
    s = AdaEDLState(AdaEDLConfig(lambda0=0.5))
    s.update(n_drafted=8, n_accepted=8, max_len=8)
    assert math.isclose(s.lam, 0.5)


def test_empty_round_changes_nothing():
    s = AdaEDLState()
    s.update(0, 0, 8)
    assert (s.lam, s.acceptance) == (0.5, 0.9)


def _table(p: float) -> AcceptanceTable:
    """A table that estimates acceptance p at every entropy."""
    t = AcceptanceTable(gamma=0.2)
    t.accepted, t.seen = [p] * t.BINS, [1.0] * t.BINS
    return t


def _drafted(state: AdaEDLState, entropies: list[float]) -> int:
    n = 0
    for h in entropies:
        if state.stop_before(h):
            break
        n += 1
    return n


@pytest.mark.parametrize("p, c", [(0.5, 2.0), (0.9, 6.0), (0.8, 6.0), (0.95, 3.0), (0.6, 10.0), (0.3, 4.0)])
def test_cost_aware_stop_drafts_the_length_that_maximises_tokens_per_time(p, c):
    """With a constant acceptance p, a round of k drafts gives 1 + p + ... + p^k tokens for c + k
    draft-step times; drafting on while the next survival beats the rate stops at the best k."""
    best = max(range(1, 64), key=lambda k: (1 + sum(p**i for i in range(1, k + 1))) / (c + k))
    s = AdaEDLState(AdaEDLConfig(cost_ratio=c))
    s.begin_round(_table(p), c)
    assert _drafted(s, [1.0] * 64) == best


def test_cost_aware_stop_cuts_at_an_uncertain_token_and_keeps_the_first():
    t = AcceptanceTable(gamma=0.2)
    sure, unsure = 0.0, 5.0  # bound 1 (last bin) and bound < 0 (first bin)
    t.accepted[t._bin(sure)], t.seen[t._bin(sure)] = 0.99, 1.0
    t.accepted[t._bin(unsure)], t.seen[t._bin(unsure)] = 0.05, 1.0
    s = AdaEDLState(AdaEDLConfig())
    s.begin_round(t, 6.0)
    assert _drafted(s, [sure, sure, sure, unsure, sure]) == 3
    s.begin_round(t, 6.0)
    assert _drafted(s, [unsure, unsure]) == 1  # never an empty chunk
    s.begin_round(t, None)  # c not measured yet: the paper's rule (λ0 = .5 stops at H > 1.25)
    assert _drafted(s, [0.5, 1.0, 2.0, 0.1]) == 2


def test_paper_stop_ignores_the_cost_ratio():
    s = AdaEDLState(AdaEDLConfig(stop="paper", lambda0=0.5))
    s.begin_round(_table(0.01), 6.0)
    assert _drafted(s, [0.1] * 10) == 10  # bound 0.86 > λ everywhere


def test_acceptance_table_learns_from_judged_tokens_only():
    t = AcceptanceTable(gamma=0.2)
    h_a, h_b = 0.05, 3.0  # two different bins
    prior_b = t.p(h_b)
    for _ in range(500):  # 3 of 4 accepted at h_a; the token after the rejection is never judged
        t.observe([h_a, h_a, h_a, h_a, h_b], n_accepted=3)
    assert t.p(h_a) == pytest.approx(0.75, abs=0.02)
    assert t.p(h_b) == prior_b
    for _ in range(500):
        t.observe([h_b, h_a], n_accepted=2)  # a whole round accepted: no rejection
    assert t.p(h_b) > 0.95


def test_state_update_feeds_the_table():
    t = AcceptanceTable(gamma=0.2)
    s = AdaEDLState(AdaEDLConfig())
    s.begin_round(t, 4.0)
    before = list(t.seen)
    s.update(3, 1, 8, entropies=[0.1, 0.2, 0.3])  # one accepted, one rejected, one never judged
    assert sum(t.seen) - sum(before) == pytest.approx(2, abs=0.01)


def test_generate_teaches_the_pair_acceptance_by_entropy(target_model):
    """SD and PEARL rounds carry each token's draft entropy back to the drafter's table, which
    the pair keeps across generate() calls. The draft is the target: every greedy draft is
    accepted, so what the table learned must be acceptance ~1."""
    pair = make_pair(target_model, target_model)
    fresh = AcceptanceTable(gamma=0.2)
    for mode in ("sd", "pearl"):
        done = generate(pair, [[1, 2, 3], [7, 8]], SamplingParams(24, ignore_eos=True), SpecParams(mode, 4, adaedl=True))
        assert all(len(d.token_ids) == 24 for d in done)
    table = pair.acceptance[False]
    seen = sum(table.seen) - sum(fresh.seen)
    accepted = sum(table.accepted) - sum(fresh.accepted)
    assert seen > 20 and accepted / seen > 0.95
    assert pair.acceptance[True].seen == fresh.seen  # no sampled request ran


def test_drafter_measures_the_cost_ratio(target_model):
    d = LocalDrafter(LlamaEngine(target_model, max_slots=2), AdaEDLConfig())
    assert d.cost_ratio is None
    slot = d.start("r", seed=0)
    chunk = d.propose([DraftItem("r", slot, [1, 2, 3], 4, SamplingParams(), adaedl=True)])[0]
    d.update([DraftRound("r", len(chunk.ids), 1, 4, chunk.entropies)], step_s=0.5)
    assert len(chunk.entropies) == len(chunk.ids) >= 1
    assert d.cost_ratio is None  # that round fed the prompt: its time is not drafting's
    chunk = d.propose([DraftItem("r", slot, [1, 2, 3, chunk.ids[0]], 4, SamplingParams(), adaedl=True)])[0]
    e, per_position = d._cost.parts()
    assert e == 0.0 and d.cost_ratio == pytest.approx(0.5 / per_position) and d.cost_ratio > 1
    assert LocalDrafter(d.engine, AdaEDLConfig(cost_ratio=7.0)).cost_ratio == 7.0


def test_the_cost_ratio_counts_drafting_s_fixed_part_once():
    # a round of k positions costs 0.4 ms + 0.2 ms per position; a step apart from drafting 1.5 ms
    cost = CostRatio()
    assert cost.value is None
    cost.step(1.5e-3)
    cost.draft(8, 0.4e-3 + 8 * 0.2e-3)
    # one length only: the fixed part cannot be told apart, so each position carries its share
    assert cost.parts() == pytest.approx((0.0, 0.25e-3)) and cost.value == pytest.approx(6.0)
    for k in (4, 8, 12, 4, 8, 4):
        cost.draft(k, 0.4e-3 + k * 0.2e-3)
    e, d = cost.parts()
    assert e == pytest.approx(0.4e-3) and d == pytest.approx(0.2e-3)
    assert cost.value == pytest.approx((1.5e-3 + 0.4e-3) / 0.2e-3)  # 9.5: a position is cheap next to a step
    cost.draft(4, 0.4)  # a stall (a capture): left out
    cost.draft(8, 3e-3 + 8 * 0.2e-3, prefilled=True)  # a round that fed a prompt: left out
    assert cost.parts() == pytest.approx((0.4e-3, 0.2e-3))
    # rounds whose time barely grows with their length (the batch changed meanwhile): d keeps a
    # floor of half the mean time per position, so c cannot run away
    drift = CostRatio()
    drift.step(1.5e-3)
    for k, seconds in [(4, 2.0e-3), (8, 1.9e-3), (12, 2.1e-3), (4, 2.0e-3), (8, 2.0e-3)]:
        drift.draft(k, seconds)
    e, d = drift.parts()
    mean = 10.0e-3 / 36  # seconds per position over these rounds (about: the fit forgets old ones)
    assert d == pytest.approx(0.5 * mean, rel=0.02)
    assert drift.value < 2.1 * (1.5e-3 + 2.0e-3) / mean  # (step + a round) / half a position's mean time


@pytest.mark.parametrize("kwargs, words", [({"cost_ratio": 0.0}, "cost ratio must be > 0"),
                                           ({"cost_ratio": -3.0}, "cost ratio must be > 0"),
                                           ({"stop": "sometimes"}, "stop must be 'cost' or 'paper'")])
def test_bad_adaedl_settings_are_refused_clearly(kwargs, words):
    with pytest.raises(TandemError, match=words):
        AdaEDLConfig(**kwargs)
