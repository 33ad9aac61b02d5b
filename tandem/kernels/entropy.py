"""The drafter's next-token distribution and its entropy in one kernel (docs/design.md §5).

AdaEDL looks at the entropy H of the draft distribution after every drafted token; with torch
that is a softmax, a one-hot for greedy rows, a second softmax and an entropy, each a few
kernels and an [N, V] temporary. The Triton kernel reads the logits twice (online max /
sum-exp, then probabilities and entropy) and writes q once.

Semantics, per row (no top-k / top-p: rows that use them go through tandem.kernels.sampling):
    T > 0:  q = softmax(logits / T),  H = entropy(q)
    T <= 0: q = one_hot(argmax logits), H = entropy(softmax(logits))  (greedy: of the plain softmax)
    argmax = argmax(logits), the first index on ties (as torch.argmax)
"""
from __future__ import annotations

import torch

from tandem.kernels._triton import (
    first_argmax,
    jit,
    keep_first_max,
    pick_triton,
    tl,
    triton,
)
from tandem.kernels.sampling import entropy, logits_to_probs


def softmax_entropy(
    logits: torch.Tensor,  # [N, V] bf16 / fp16 / fp32
    temperature: torch.Tensor,  # [N] float32, <= 0 = greedy
    use_triton: bool | None = None,  # None: Triton on CUDA when installed
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # q [N, V] fp32, H [N] nats, argmax [N] int64
    """q, its entropy (of the plain softmax for greedy rows) and the argmax of each row."""
    if pick_triton(logits, use_triton):
        return softmax_entropy_triton(logits, temperature)
    return softmax_entropy_reference(logits, temperature)


def softmax_entropy_reference(
    logits: torch.Tensor,  # [N, V]
    temperature: torch.Tensor,  # [N]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pure torch, the composition tandem/actors/drafter.py uses with top-k and top-p off."""
    n = logits.shape[0]
    top_k = torch.zeros(n, dtype=torch.long, device=logits.device)
    top_p = torch.ones(n, dtype=torch.float32, device=logits.device)
    probs = logits_to_probs(logits, temperature, top_k, top_p)
    plain = torch.softmax(logits.float(), dim=-1)
    h = entropy(torch.where((temperature <= 0).unsqueeze(-1), plain, probs))
    return probs, h, logits.argmax(-1)


def softmax_entropy_triton(
    logits: torch.Tensor,  # [N, V], last dim contiguous (rows may be strided)
    temperature: torch.Tensor,  # [N] float32
    block_v: int = 1024,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One Triton program per row; the same results as softmax_entropy_reference up to rounding
    in exp / log / the sums (argmax and the greedy one-hot rows are exact)."""
    n, vocab = logits.shape
    assert temperature.shape == (n,), f"temperature {tuple(temperature.shape)} for {n} rows"
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    probs = torch.empty(n, vocab, dtype=torch.float32, device=logits.device)
    h = torch.empty(n, dtype=torch.float32, device=logits.device)
    argmax = torch.empty(n, dtype=torch.long, device=logits.device)
    if n == 0:
        return probs, h, argmax
    block = min(triton.next_power_of_2(vocab), block_v)
    _softmax_entropy_kernel[(n,)](
        logits, temperature.float().contiguous(), probs, h, argmax, vocab, logits.stride(0), BLOCK_V=block
    )
    return probs, h, argmax


@jit(do_not_specialize_on_alignment=["temp_ptr"])  # a view at any offset (rejection.py says why)
def _softmax_entropy_kernel(
    logits_ptr, temp_ptr, probs_ptr, h_ptr, argmax_ptr, V, stride_row, BLOCK_V: tl.constexpr
):
    row = tl.program_id(0).to(tl.int64)
    t = tl.load(temp_ptr + row)
    greedy = t <= 0.0
    t = tl.where(greedy, 1.0, t)  # greedy rows: entropy of the plain softmax
    in_row = logits_ptr + row * stride_row
    row_max, total, arg = _row_stats(in_row, t, V, BLOCK_V)
    # Pass 2: q = exp(x - max) / sum, its entropy -sum q log q (0 log 0 = 0, as tandem.kernels.sampling).
    h = tl.zeros([BLOCK_V], tl.float32)
    out_row = probs_ptr + row * V
    for start in range(0, V, BLOCK_V):
        offs = start + tl.arange(0, BLOCK_V)
        mask = offs < V
        raw = tl.load(in_row + offs, mask=mask, other=float("-inf")).to(tl.float32)
        p = tl.exp(tl.math.div_rn(raw, t) - row_max) / total
        h += tl.where(mask, -p * tl.log(tl.maximum(p, 1e-30)), 0.0)
        q = tl.where(greedy, tl.where(offs == arg, 1.0, 0.0), p)
        tl.store(out_row + offs, q, mask=mask)
    tl.store(h_ptr + row, tl.sum(h, axis=0))
    tl.store(argmax_ptr + row, arg.to(tl.int64))


@jit
def _row_stats(in_row, t, V, BLOCK_V: tl.constexpr):
    """Pass 1: max and sum of exp(x - max) of x = logits / T, and the argmax of the raw logits.

    Per lane, a running max m and sum s rescaled when m grows (online softmax, Milakov &
    Gimelshein 2018); the lanes are combined at the end.
    """
    m = tl.full([BLOCK_V], float("-inf"), tl.float32)
    s = tl.zeros([BLOCK_V], tl.float32)
    best = tl.full([BLOCK_V], float("-inf"), tl.float32)
    best_at = tl.zeros([BLOCK_V], tl.int32)
    for start in range(0, V, BLOCK_V):
        offs = start + tl.arange(0, BLOCK_V)
        raw = tl.load(in_row + offs, mask=offs < V, other=float("-inf")).to(tl.float32)
        x = tl.math.div_rn(raw, t)  # IEEE division, as torch: the same scaled logits
        m_new = tl.maximum(m, x)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a lane with only -inf so far
        s = s * tl.exp(m - m_safe) + tl.exp(x - m_safe)
        m = m_new
        best, best_at = keep_first_max(raw, offs, best, best_at)
    row_max = tl.max(m, axis=0)
    total = tl.sum(s * tl.exp(m - row_max), axis=0)
    return row_max, total, first_argmax(best, best_at, V)
