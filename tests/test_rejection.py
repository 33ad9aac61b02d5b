"""The rejection sampler on hand-built cases, and its single-step distribution."""
import pytest
import torch
from scipy.stats import chisquare

from tandem.kernels.rejection import (
    draw_randoms,
    rejection_sample,
    rejection_sample_reference,
)
from tandem.kernels.streams import Stream

V = 4


def one_hot(i):
    return torch.nn.functional.one_hot(torch.tensor(i), V).float()


def run(draft, p_rows, q_rows=None, bonus=True, uniforms=None, noise=None):
    """One request: draft ids, target rows [n+1, V], draft rows [n, V]."""
    n = len(draft)
    k = max(n, 1)
    ids = torch.tensor([draft + [0] * (k - n)])
    p = torch.zeros(1, k + 1, V)
    p[0, : len(p_rows)] = torch.stack(p_rows)
    q = None
    if q_rows is not None:
        q = torch.zeros(1, k, V)
        q[0, :n] = torch.stack(q_rows) if q_rows else q[0, :n]
    u = uniforms if uniforms is not None else torch.full((1, k), 0.5)
    e = noise if noise is not None else torch.ones(1, V)
    out = rejection_sample(ids, torch.tensor([n]), q, p, torch.tensor([bonus]), u, e)
    return out.output_ids[0, : int(out.num_emitted[0])].tolist(), int(out.num_accepted[0])


def test_greedy_perfect_match_accepts_all_and_adds_bonus():
    tokens, acc = run([1, 2, 3], [one_hot(1), one_hot(2), one_hot(3), one_hot(0)], [one_hot(1), one_hot(2), one_hot(3)])
    assert (tokens, acc) == ([1, 2, 3, 0], 3)


def test_greedy_first_token_mismatch_gives_target_argmax():
    tokens, acc = run([1, 2], [one_hot(3), one_hot(2), one_hot(0)], [one_hot(1), one_hot(2)])
    assert (tokens, acc) == ([3], 0)


def test_greedy_mismatch_in_the_middle_truncates():
    tokens, acc = run([1, 2, 3], [one_hot(1), one_hot(0), one_hot(3), one_hot(2)], [one_hot(1), one_hot(2), one_hot(3)])
    assert (tokens, acc) == ([1, 0], 1)


def test_empty_draft_emits_just_the_bonus():
    tokens, acc = run([], [one_hot(2)], [])
    assert (tokens, acc) == ([2], 0)


def test_no_bonus_when_not_asked():
    tokens, acc = run([1], [one_hot(1), one_hot(3)], [one_hot(1)], bonus=False)
    assert (tokens, acc) == ([1], 1)


def test_one_hot_draft_accepts_iff_uniform_below_p():
    p = torch.tensor([0.1, 0.6, 0.2, 0.1])
    accept, _ = run([1], [p, one_hot(0)], None, uniforms=torch.tensor([[0.59]]))
    assert accept == [1, 0]
    # Rejected: the correction is drawn from p with token 1 masked: noise picks argmax of the rest.
    reject, acc = run([1], [p, one_hot(0)], None, uniforms=torch.tensor([[0.61]]))
    assert acc == 0 and reject == [2]


def test_sampled_rejection_draws_correction_from_residual():
    p = torch.tensor([0.4, 0.1, 0.4, 0.1])
    q = torch.tensor([0.1, 0.7, 0.1, 0.1])
    # p(1)/q(1) = 1/7; u = 0.5 rejects; residual max(0, p - q) = [.3, 0, .3, 0]
    noise = torch.tensor([[1.0, 1e-9, 2.0, 1e-9]])  # tiny noise would favour 1 and 3: they have no mass
    tokens, acc = run([1], [p, one_hot(0)], [q], noise=noise)
    assert (tokens, acc) == ([0], 0)


def test_mixed_batch_each_row_independent():
    ids = torch.tensor([[1, 2], [3, 0], [0, 0]])
    num = torch.tensor([2, 1, 0])
    p = torch.stack([
        torch.stack([one_hot(1), one_hot(2), one_hot(3)]),
        torch.stack([one_hot(2), one_hot(0), one_hot(0)]),
        torch.stack([one_hot(1), one_hot(0), one_hot(0)]),
    ])
    q = torch.stack([torch.stack([one_hot(1), one_hot(2)]), torch.stack([one_hot(3), one_hot(0)]), torch.zeros(2, V)])
    out = rejection_sample(ids, num, q, p, torch.tensor([True, True, False]), torch.zeros(3, 2), torch.ones(3, V))
    assert out.num_accepted.tolist() == [2, 0, 0]
    assert out.num_emitted.tolist() == [3, 1, 0]
    assert out.output_ids.tolist() == [[1, 2, 3], [2, -1, -1], [-1, -1, -1]]


def test_draw_randoms_is_per_request_reproducible():
    s1, s2 = Stream(7), Stream(7)
    u1, n1 = draw_randoms([s1], [2], 2, V, "cpu")
    u2, n2 = draw_randoms([Stream(3), s2], [5, 2], 5, V, "cpu")
    assert torch.equal(u1[0], u2[1, :2]) and torch.equal(n1[0], n2[1])
    assert s1.position == s2.position == 2 + V  # the next draws go on from the same place
    u3, _ = draw_randoms([s1], [2], 2, V, "cpu")
    assert not torch.equal(u3, u1)


