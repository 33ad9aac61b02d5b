"""Attention over the engine's slot KV cache, read in place (docs/design.md §7).

Each query row n attends keys 0..positions[n] of its own cache slot. The torch path gathers
every row's slot (`k_cache[slots, :span]`), masks and calls softmax; on a GPU that gather is a
copy of the whole attended cache per layer, followed by a masked SDPA and a transpose copy.
The Triton kernel instead reads K/V blocks straight from the cache with the slot's strides and
writes [N, H*D], the layout o_proj takes.

Kernel (FlashAttention's online softmax, Dao et al. 2022, Alg. 1; Milakov & Gimelshein 2018):
  * one program per (row tile, kv head, key split). A tile is up to 64 // G query rows of one
    request times the G = H / kvH query heads that share the kv head (GQA), so each K/V block
    is loaded once for all of them and both products run on tensor cores (tl.dot needs M >= 16:
    a single decode row's G heads are padded to 16, which costs nothing in a memory-bound loop).
    Rows of one request share a tile only when the caller says how many there are (query_len);
    with query_len=1 every row is its own request with its own slot.
  * key splits (Flash-Decoding, Dao et al. 2023): when tiles x kv heads would leave most SMs
    idle (batch 1-8 decode), the span is cut into chunks; each program writes its chunk's
    normalised output and log-sum-exp, and a second kernel combines them. The split count is
    computed on the host from shapes only, so a call is the same work every replay of a CUDA
    graph; no host syncs, and the only memory besides the output is that fixed-size workspace.
Numerics: scores, softmax and the accumulator are fp32. For 16-bit inputs the probabilities
go into the P·V product as a hi + lo pair of 16-bit numbers (p = hi + lo to ~16 bits), instead
of FlashAttention's single rounding to bf16 (an error of up to 2^-9 of each p, which moves
bf16 outputs by about an ulp); the second product is free in a loop bound by memory. fp32
inputs use IEEE fp32 products.
Checked against slot_attention_reference (and it against torch SDPA) in tests/test_attention.py.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

from tandem.kernels._triton import jit, pick_triton, tl, triton

TILE_M = 64  # query rows x heads per program, at most (G > 64: one row's heads)
MIN_SPLIT_KEYS = 256  # fewer keys per split: the combine costs more than the parallelism gains
MAX_SPLITS = 32  # the combine holds [splits, D] per program


def slot_attention(
    q: torch.Tensor,  # [N, H, D] rotated queries; request b's rows are b*Q .. b*Q+Q-1
    k_cache: torch.Tensor,  # [S, T, kvH, D]: one layer's cache (last dim contiguous)
    v_cache: torch.Tensor,  # [S, T, kvH, D]
    slots: torch.Tensor,  # [N] int64: the cache slot of each query row
    positions: torch.Tensor,  # [N] int64: row n attends keys 0..positions[n] of its slot
    span: int,  # keys >= span are never read (positions >= span attend keys 0..span-1)
    scale: float | None = None,  # default 1/sqrt(D)
    use_triton: bool | None = None,  # None: Triton for CUDA tensors when installed
    query_len: int = 1,  # Q: rows b*Q .. b*Q+Q-1 share slots[b*Q] (Triton reads K/V once for them)
    exact: bool = False,  # Triton: one tile shape and no key splits (row results independent of the batch)
) -> torch.Tensor:  # [N, H*D] in q's dtype, contiguous
    """softmax(q k^T * scale + causal mask) v per row, GQA heads h -> h // (H / kvH)."""
    if pick_triton(q, use_triton):
        return slot_attention_triton(q, k_cache, v_cache, slots, positions, span, scale, query_len, exact=exact)
    return slot_attention_reference(q, k_cache, v_cache, slots, positions, span, scale)


def slot_attention_reference(q, k_cache, v_cache, slots, positions, span: int, scale: float | None = None):
    """Pure torch, as SDPA's math path: gather each row's slot, repeat kv heads, fp32 softmax.

    Shapes as slot_attention. Every row is gathered on its own (N x span x kvH x D), so this is
    for CPU and tests, not for speed.
    """
    n, heads, dim = q.shape
    group = heads // k_cache.shape[2]
    scale = dim**-0.5 if scale is None else scale
    k = k_cache[slots, :span].float().repeat_interleave(group, dim=2).transpose(1, 2)  # [N, H, span, D]
    v = v_cache[slots, :span].float().repeat_interleave(group, dim=2).transpose(1, 2)
    scores = (q.float().unsqueeze(2) @ k.transpose(-1, -2)).squeeze(2) * scale  # [N, H, span]
    keys = torch.arange(span, device=q.device)
    allowed = keys[None, :] <= positions[:, None]  # [N, span]
    scores = scores.masked_fill(~allowed[:, None, :], float("-inf"))
    out = torch.softmax(scores, dim=-1).unsqueeze(2) @ v  # [N, H, 1, D]
    return out.to(q.dtype).reshape(n, heads * dim)


