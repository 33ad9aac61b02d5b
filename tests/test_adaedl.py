import math

from actors.adaedl import AdaEDLConfig, AdaEDLState


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
