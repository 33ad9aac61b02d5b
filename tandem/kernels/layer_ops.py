"""Fused elementwise work of one Llama decoder layer: RMSNorm (+ residual add), SiLU-and-mul,
and RoPE + KV-cache write.

Each op has a pure-torch reference written to reproduce transformers' numerics and a Triton
kernel; the dispatcher runs Triton on CUDA tensors and the reference everywhere else (so a CPU
install needs no Triton). Checked against the references and transformers' own modules in
tests/test_layer_ops.py.

A decoder layer fuses each residual add into the norm that follows it (as vLLM does):
    h, res = rms_norm(x, input_layernorm.weight, eps)                   # res = x
    q = rope_and_cache(qkv_proj(h), ...)                                # k, v land in the cache
    h, res = rms_norm(o_proj(attn), post_attention_layernorm.weight, eps, residual=res)
    m = down_proj(silu_mul(gate_up_proj(h)))
    h, res = rms_norm(m, next_input_layernorm.weight, eps, residual=res)  # next layer

Numerics: the kernels compute in fp32 and round to the model dtype exactly where transformers
materialises a model-dtype tensor (the residual sum, the normalised row before the weight, each
RoPE product, SiLU before the multiply), and launch with FMA contraction off, since transformers
rounds every product before the add that follows. What is left is Triton's exp/rsqrt and its
summation order, which differ from torch's in the last fp32 bit and so, after rounding, move an
occasional bf16/fp16 element by one ulp.
"""
from __future__ import annotations

import functools
import importlib.util
from types import SimpleNamespace

import torch
import torch.nn.functional as F

from tandem.kernels._triton import triton_enabled

# triton.language, bound by _kernels() on first use. Triton is optional and imported lazily so
# that CPU installs never need it and tests can set TRITON_INTERPRET before the kernels are built.
tl = None


def _use_triton(t: torch.Tensor, use_triton: bool | None) -> bool:
    """None: Triton for CUDA tensors when it is installed. True forces it (tests run the kernels
    on CPU under TRITON_INTERPRET=1); False forces the reference."""
    if use_triton is None:
        return t.is_cuda and triton_enabled() and importlib.util.find_spec("triton") is not None
    return use_triton


# ---- RMSNorm -------------------------------------------------------------------------------


def rms_norm_reference(x, weight, eps: float, residual=None) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' LlamaRMSNorm of x (+ residual, added in the model dtype as the layer does)."""
    if residual is not None:
        x = x + residual
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype), x


