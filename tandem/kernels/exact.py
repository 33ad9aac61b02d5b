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

`fixed_tile_matmul` is the other way to the same property, in one launch for any number of rows:
a Triton matmul whose tile shape, reduction order (the inner dimension in BLOCK_K steps, in order,
no split) and instruction sequence are fixed whatever M, so a row's result depends on that row
alone, and a weight tile is read from memory once for all the rows that share it (grouped tile
order keeps it in L2). LlamaEngine(exact_tiles=True) uses it for exact mode on CUDA
(benchmarks/exact_bench.py measures it as `exact-tiles`); it is off by default until measured.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from tandem.kernels._triton import jit, pick_triton, tl, triton

EXACT_ROWS = 64  # rows of every matmul in exact mode
# fixed_tile_matmul's one configuration: nothing here may depend on the shape of a call
TILE_M, TILE_N, TILE_K, GROUP_M, TILE_WARPS, TILE_STAGES = 64, 128, 64, 8, 4, 3


def fixed_rows_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                      out_dtype: torch.dtype | None = None, block: int = EXACT_ROWS, tiles: bool = False) -> torch.Tensor:
    """x @ weight.T (+ bias) for x [N, K], computed `block` rows at a time, the last block
    zero-padded: row n's result does not depend on N or on the other rows. out_dtype: float32
    for fp32 outputs of 16-bit inputs (the logits), else x's dtype. tiles: on CUDA, one
    `fixed_tile_matmul` launch instead of the blocks."""
    assert x.dim() == 2 and x.is_contiguous(), f"x must be contiguous [N, K] (cuBLAS picks by layout too), {tuple(x.shape)}"
    if tiles and pick_triton(x, None):
        return fixed_tile_matmul(x, weight, bias, out_dtype)
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


def fixed_tile_matmul(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                      out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """x @ weight.T (+ bias) for x [M, K], weight [N, K], fp32 accumulation, in one Triton launch
    whose every tile is computed the same way whatever M (the module docstring): row m's result
    is the same bits for any M and any other rows. CUDA, or CPU under Triton's interpreter."""
    assert triton is not None, "fixed_tile_matmul needs triton"
    m, k = x.shape
    n = weight.shape[0]
    assert weight.shape[1] == k and weight.stride(1) == 1 and x.stride(1) == 1
    out = torch.empty(m, n, device=x.device, dtype=out_dtype or x.dtype)
    if m == 0:
        return out
    grid = (triton.cdiv(m, TILE_M) * triton.cdiv(n, TILE_N),)
    _fixed_tile_matmul_kernel[grid](
        x, weight, bias if bias is not None else weight, out, m, n, k, x.stride(0), weight.stride(0), out.stride(0),
        HAS_BIAS=bias is not None, IEEE=x.dtype == torch.float32, BLOCK_M=TILE_M, BLOCK_N=TILE_N,
        BLOCK_K=TILE_K, GROUP=GROUP_M, num_warps=TILE_WARPS, num_stages=TILE_STAGES)
    return out


@jit(do_not_specialize=["M"])
def _fixed_tile_matmul_kernel(x_ptr, w_ptr, b_ptr, out_ptr, M, N, K, stride_xm, stride_wn, stride_om,
                              HAS_BIAS: tl.constexpr, IEEE: tl.constexpr, BLOCK_M: tl.constexpr,
                              BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP: tl.constexpr):
    # Tiles in groups of GROUP row-tiles per column of tiles, so the row-tiles that read one weight
    # tile run together (L2); which program computes a tile changes with M, how it is computed not.
    pid = tl.program_id(0)
    tiles_m = tl.cdiv(M, BLOCK_M)
    tiles_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP * tiles_n
    first_m = (pid // per_group) * GROUP
    group_m = tl.minimum(tiles_m - first_m, GROUP)
    pid_m = first_m + (pid % per_group) % group_m
    pid_n = (pid % per_group) // group_m
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    inner = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for start in range(0, K, BLOCK_K):
        ks = start + inner
        a = tl.load(x_ptr + rows[:, None] * stride_xm + ks[None, :], mask=(rows[:, None] < M) & (ks[None, :] < K), other=0.0)
        b = tl.load(w_ptr + cols[None, :] * stride_wn + ks[:, None], mask=(cols[None, :] < N) & (ks[:, None] < K), other=0.0)
        if IEEE:  # fp32 inputs: full-precision products, not TF32
            acc = tl.dot(a, b, acc, input_precision="ieee")
        else:
            acc = tl.dot(a, b, acc)
    if HAS_BIAS:
        acc += tl.load(b_ptr + cols, mask=cols < N, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptr + rows[:, None] * stride_om + cols[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=(rows[:, None] < M) & (cols[None, :] < N))


def ordered_all_reduce(partial: torch.Tensor, group) -> torch.Tensor:
    """The sum of every rank's `partial`, added in rank order on every rank: the same bits
    whatever the message size (an all-reduce's algorithm, hence its order, follows the size)."""
    parts = [torch.empty_like(partial) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, partial.contiguous(), group=group)
    total = parts[0].clone()
    for part in parts[1:]:
        total += part
    return total
