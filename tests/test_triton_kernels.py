"""Triton kernels against their torch references, on hand-built and random inputs.

Without CUDA the kernels run under Triton's interpreter, which TRITON_INTERPRET=1 switches on
only if it is set before triton is first imported; in a full test run torch._dynamo (imported
by transformers from tests/conftest.py) has imported triton already. So on CPU this module runs
itself again in a fresh process with TRITON_INTERPRET=1 (test_kernels_under_the_interpreter),
and its kernel tests skip in the parent. `TRITON_INTERPRET=1 pytest tests/test_triton_kernels.py`
runs them directly. The gpu-marked tests compile the kernels on larger shapes.
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")

from tandem.kernels.entropy import (
    softmax_entropy,
    softmax_entropy_reference,
    softmax_entropy_triton,
)
from tandem.kernels.rejection import (
    rejection_sample,
    rejection_sample_reference,
    rejection_sample_torch,
    rejection_sample_triton,
)

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
KERNELS_RUN_HERE = CUDA or os.environ.get("TRITON_INTERPRET") == "1"
REPO = Path(__file__).resolve().parent.parent
gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA device")


@pytest.fixture(autouse=True)
def kernels_run_here(request):
    if not KERNELS_RUN_HERE and request.node.originalname != "test_kernels_under_the_interpreter":
        pytest.skip("CPU: run in a fresh process by test_kernels_under_the_interpreter")


@pytest.mark.skipif(KERNELS_RUN_HERE, reason="the kernel tests run in this process")
def test_kernels_under_the_interpreter():
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    # --noconftest: the kernels need none of the model fixtures, and importing transformers is slow.
    cmd = [sys.executable, "-m", "pytest", "-q", "-x", "--noconftest", "-p", "no:cacheprovider", __file__]
    run = subprocess.run(cmd, check=False, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0 and " passed" in run.stdout, run.stdout[-6000:] + run.stderr[-3000:]


# --- softmax_entropy ---------------------------------------------------------------------------


def entropy_case(seed, n, vocab, dtype, greedy_frac=0.5, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(n, vocab, generator=g) * scale).to(dtype)
    temp = torch.rand(n, generator=g) * 1.5 + 0.05
    temp = torch.where(torch.rand(n, generator=g) < greedy_frac, 0.0, temp)
    return logits.to(DEVICE), temp.to(DEVICE)


def assert_entropy_matches(logits, temp, **kw):
    probs, h, arg = softmax_entropy_triton(logits, temp, **kw)
    ref_probs, ref_h, ref_arg = softmax_entropy_reference(logits, temp)
    assert torch.equal(arg, ref_arg), (arg, ref_arg)
    torch.testing.assert_close(probs, ref_probs, atol=1e-6, rtol=1e-4)
    torch.testing.assert_close(h, ref_h, atol=1e-5, rtol=1e-5)
    greedy = temp <= 0
    assert torch.equal(probs[greedy], ref_probs[greedy])  # one-hot rows are exact


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n,vocab", [(1, 300), (5, 1000), (3, 257)])
def test_softmax_entropy_matches_reference(dtype, n, vocab):
    logits, temp = entropy_case(n * vocab, n, vocab, dtype)
    assert_entropy_matches(logits, temp)


def test_softmax_entropy_several_blocks_and_a_partial_tail():
    logits, temp = entropy_case(1, 4, 1000, torch.float32)  # 1000 = 7 * 128 + 104
    assert_entropy_matches(logits, temp, block_v=128)


def test_softmax_entropy_ties_take_the_first_index():
    logits = torch.zeros(3, 300)
    logits[0, [7, 200]] = 5.0  # tie across blocks of 128
    logits[1, [130, 131]] = 5.0  # tie inside one block
    logits[2, :] = 1.0  # all equal: index 0, uniform q, H = log V
    temp = torch.tensor([0.0, 0.0, 0.7])
    probs, h, arg = softmax_entropy_triton(logits.to(DEVICE), temp.to(DEVICE), block_v=128)
    assert arg.tolist() == [7, 130, 0]
    assert probs[0, 7] == 1 and probs[1, 130] == 1 and probs[:2].sum().item() == 2
    torch.testing.assert_close(h[2].cpu(), torch.tensor(300.0).log())


def test_softmax_entropy_with_masked_vocabulary():
    logits, temp = entropy_case(2, 4, 300, torch.float32)
    logits[:, 250:] = float("-inf")  # padded vocabulary rows
    logits[:, :128] = float("-inf")  # a whole first block of -inf
    assert_entropy_matches(logits, temp, block_v=128)


def test_softmax_entropy_dispatch():
    logits, temp = entropy_case(3, 2, 300, torch.float32)
    ref = softmax_entropy_reference(logits, temp)
    out = softmax_entropy(logits.cpu(), temp.cpu())  # CPU tensors: torch, unless asked
    cpu_ref = softmax_entropy_reference(logits.cpu(), temp.cpu())
    assert all(torch.equal(a, b) for a, b in zip(out, cpu_ref))
    probs, _, _ = softmax_entropy(logits, temp, use_triton=True)
    torch.testing.assert_close(probs, ref[0], atol=1e-6, rtol=1e-4)


# --- rejection_sample --------------------------------------------------------------------------


def rejection_case(seed, batch, k, vocab, greedy_frac=0.3, one_hot=False, accept_bias=0.5):
    """Random requests: mixed greedy / sampled rows, num_draft 0..K, bonus on and off."""
    g = torch.Generator().manual_seed(seed)
    num = torch.randint(0, k + 1, (batch,), generator=g)
    p = torch.softmax(torch.randn(batch, k + 1, vocab, generator=g) * 2, -1)
    q = torch.softmax(torch.randn(batch, k, vocab, generator=g) * 2, -1)
    greedy = torch.rand(batch, generator=g) < greedy_frac
    p = torch.where(greedy[:, None, None], torch.nn.functional.one_hot(p.argmax(-1), vocab).float(), p)
    q = torch.where(greedy[:, None, None], torch.nn.functional.one_hot(q.argmax(-1), vocab).float(), q)
    ids = torch.multinomial(q.view(-1, vocab), 1, generator=g).view(batch, k)
    agree = torch.rand(batch, k, generator=g) < accept_bias  # long acceptance runs too
    ids = torch.where(agree, p[:, :k].argmax(-1), ids)
    bonus = torch.rand(batch, generator=g) < 0.7
    u = torch.rand(batch, k, generator=g)
    e = torch.empty(batch, vocab).exponential_(generator=g)
    args = ids, num, (None if one_hot else q), p, bonus, u, e
    return tuple(a.to(DEVICE) if a is not None else None for a in args)


def assert_rejection_matches(args, **kw):
    fast = rejection_sample_triton(*args, **kw)
    for ref in (rejection_sample_torch(*args), rejection_sample_reference(*args)):
        assert torch.equal(fast.output_ids, ref.output_ids), (fast.output_ids, ref.output_ids)
        assert torch.equal(fast.num_accepted, ref.num_accepted)
        assert torch.equal(fast.num_emitted, ref.num_emitted)
    return fast


@pytest.mark.parametrize("one_hot", [False, True])
@pytest.mark.parametrize("seed,batch,k,vocab", [(0, 1, 1, 300), (1, 6, 4, 300), (2, 8, 5, 1000), (3, 4, 3, 257), (5, 16, 6, 300)])
def test_rejection_matches_references(seed, batch, k, vocab, one_hot):
    assert_rejection_matches(rejection_case(seed, batch, k, vocab, one_hot=one_hot))


@pytest.mark.parametrize("one_hot", [False, True])
def test_rejection_several_blocks_and_a_partial_tail(one_hot):
    assert_rejection_matches(rejection_case(4, 6, 4, 1000, one_hot=one_hot), block_v=128)


def test_rejection_with_no_drafts_at_all():
    out = assert_rejection_matches(rejection_case(5, 4, 0, 300))
    assert out.num_accepted.tolist() == [0] * 4


V = 300


def one_hot(i):
    return torch.nn.functional.one_hot(torch.tensor(i), V).float()


def single(draft, p_rows, q_rows=None, bonus=True, uniforms=None, noise=None):
    """One request's arguments: draft ids, target rows [n+1, V], draft rows [n, V] (None: one-hot)."""
    n = len(draft)
    k = max(n, 1)
    ids = torch.tensor([draft + [0] * (k - n)])
    p = torch.zeros(1, k + 1, V)
    p[0, : len(p_rows)] = torch.stack(p_rows)
    q = None
    if q_rows is not None:
        q = torch.zeros(1, k, V)
        if q_rows:
            q[0, :n] = torch.stack(q_rows)
    u = uniforms if uniforms is not None else torch.full((1, k), 0.5)
    e = noise if noise is not None else torch.ones(1, V)
    args = ids, torch.tensor([n]), q, p, torch.tensor([bonus]), u, e
    return tuple(a.to(DEVICE) if a is not None else None for a in args)