def rms_norm(
    x: torch.Tensor,  # [N, H]
    weight: torch.Tensor,  # [H], same dtype as x
    eps: float,
    residual: torch.Tensor | None = None,  # [N, H]
    use_triton: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:  # y [N, H], residual_out [N, H]
    """y = RMSNorm(s), residual_out = s, where s = x + residual (or x itself when residual is None,
    returned as is). Outputs are new tensors in x's dtype; the inputs are not modified."""
    hidden = x.shape[-1]
    assert x.dim() == 2 and x.is_contiguous(), f"x must be contiguous [N, H], got {tuple(x.shape)}"
    assert weight.shape == (hidden,) and weight.dtype == x.dtype, f"weight {tuple(weight.shape)} {weight.dtype}"
    if residual is not None:
        assert residual.shape == x.shape and residual.dtype == x.dtype and residual.is_contiguous()
    if not _use_triton(x, use_triton):
        return rms_norm_reference(x, weight, eps, residual)
    k = _kernels()
    y = torch.empty_like(x)
    res_out = x if residual is None else torch.empty_like(x)
    block = k.next_power_of_2(hidden)
    k.rms_norm[(x.shape[0],)](
        x, x if residual is None else residual, weight, y, res_out, hidden, eps,
        HAS_RESIDUAL=residual is not None, BLOCK=block, num_warps=_num_warps(block), enable_fp_fusion=False,
    )
    return y, res_out


def _rms_norm_kernel(x_ptr, res_ptr, w_ptr, y_ptr, res_out_ptr, hidden, eps,
                     HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr):
    """One program per row."""
    cols = tl.arange(0, BLOCK)
    mask = cols < hidden
    offs = tl.program_id(0).to(tl.int64) * hidden + cols
    dtype = y_ptr.dtype.element_ty
    s = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        s += tl.load(res_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        s = s.to(dtype).to(tl.float32)  # the layer adds in the model dtype
        tl.store(res_out_ptr + offs, s.to(dtype), mask=mask)
    h = s * tl.rsqrt(tl.sum(s * s, axis=0) / hidden + eps)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + offs, (w * h.to(dtype).to(tl.float32)).to(dtype), mask=mask)


# ---- SiLU and multiply ----------------------------------------------------------------------


def silu_mul_reference(gate_up: torch.Tensor) -> torch.Tensor:
    """LlamaMLP's act_fn(gate_proj(x)) * up_proj(x), given both projections side by side."""
    gate, up = gate_up.chunk(2, dim=-1)
    # contiguous(): on CPU, silu of a strided view takes a scalar loop whose exp differs from the
    # vectorised one transformers gets on gate_proj's contiguous output by an ulp here and there.
    return F.silu(gate.contiguous()) * up


def silu_mul(
    gate_up: torch.Tensor,  # [N, 2 * I]: gate in columns [0, I), up in [I, 2I)
    use_triton: bool | None = None,
) -> torch.Tensor:  # [N, I], a new tensor in gate_up's dtype
    assert gate_up.dim() == 2 and gate_up.is_contiguous() and gate_up.shape[1] % 2 == 0, tuple(gate_up.shape)
    if not _use_triton(gate_up, use_triton):
        return silu_mul_reference(gate_up)
    k = _kernels()
    n, inter = gate_up.shape[0], gate_up.shape[1] // 2
    out = gate_up.new_empty(n, inter)
    block = min(1024, k.next_power_of_2(inter))
    grid = (n, (inter + block - 1) // block)
    k.silu_mul[grid](gate_up, out, inter, BLOCK=block, num_warps=_num_warps(block), enable_fp_fusion=False)
    return out


def _silu_mul_kernel(gate_up_ptr, out_ptr, inter, BLOCK: tl.constexpr):
    """Program (row, column block)."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < inter
    dtype = out_ptr.dtype.element_ty
    gate = tl.load(gate_up_ptr + row * 2 * inter + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(gate_up_ptr + row * 2 * inter + inter + cols, mask=mask, other=0.0).to(tl.float32)
    act = (gate / (1.0 + tl.exp(-gate))).to(dtype).to(tl.float32)  # torch's silu, then rounded
    tl.store(out_ptr + row * inter + cols, (act * up).to(dtype), mask=mask)


# ---- RoPE and KV-cache write ----------------------------------------------------------------


def rope_and_cache_reference(qkv, num_heads, num_kv_heads, head_dim, cos, sin, k_cache, v_cache, slots, positions):
    """transformers' apply_rotary_pos_emb on q and k, then k and v written by index assignment."""
    q, k, v = qkv.unflatten(1, (-1, head_dim)).split([num_heads, num_kv_heads, num_kv_heads], dim=1)
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # [N, 1, D]: broadcast over heads
    k_cache[slots, positions] = _rotate(k, cos, sin)
    v_cache[slots, positions] = v
    return _rotate(q, cos, sin)


def _rotate(x, cos, sin):  # x [N, heads, D]: pairs (i, i + D/2), as transformers' rotate_half
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin


def rope_and_cache(
    qkv: torch.Tensor,  # [N, (H + 2 * kvH) * D]: the fused projection output, each row q | k | v
    num_heads: int,  # H
    num_kv_heads: int,  # kvH
    head_dim: int,  # D, even
    cos: torch.Tensor,  # [N, D] in qkv's dtype (transformers' rotary_emb output, one row per token)
    sin: torch.Tensor,  # [N, D]
    k_cache: torch.Tensor,  # [S, T, kvH, D]: rotated k written in place
    v_cache: torch.Tensor,  # [S, T, kvH, D]: v written in place
    slots: torch.Tensor,  # [N] int64: token n goes to cache[slots[n], positions[n]]
    positions: torch.Tensor,  # [N] int64
    use_triton: bool | None = None,
) -> torch.Tensor:  # q_rot [N, H, D], a new contiguous tensor; qkv is not modified
    """Rotary embedding of q and k (Su et al. 2021, in transformers' half-split layout) and the
    write of this step's k and v into the slot cache. (slot, position) pairs must be distinct,
    or which token's k/v lands there is unspecified."""
    n, width = qkv.shape
    assert width == (num_heads + 2 * num_kv_heads) * head_dim and head_dim % 2 == 0, (tuple(qkv.shape), head_dim)
    assert qkv.stride(1) == 1, f"qkv rows must be contiguous, strides {qkv.stride()}"
    assert cos.shape == sin.shape == (n, head_dim) and cos.dtype == sin.dtype == qkv.dtype, (cos.shape, cos.dtype)
    assert k_cache.shape == v_cache.shape and k_cache.shape[2:] == (num_kv_heads, head_dim), tuple(k_cache.shape)
    assert k_cache.dtype == v_cache.dtype == qkv.dtype, (k_cache.dtype, qkv.dtype)
    assert slots.shape == positions.shape == (n,), (slots.shape, positions.shape)
    if not _use_triton(qkv, use_triton):
        return rope_and_cache_reference(
            qkv, num_heads, num_kv_heads, head_dim, cos, sin, k_cache, v_cache, slots, positions)
    assert cos.is_contiguous() and sin.is_contiguous(), "cos/sin must be contiguous"
    assert slots.is_contiguous() and positions.is_contiguous() and slots.numel() == positions.numel() == n
    assert k_cache.stride() == v_cache.stride() and k_cache.stride()[2:] == (head_dim, 1), k_cache.stride()
    k = _kernels()
    q_rot = qkv.new_empty(n, num_heads, head_dim)
    block = k.next_power_of_2(head_dim // 2)
    k.rope_and_cache[(n, num_heads + num_kv_heads)](
        qkv, cos, sin, q_rot, k_cache, v_cache, slots, positions,
        qkv.stride(0), k_cache.stride(0), k_cache.stride(1),
        NUM_HEADS=num_heads, NUM_KV_HEADS=num_kv_heads, HEAD_DIM=head_dim, BLOCK=block, num_warps=1,
        enable_fp_fusion=False,
    )
    return q_rot


def _rope_and_cache_kernel(qkv_ptr, cos_ptr, sin_ptr, q_out_ptr, k_cache_ptr, v_cache_ptr, slots_ptr,
                           positions_ptr, qkv_row_stride, cache_slot_stride, cache_pos_stride,
                           NUM_HEADS: tl.constexpr, NUM_KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr,
                           BLOCK: tl.constexpr):
    """Program (token, head): heads [0, H) are query heads, [H, H + kvH) key heads, each of which
    also copies its value head. Every program handles the pairs (i, i + D/2), i < D/2."""
    tok = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    half = HEAD_DIM // 2
    cols = tl.arange(0, BLOCK)
    mask = cols < half
    row = qkv_ptr + tok * qkv_row_stride
    if head < NUM_HEADS:
        src = row + head * HEAD_DIM
        dst = q_out_ptr + (tok * NUM_HEADS + head) * HEAD_DIM
    else:
        kv = head - NUM_HEADS
        # e.g. slot 3, position 17 -> 3 * (T * kvH * D) + 17 * (kvH * D) + kv * D
        cache = tl.load(slots_ptr + tok) * cache_slot_stride + tl.load(positions_ptr + tok) * cache_pos_stride
        cache += kv * HEAD_DIM
        src = row + (NUM_HEADS + kv) * HEAD_DIM
        dst = k_cache_ptr + cache
        v_src = row + (NUM_HEADS + NUM_KV_HEADS + kv) * HEAD_DIM
        tl.store(v_cache_ptr + cache + cols, tl.load(v_src + cols, mask=mask), mask=mask)
        tl.store(v_cache_ptr + cache + half + cols, tl.load(v_src + half + cols, mask=mask), mask=mask)
    dtype = q_out_ptr.dtype.element_ty
    x1 = tl.load(src + cols, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(src + half + cols, mask=mask, other=0.0).to(tl.float32)
    cos1 = tl.load(cos_ptr + tok * HEAD_DIM + cols, mask=mask, other=0.0).to(tl.float32)
    cos2 = tl.load(cos_ptr + tok * HEAD_DIM + half + cols, mask=mask, other=0.0).to(tl.float32)
    sin1 = tl.load(sin_ptr + tok * HEAD_DIM + cols, mask=mask, other=0.0).to(tl.float32)
    sin2 = tl.load(sin_ptr + tok * HEAD_DIM + half + cols, mask=mask, other=0.0).to(tl.float32)
    # x * cos + rotate_half(x) * sin with rotate_half(x) = (-x2, x1); transformers rounds each
    # product to the model dtype before the add (and enable_fp_fusion=False stops the compiler
    # from folding product and add into one bf16 fma that would skip that rounding).
    out1 = (x1 * cos1).to(dtype).to(tl.float32) + (-x2 * sin1).to(dtype).to(tl.float32)
    out2 = (x2 * cos2).to(dtype).to(tl.float32) + (x1 * sin2).to(dtype).to(tl.float32)
    tl.store(dst + cols, out1.to(dtype), mask=mask)
    tl.store(dst + half + cols, out2.to(dtype), mask=mask)


# ---- Triton plumbing ------------------------------------------------------------------------


@functools.cache
def _kernels() -> SimpleNamespace:
    """Import Triton and JIT the kernels, once. The kernels above are plain functions until here:
    decorating at import would need Triton installed and would fix the interpreter setting."""
    global tl
    import triton
    import triton.language

    tl = triton.language
    return SimpleNamespace(
        next_power_of_2=triton.next_power_of_2,
        rms_norm=triton.jit(_rms_norm_kernel),
        silu_mul=triton.jit(_silu_mul_kernel),
        # slots / positions: views into a step's index tensor, aligned or not by its row count (an
        # alignment is a compiled variant of its own: tandem/kernels/attention.py)
        rope_and_cache=triton.jit(_rope_and_cache_kernel, do_not_specialize_on_alignment=["slots_ptr", "positions_ptr"]),
    )


def _num_warps(block: int) -> int:  # e.g. 4096 elements -> 8 warps, 1024 -> 4, <= 256 -> 1
    return max(1, min(8, block // 256))