def slot_attention_triton(
    q, k_cache, v_cache, slots, positions, span: int, scale: float | None = None, query_len: int = 1,
    num_splits: int | None = None,  # None: enough to fill the GPU (tests force values)
    block_n: int | None = None,  # keys per loop step; None: 64 (fp32: 32)
    exact: bool = False,
) -> torch.Tensor:
    """The Triton kernels; shapes and semantics as slot_attention. exact: every call runs tiles
    of TILE_M // G rows whatever the query length, over all keys in one split, so a row's sums
    run in the same order alone, in a verify of k + 1 rows or in any batch (tandem/kernels/exact.py).
    Blocks of keys past a row's end, which a longer row in its tile makes the loop visit, add
    exact zeros (p = 0, the running max unchanged)."""
    _check(q, k_cache, v_cache, slots, positions, span, query_len)
    n, heads, dim = q.shape
    group = heads // k_cache.shape[2]
    out = q.new_empty(n, heads * dim)
    if n == 0:
        return out
    # fp32 (tests; the engine runs 16-bit models on GPUs) multiplies on CUDA cores, which spill
    # registers at 64 keys x 4 warps; 64 x 128 fp32 K and V tiles would also need 64 KB a stage.
    fp32 = q.dtype == torch.float32
    block_n = block_n or (32 if fp32 else 64)
    plan = _Plan.of(n // query_len, query_len, group, k_cache.shape[2], dim, span, block_n, q.device,
                    1 if exact else num_splits, exact)
    # Split programs' outputs and log2-sum-exps, [N*H, splits, D + 1] (unused without splits)
    work = q.new_empty(n * heads, plan.splits, dim + 1, dtype=torch.float32) if plan.splits > 1 else out
    scale = dim**-0.5 if scale is None else scale
    _attention_kernel[plan.grid](
        q, k_cache, v_cache, slots, positions, out, work,
        span, scale * math.log2(math.e), plan.chunk, query_len, plan.tiles,
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        H=heads, G=group, D=dim, ROWS=plan.rows, BLOCK_M=plan.block_m, BLOCK_N=block_n,
        BLOCK_D=plan.block_d, SPLIT=plan.splits > 1, HI_LO=not fp32, UPCAST=not q.is_cuda,
        num_warps=8 if fp32 else 4, num_stages=2 if fp32 else 3,
    )
    if plan.splits > 1:
        _combine_kernel[(n * heads,)](
            work, out, SPLITS=plan.splits, BLOCK_S=triton.next_power_of_2(plan.splits),
            D=dim, BLOCK_D=triton.next_power_of_2(dim), num_warps=4,
        )
    return out


def _check(q, k_cache, v_cache, slots, positions, span, query_len) -> None:
    n, heads, dim = q.shape
    assert q.is_contiguous(), f"q must be contiguous [N, H, D], strides {q.stride()}"
    assert k_cache.dim() == 4 and k_cache.shape == v_cache.shape and k_cache.shape[3] == dim, \
        (tuple(k_cache.shape), tuple(v_cache.shape), dim)
    assert heads % k_cache.shape[2] == 0, f"{heads} query heads over {k_cache.shape[2]} kv heads"
    assert k_cache.stride(3) == 1 and v_cache.stride(3) == 1, (k_cache.stride(), v_cache.stride())
    assert k_cache.dtype == v_cache.dtype == q.dtype, (q.dtype, k_cache.dtype, v_cache.dtype)
    assert slots.shape == positions.shape == (n,), (tuple(slots.shape), tuple(positions.shape), n)
    assert slots.is_contiguous() and positions.is_contiguous(), "slots / positions must be contiguous"
    assert 0 < span <= k_cache.shape[1], f"span {span}, cache length {k_cache.shape[1]}"
    # key offsets inside a slot are int32 in the kernel (the slot offset is int64)
    assert span * max(k_cache.stride(1), v_cache.stride(1)) < 2**31, (span, k_cache.stride())
    assert query_len >= 1 and n % query_len == 0, f"{n} rows are not requests of {query_len}"