@pytest.mark.parametrize("width", [1, 5, 1000, 5000, 40_000])
def test_the_cpu_hash_draws_the_references_values_bit_for_bit(width):
    from tandem.kernels.streams import draw_numpy, draw_torch

    keys = torch.tensor([[0, 0, 0], [7, 0, 3], [0xFFFFFFFF, 0x7FFFFFFF, (1 << 40) + 11], [12345, 678, 2**33 - 2],
                         [0xFFFFFFFF, 0xFFFFFFFF, 2**32 - 3]] * 3)  # positions across 2^32, rows past a block
    for exponential in (False, True):
        assert torch.equal(draw_numpy(keys, width, exponential), draw_torch(keys, width, exponential))


def test_streams_are_uniform_and_independent():
    """Chi-square over 64 bins of 64 streams' first 4096 uniforms (seeds 0..63: the worst case for
    a weak hash, neighbouring keys), and no correlation between neighbouring keys or positions."""
    u = draw_randoms([Stream(seed) for seed in range(64)], [0] * 64, 4096, 1, "cpu")[0]
    counts = torch.histc(u.flatten(), 64, 0, 1)
    expected = u.numel() / 64
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 110, chi2  # 63 degrees of freedom: p < 0.001 above ~104
    assert abs(float(torch.corrcoef(torch.stack([u[:, :-1].flatten(), u[:, 1:].flatten()]))[0, 1])) < 0.01
    assert abs(float(torch.corrcoef(torch.stack([u[:-1].flatten(), u[1:].flatten()]))[0, 1])) < 0.01
    noise = draw_randoms([Stream(1)], [0], 1, 200_000, "cpu")[1]
    assert abs(float(noise.mean()) - 1) < 0.01 and abs(float(noise.var()) - 1) < 0.03  # Exp(1)


def test_single_step_output_follows_p():
    """Many independent draws of the first emitted token: distribution must be p, not q."""
    torch.manual_seed(0)
    p = torch.tensor([0.5, 0.2, 0.2, 0.1])
    q = torch.tensor([0.1, 0.1, 0.3, 0.5])
    n = 6000
    drafts = torch.multinomial(q, n, replacement=True)
    ids = drafts.view(n, 1)
    qq = q.expand(n, 1, V)
    pp = torch.stack([p, p]).expand(n, 2, V)
    u, e = torch.rand(n, 1), torch.empty(n, V).exponential_()
    out = rejection_sample(ids, torch.ones(n, dtype=torch.long), qq, pp, torch.ones(n, dtype=torch.bool), u, e)
    counts = torch.bincount(out.output_ids[:, 0], minlength=V).double()
    assert chisquare(counts.numpy(), (p.double() / p.double().sum() * n).numpy()).pvalue > 1e-3
    # The same counts against q must be rejected: the test has power.
    assert chisquare(counts.numpy(), (q.double() / q.double().sum() * n).numpy()).pvalue < 1e-6


def _random_case(seed, batch=16, k=5, vocab=12, greedy_frac=0.3, one_hot=False):
    g = torch.Generator().manual_seed(seed)
    num = torch.randint(0, k + 1, (batch,), generator=g)
    p = torch.softmax(torch.randn(batch, k + 1, vocab, generator=g) * 2, -1)
    q = torch.softmax(torch.randn(batch, k, vocab, generator=g) * 2, -1)
    greedy = torch.rand(batch, generator=g) < greedy_frac
    p = torch.where(greedy[:, None, None], torch.nn.functional.one_hot(p.argmax(-1), vocab).float(), p)
    q = torch.where(greedy[:, None, None], torch.nn.functional.one_hot(q.argmax(-1), vocab).float(), q)
    ids = torch.multinomial(q.view(-1, vocab), 1, generator=g).view(batch, k)
    # Make some drafts agree with p's argmax so acceptance runs are long.
    agree = torch.rand(batch, k, generator=g) < 0.5
    ids = torch.where(agree, p[:, :k].argmax(-1), ids)
    bonus = torch.rand(batch, generator=g) < 0.7
    u = torch.rand(batch, k, generator=g)
    e = torch.empty(batch, vocab).exponential_(generator=g)
    return ids, num, (None if one_hot else q), p, bonus, u, e


@pytest.mark.parametrize("seed", range(20))
@pytest.mark.parametrize("one_hot", [False, True])
def test_batched_sampler_equals_reference(seed, one_hot):
    args = _random_case(seed, one_hot=one_hot)
    fast, ref = rejection_sample(*args), rejection_sample_reference(*args)
    assert torch.equal(fast.output_ids, ref.output_ids)
    assert torch.equal(fast.num_accepted, ref.num_accepted)
    assert torch.equal(fast.num_emitted, ref.num_emitted)


def test_batched_sampler_with_no_drafts_at_all():
    args = _random_case(0, k=0)
    fast, ref = rejection_sample(*args), rejection_sample_reference(*args)
    assert torch.equal(fast.output_ids, ref.output_ids)
