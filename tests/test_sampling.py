import math

import torch

from tandem.kernels.sampling import entropy, logits_to_probs


def _probs(logits, t=1.0, k=0, p=1.0):
    n = logits.shape[0]
    return logits_to_probs(logits, torch.full((n,), t), torch.full((n,), k), torch.full((n,), p))


def test_greedy_rows_are_one_hot_on_argmax():
    logits = torch.tensor([[0.1, 3.0, 2.9, -1.0]])
    assert _probs(logits, t=0.0).tolist() == [[0.0, 1.0, 0.0, 0.0]]


def test_temperature_scales_logits():
    logits = torch.tensor([[1.0, 2.0, 3.0]])
    expected = torch.softmax(logits / 0.5, -1)
    assert torch.allclose(_probs(logits, t=0.5), expected)


def test_top_k_keeps_k_largest():
    logits = torch.tensor([[1.0, 4.0, 3.0, 2.0]])
    probs = _probs(logits, k=2)
    assert probs[0, 0] == 0 and probs[0, 3] == 0
    assert torch.allclose(probs[0, 1:3], torch.softmax(torch.tensor([4.0, 3.0]), -1))


def test_top_p_keeps_smallest_set_reaching_p():
    probs_in = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    probs = _probs(probs_in.log(), p=0.7)  # 0.5 < 0.7, 0.5+0.3 >= 0.7: keep two
    assert torch.allclose(probs, torch.tensor([[0.5 / 0.8, 0.3 / 0.8, 0.0, 0.0]]))
    tiny_p = _probs(probs_in.log(), p=0.1)  # the top token is always kept
    assert tiny_p.tolist() == [[1.0, 0.0, 0.0, 0.0]]


def test_mixed_rows_use_their_own_parameters():
    logits = torch.tensor([[1.0, 2.0, 3.0], [1.0, 2.0, 3.0]])
    probs = logits_to_probs(logits, torch.tensor([0.0, 1.0]), torch.tensor([0, 0]), torch.tensor([1.0, 1.0]))
    assert probs[0].tolist() == [0.0, 0.0, 1.0]
    assert torch.allclose(probs[1], torch.softmax(logits[1], -1))


def test_entropy_of_uniform_and_one_hot():
    assert math.isclose(float(entropy(torch.full((1, 8), 1 / 8))), math.log(8), rel_tol=1e-6)
    assert float(entropy(torch.tensor([[0.0, 1.0, 0.0]]))) == 0.0