def emitted(out):
    return out.output_ids[0, : int(out.num_emitted[0])].tolist(), int(out.num_accepted[0])


def test_all_accepted_then_bonus():
    out = assert_rejection_matches(single([1, 2, 3], [one_hot(1), one_hot(2), one_hot(3), one_hot(299)], [one_hot(1), one_hot(2), one_hot(3)]))
    assert emitted(out) == ([1, 2, 3, 299], 3)


def test_first_draft_rejected_gives_target_argmax():
    out = assert_rejection_matches(single([1, 2], [one_hot(250), one_hot(2), one_hot(0)], [one_hot(1), one_hot(2)]))
    assert emitted(out) == ([250], 0)


def test_empty_draft_emits_just_the_bonus():
    out = assert_rejection_matches(single([], [one_hot(200)], []))
    assert emitted(out) == ([200], 0)


def test_no_bonus_when_not_asked():
    out = assert_rejection_matches(single([1], [one_hot(1), one_hot(3)], [one_hot(1)], bonus=False))
    assert emitted(out) == ([1], 1)


def test_one_hot_draft_rejected_masks_the_draft_token():
    p = torch.zeros(V)
    p[[0, 1, 2, 280]] = torch.tensor([0.1, 0.6, 0.2, 0.1])
    accept = assert_rejection_matches(single([1], [p, one_hot(0)], None, uniforms=torch.tensor([[0.59]])))
    assert emitted(accept) == ([1, 0], 1)
    reject = assert_rejection_matches(single([1], [p, one_hot(0)], None, uniforms=torch.tensor([[0.61]])))
    assert emitted(reject) == ([2], 0)  # unit noise: the largest remaining p wins