@dataclass(frozen=True)
class _Plan:
    """How one call is cut into programs; a function of shapes only (CUDA-graph safe)."""

    rows: int  # query rows per tile
    tiles: int  # tiles per request
    block_m: int  # rows x G lanes, padded to a power of 2 >= 16 (tl.dot's minimum)
    block_d: int
    splits: int  # key splits
    chunk: int  # keys per split, a multiple of block_n
    grid: tuple[int, int, int]  # (requests x tiles, kv heads, splits)

    @staticmethod
    def of(batch, query_len, group, kv_heads, dim, span, block_n, device, num_splits, exact=False) -> _Plan:
        # e.g. G = 4, Q = 9: 9 rows (36 lanes) in one tile of 64; Q = 32: two tiles of 16 rows;
        # exact: tiles of 16 rows at any Q (one tile shape)
        rows = max(1, TILE_M // group) if exact else min(query_len, max(1, TILE_M // group))
        tiles = -(-query_len // rows)
        if num_splits is None:
            num_splits = _fill_splits(batch * tiles * kv_heads, span, device)
        chunk = -(-span // (num_splits * block_n)) * block_n
        splits = -(-span // chunk)  # e.g. span 300, 4 splits of 64-key blocks: chunk 128 -> 3 splits
        block_m = max(16, triton.next_power_of_2(rows * group))
        block_d = max(16, triton.next_power_of_2(dim))
        return _Plan(rows, tiles, block_m, block_d, splits, chunk, (batch * tiles, kv_heads, splits))


def _fill_splits(programs: int, span: int, device: torch.device) -> int:
    """Splits enough for about one program per SM, each of at least MIN_SPLIT_KEYS keys: e.g.
    batch 1, 8 kv heads, span 2048 on 132 SMs -> 8 splits of 256 keys; batch 32 -> 1."""
    if device.type != "cuda":
        return 1
    return max(1, min(-(-_sm_count(device) // programs), span // MIN_SPLIT_KEYS, MAX_SPLITS))


@functools.cache
def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


# ---- kernels -------------------------------------------------------------------------------


# Triton compiles a variant per integer argument that equals 1 or divides by 16, and per pointer
# that is or is not 16-byte aligned. The span, the query length and the tile count follow the
# shapes, and slots / positions are views into a step's one index tensor at offsets that follow
# its row count: an eager prefill (several prompts, or a long one) would meet new variants at run
# time and compile each inside a step (1.6 s on an H200). They are plain runtime values here.
@jit(do_not_specialize=["span", "chunk", "query_len", "tiles"],
     do_not_specialize_on_alignment=["slots_ptr", "positions_ptr"])
def _attention_kernel(
    q_ptr, k_ptr, v_ptr, slots_ptr, positions_ptr, out_ptr, work_ptr,
    span, qk_scale, chunk, query_len, tiles,
    stride_ks, stride_kt, stride_kh, stride_vs, stride_vt, stride_vh,
    H: tl.constexpr, G: tl.constexpr, D: tl.constexpr, ROWS: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, SPLIT: tl.constexpr, HI_LO: tl.constexpr,
    UPCAST: tl.constexpr,
):
    """Program (row tile of one request, kv head, key split). Lane m is query row
    b*Q + first + m // G, head kv_head*G + m % G: e.g. G = 4, Q = 5 -> lanes 0-3 are row b*5
    (heads 4h..4h+3), lanes 16-19 row b*5+4, lanes 20-31 padding (dead)."""
    request = tl.program_id(0) // tiles
    first = tl.program_id(0) % tiles * ROWS  # the tile's first row within its request
    kv_head = tl.program_id(1)
    lanes = tl.arange(0, BLOCK_M)
    dims = tl.arange(0, BLOCK_D)
    live = (lanes < ROWS * G) & (first + lanes // G < query_len)
    row = request.to(tl.int64) * query_len + first + lanes // G
    head = kv_head * G + lanes % G
    q_at = (row * H + head)[:, None] * D + dims[None, :]  # [BLOCK_M, BLOCK_D]
    q_mask = live[:, None] & (dims < D)[None, :]
    q = tl.load(q_ptr + q_at, mask=q_mask, other=0.0)
    pos = tl.load(positions_ptr + row, mask=live, other=0)
    end = tl.where(live, tl.minimum(pos, span - 1) + 1, 0).to(tl.int32)  # lane attends keys [0, end)
    slot = tl.load(slots_ptr + request.to(tl.int64) * query_len + first)  # int64: slot * stride is large
    lo = tl.program_id(2) * chunk
    hi = tl.minimum(lo + chunk, tl.max(end, axis=0))
    acc, m_i, l_i = _attend(
        q, k_ptr + slot * stride_ks + kv_head * stride_kh, v_ptr + slot * stride_vs + kv_head * stride_vh,
        end, lo, hi, qk_scale, stride_kt, stride_vt, D, BLOCK_M, BLOCK_N, BLOCK_D, HI_LO, UPCAST,
    )
    l_safe = tl.where(l_i > 0, l_i, 1.0)  # 0 only on dead lanes and in a split past the tile's keys
    acc = acc / l_safe[:, None]
    if SPLIT:
        # workspace [N*H, splits, D + 1]: this split's normalised output, then its log2-sum-exp
        at = ((row * H + head) * tl.num_programs(2) + tl.program_id(2)) * (D + 1)
        tl.store(work_ptr + at[:, None] + dims[None, :], acc, mask=q_mask)
        tl.store(work_ptr + at + D, tl.where(l_i > 0, m_i + tl.log2(l_safe), float("-inf")), mask=live)
    else:
        tl.store(out_ptr + q_at, acc.to(out_ptr.dtype.element_ty), mask=q_mask)


@jit
def _attend(q, k_base, v_base, end, lo, hi, qk_scale, stride_kt, stride_vt, D: tl.constexpr,
            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, HI_LO: tl.constexpr,
            UPCAST: tl.constexpr):
    """Online softmax over keys [lo, hi) (hi <= the tile's largest end <= span): the running max
    m (log2 units), sum l and unnormalised output acc of each lane.

    Products: fp32 inputs multiply as fp32 (input_precision="ieee", not tf32); 16-bit ones
    exactly into fp32 sums, and p @ v is hi @ v + lo @ v with p = hi + lo. UPCAST (CPU tensors,
    i.e. Triton's interpreter) multiplies 16-bit operands as fp32, the same exact products: the
    interpreter multiplies bf16 as its raw uint16 bits (triton-lang/triton#11584). Inline, not
    in helpers, because the interpreter re-patches triton.language on every jitted call.
    """
    dims = tl.arange(0, BLOCK_D)
    if UPCAST:
        q = q.to(tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start in range(lo, hi, BLOCK_N):
        keys = start + tl.arange(0, BLOCK_N)
        key_ok = keys < hi
        kt = tl.load(k_base + keys[None, :] * stride_kt + dims[:, None],
                     mask=key_ok[None, :] & (dims < D)[:, None], other=0.0)  # [BLOCK_D, BLOCK_N]
        if UPCAST:
            kt = kt.to(tl.float32)
        if HI_LO:
            s = tl.dot(q, kt)
        else:
            s = tl.dot(q, kt, input_precision="ieee")
        s *= qk_scale
        s = tl.where(keys[None, :] < end[:, None], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a lane with no key yet
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None]
        v = tl.load(v_base + keys[:, None] * stride_vt + dims[None, :],
                    mask=key_ok[:, None] & (dims < D)[None, :], other=0.0)  # [BLOCK_N, BLOCK_D]
        if HI_LO:
            p_hi = p.to(v.dtype)
            p_lo = (p - p_hi.to(tl.float32)).to(v.dtype)
            if UPCAST:
                v = v.to(tl.float32)
                p_hi = p_hi.to(tl.float32)
                p_lo = p_lo.to(tl.float32)
            acc = tl.dot(p_lo, v, tl.dot(p_hi, v, acc))
        else:
            acc = tl.dot(p, v, acc, input_precision="ieee")
        m_i = m_new
    return acc, m_i, l_i


@jit
def _combine_kernel(work_ptr, out_ptr, SPLITS: tl.constexpr, BLOCK_S: tl.constexpr, D: tl.constexpr,
                    BLOCK_D: tl.constexpr):
    """Program (row, head): out = sum_s w_s o_s / sum_s w_s, w_s = 2^(lse_s - max lse). Split 0
    holds key 0, which every row attends, so the max is finite; empty splits weigh 0."""
    at = tl.program_id(0).to(tl.int64)  # row * H + head
    splits = tl.arange(0, BLOCK_S)
    dims = tl.arange(0, BLOCK_D)
    base = work_ptr + (at * SPLITS + splits) * (D + 1)
    lse = tl.load(base + D, mask=splits < SPLITS, other=float("-inf"))
    w = tl.exp2(lse - tl.max(lse, axis=0))
    o = tl.load(base[:, None] + dims[None, :], mask=(splits < SPLITS)[:, None] & (dims < D)[None, :], other=0.0)
    out = tl.sum(w[:, None] * o, axis=0) / tl.sum(w, axis=0)
    tl.store(out_ptr + at * D + dims, out.to(out_ptr.dtype.element_ty), mask=dims < D)
