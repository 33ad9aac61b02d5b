"""Exact mode: a position's logits that do not depend on what else the forward computes.

A GEMM library picks its kernel by the problem's shape. The number of rows (the tokens of a
step: 1 when one request decodes, 64 x 6 when 64 verify five drafts each) changes the tile
sizes, the split of the reduction over the inner dimension and the algorithm, and with them the
order in which a row's products are summed. In fp32 the orders round the same almost always; in
bf16 a greedy near-tie (the target's top two logits within a few bf16 steps) can then resolve
differently in SD than in AR, or alone than in a batch (He & Thinking Machines Lab, "Defeating
Nondeterminism in LLM Inference", 2025, call the property batch invariance).

A kernel run at one shape computes every row the same way whatever the other rows hold: its
tiles and its reduction order are fixed, and a row's dot products never mix with another
row's. So in exact mode every matmul of the target runs on blocks of EXACT_ROWS rows (the last
one zero-padded): each weight meets one shape, whatever the step. Attention runs one tile shape
and no key splits (tandem/kernels/attention.py, exact=True); RMSNorm, RoPE and SiLU already
handle one row per program. Tensor parallelism sums the ranks' partial outputs in rank order
(`ordered_all_reduce`) instead of an all-reduce whose algorithm follows the message size.

The cost: a decode of one row multiplies EXACT_ROWS rows (on a GPU the weight read dominates a
small batch's matmul, so little), and a step of many rows reads each weight once per block of
EXACT_ROWS instead of once (measured in BENCHMARKS.md).
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

EXACT_ROWS = 64  # rows of every matmul in exact mode


def fixed_rows_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                      out_dtype: torch.dtype | None = None, block: int = EXACT_ROWS) -> torch.Tensor:
    """x @ weight.T (+ bias) for x [N, K], computed `block` rows at a time, the last block
    zero-padded: row n's result does not depend on N or on the other rows. out_dtype: float32
    for fp32 outputs of 16-bit inputs (the logits), else x's dtype."""
    assert x.dim() == 2 and x.is_contiguous(), f"x must be contiguous [N, K] (cuBLAS picks by layout too), {tuple(x.shape)}"
    padded = pad_rows(x, block)  # a forward's hidden rows come whole (the engine pads them once): no copy
    if padded.shape[0] == block:
        return _matmul(padded, weight, bias, out_dtype)[: x.shape[0]]
    parts = [_matmul(padded[start : start + block], weight, bias, out_dtype) for start in range(0, padded.shape[0], block)]
    return torch.cat(parts)[: x.shape[0]] if parts else x.new_empty(0, weight.shape[0], dtype=out_dtype or x.dtype)


def pad_rows(x: torch.Tensor, block: int = EXACT_ROWS) -> torch.Tensor:
    """x [N, K] with zero rows after it up to a whole number of blocks (x itself if it is one):
    a forward pads once and its matmuls then run block by block with no copies."""
    n = x.shape[0]
    total = -(-n // block) * block
    if total == n:
        return x
    out = x.new_zeros(total, x.shape[1])
    out[:n].copy_(x)
    return out


def _matmul(x, weight, bias, out_dtype):
    if out_dtype is None or out_dtype == x.dtype:
        return F.linear(x, weight, bias)
    y = torch.mm(x, weight.t(), out_dtype=out_dtype)  # CUDA: 16-bit inputs, fp32 accumulate and output
    return y if bias is None else y + bias.to(out_dtype)


def ordered_all_reduce(partial: torch.Tensor, group) -> torch.Tensor:
    """The sum of every rank's `partial`, added in rank order on every rank: the same bits
    whatever the message size (an all-reduce's algorithm, hence its order, follows the size)."""
    parts = [torch.empty_like(partial) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, partial.contiguous(), group=group)
    total = parts[0].clone()
    for part in parts[1:]:
        total += part
    return total