def test_rejection_with_p_equal_q_falls_back_to_p():
    p = torch.softmax(torch.randn(V, generator=torch.Generator().manual_seed(0)), -1)
    out = assert_rejection_matches(single([5], [p, one_hot(0)], [p.clone()], uniforms=torch.tensor([[1.0]])))
    assert emitted(out) == ([int(p.argmax())], 0)


def test_race_ties_take_the_first_index():
    p = torch.zeros(V)
    p[[10, 140, 290]] = 1 / 3  # equal weights in different blocks, unit noise
    out = assert_rejection_matches(single([], [p], []), block_v=128)
    assert emitted(out) == ([10], 0)


def test_rejection_dispatch():
    args = rejection_case(6, 4, 3, 300)
    ref = rejection_sample_torch(*args)
    on_cpu = rejection_sample(*(a.cpu() if a is not None else None for a in args))  # torch, unless asked
    assert torch.equal(on_cpu.output_ids, ref.output_ids.cpu())
    assert torch.equal(rejection_sample(*args, use_triton=True).output_ids, ref.output_ids)


# --- larger shapes, compiled on a GPU ----------------------------------------------------------


@gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("n,vocab", [(64, 32000), (7, 151936)])
def test_softmax_entropy_large_on_gpu(dtype, n, vocab):
    logits, temp = entropy_case(n, n, vocab, dtype)
    assert_entropy_matches(logits, temp)


@gpu
@needs_cuda
@pytest.mark.parametrize("one_hot", [False, True])
@pytest.mark.parametrize("batch,k,vocab", [(64, 8, 32000), (16, 5, 151936)])
def test_rejection_large_on_gpu(batch, k, vocab, one_hot):
    for seed in range(3):
        assert_rejection_matches(rejection_case(seed, batch, k, vocab, one_hot=one_hot))


# --- per-request random streams ----------------------------------------------------------------


@pytest.mark.parametrize("width", [1, 5, 1000, 2500])
def test_streams_kernel_draws_the_references_values(width):
    from tandem.kernels.streams import draw_torch, draw_triton

    keys = torch.tensor([[0, 0, 0], [7, 0, 3], [0xFFFFFFFF, 0x7FFFFFFF, (1 << 40) + 11], [12345, 678, 2**33 - 2]],
                        device=DEVICE)
    u, ref = draw_triton(keys, width, False), draw_torch(keys, width, False)
    assert torch.equal(u, ref)  # the same integers, the same floats
    assert 0 < u.min() and u.max() < 1
    torch.testing.assert_close(draw_triton(keys, width, True), draw_torch(keys, width, True), rtol=1e-6, atol=1e-6)


# --- warm-up ---------------------------------------------------------------------------------------


def test_warm_kernels_launches_every_specialization_and_nothing_where_torch_runs():
    from tandem.kernels.warmup import warm_kernels

    assert warm_kernels(64, "cpu", max_draft=3, use_triton=False) == 0
    # entropy per dtype + the streams' two + k = 0..3, q or not
    assert warm_kernels(64, DEVICE, max_draft=3, use_triton=True) == 3 + 2 + 4 * 2
    assert warm_kernels(64, DEVICE, max_draft=3, rejection=False, use_triton=True) == 3 + 2


# --- exact mode's fixed-tile matmul ------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16] if CUDA else [torch.float32])
def test_fixed_tile_matmul_gives_a_row_the_same_bits_whatever_the_other_rows(dtype):
    """Exact mode's property (tandem/kernels/exact.py): row m of x @ W.T is the same bits alone,
    in a verify's few rows or in a batch of many, and close to the torch product."""
    from tandem.kernels.exact import fixed_tile_matmul

    g = torch.Generator().manual_seed(0)
    x = torch.randn(150, 96, generator=g).to(DEVICE, dtype)  # K not a multiple of the tile: a masked tail
    w = torch.randn(200, 96, generator=g).to(DEVICE, dtype)  # N likewise
    bias = torch.randn(200, generator=g).to(DEVICE, dtype)
    full = fixed_tile_matmul(x, w, bias)
    # A row's place inside a tile changes with the batch too; GPU matrix instructions sum every
    # element alike, numpy's BLAS (the interpreter's tl.dot) not always: off CUDA, places alone.
    slices = [slice(0, 1), slice(64, 130), slice(128, 150)] + ([slice(3, 9), slice(149, 150)] if CUDA else [])
    for rows in slices:
        assert torch.equal(fixed_tile_matmul(x[rows].contiguous(), w, bias), full[rows])
    scrambled = x.clone()
    scrambled[1:] = torch.randn(149, 96, generator=g).to(DEVICE, dtype)  # other rows' values do not matter
    assert torch.equal(fixed_tile_matmul(scrambled, w, bias)[0], full[0])
    ref = torch.nn.functional.linear(x.float(), w.float(), bias.float())
    torch.testing.assert_close(full.float(), ref, rtol=1e-4 if dtype == torch.float32 else 2e-2,
                               atol=1e-4 if dtype == torch.float32 else 2e-1)
    logits = fixed_tile_matmul(x, w, out_dtype=torch.float32)  # fp32 logits of 16-bit rows
    assert logits.dtype == torch.float32 and torch.equal(fixed_tile_matmul(x[:5].contiguous(), w, out_dtype=torch.float32), logits[:5])
