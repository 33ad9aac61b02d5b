"""Slot attention: the Triton kernel vs the torch reference, and the reference vs torch SDPA.

Without CUDA the kernel runs under Triton's interpreter, which TRITON_INTERPRET=1 switches on
only if set before triton.language is first imported; in a full run conftest's transformers
import (through torch._dynamo) has usually done that already, so the kernel tests then run in
a child pytest that sets it from the start (test_kernels_in_the_interpreter), as in
tests/test_layer_ops.py. The gpu-marked tests compile the kernels on engine-sized shapes.

Every case poisons the cache: keys a row must not attend hold large random values (attending
one would move the output far), and the cache is a view of a buffer whose columns past the
span are NaN (reading one, even masked out of the softmax, would make the output NaN).
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

ON_GPU = torch.cuda.is_available()
if not ON_GPU and "triton.language" not in sys.modules:
    os.environ["TRITON_INTERPRET"] = "1"
KERNELS_RUN_HERE = ON_GPU or os.environ.get("TRITON_INTERPRET") == "1"

# (imported after TRITON_INTERPRET is settled)
from tandem.kernels import attention
from tandem.kernels.attention import (
    slot_attention,
    slot_attention_reference,
    slot_attention_triton,
)

DEVICE = "cuda" if ON_GPU else "cpu"
kernel_test = pytest.mark.skipif(not KERNELS_RUN_HERE, reason="run by test_kernels_in_the_interpreter")
# (heads, kv heads, head dim): GQA groups of 1, 2 and 4
HEADS = [(4, 4, 64), (4, 2, 128), (8, 2, 64)]


def attention_case(dtype, heads, kv_heads, dim, starts, q_len, span=None, slots_count=5, seed=0, device=DEVICE):
    """Request b (slot slot_of[b]) feeds q_len rows at positions starts[b] .. starts[b]+q_len-1.
    Returns (q, k_cache, v_cache, slots, positions, span)."""
    g = torch.Generator().manual_seed(seed)
    bsz = len(starts)
    span = span or max(starts) + q_len
    positions = (torch.tensor(starts)[:, None] + torch.arange(q_len)).flatten()  # [N]
    slot_of = torch.randperm(slots_count, generator=g)[:bsz]
    slots = slot_of.repeat_interleave(q_len)
    q = torch.randn(bsz * q_len, heads, dim, generator=g)
    buf = torch.randn(2, slots_count, span + 3, kv_heads, dim, generator=g)  # [k|v, S, T, kvH, D]
    # Poison: keys past a request's last position are large (a softmax that took one would
    # change visibly), and columns past the span are NaN.
    last = torch.full((slots_count,), -1)
    last[slot_of] = positions.view(bsz, q_len).max(1).values
    beyond = torch.arange(span + 3)[None, :] > last[:, None]  # [S, T]
    buf[0, beyond] = buf[0, beyond] * 8
    buf[1, beyond] = buf[1, beyond] * 8 + 50
    buf[:, :, span:] = float("nan")
    buf = buf.to(dtype=dtype, device=device)
    k_cache, v_cache = buf[0, :, :span], buf[1, :, :span]  # views: strides of the padded buffer
    return q.to(dtype=dtype, device=device), k_cache, v_cache, slots.to(device), positions.to(device), span


def engine_sdpa(q, k_cache, v_cache, slots, positions, span, q_len, scale=None):
    """What tandem/engine/llama.py ran before this kernel: gather, bool mask, SDPA, transpose."""
    n, heads, dim = q.shape
    bsz = n // q_len
    slot_ids = slots.view(bsz, q_len)[:, 0]
    k_all = k_cache[slot_ids, :span].transpose(1, 2)  # [B, kvH, span, D]
    v_all = v_cache[slot_ids, :span].transpose(1, 2)
    keys = torch.arange(span, device=q.device)
    mask = (keys[None, None, :] <= positions.view(bsz, q_len)[:, :, None]).unsqueeze(1)  # [B, 1, Q, span]
    out = F.scaled_dot_product_attention(
        q.view(bsz, q_len, heads, dim).transpose(1, 2), k_all, v_all, attn_mask=mask,
        enable_gqa=k_cache.shape[2] != heads, scale=scale,
    )  # [B, H, Q, D]
    return out.transpose(1, 2).reshape(n, heads * dim)


def truth(case):
    """The reference on the same (rounded) inputs in fp32 (what an exact kernel would give), and
    the same with |v|: the scale of the fp32 sums behind each output."""
    q, k, v, *rest = case
    exact = slot_attention_reference(q.float(), k.float(), v.float(), *rest)
    return exact, slot_attention_reference(q.float(), k.float(), v.float().abs(), *rest)


def assert_close(out, ref, truth):
    """fp32: summation order only. 16-bit: the kernel's fp32 result rounded once, so within half
    an ulp of the exact result on GPUs (round to nearest) and within one ulp under Triton's
    interpreter (it truncates fp32 -> bf16), plus the error of the sums themselves, a small
    multiple of fp32's eps times their scale (16 bits of p in the hi + lo product; p rounded to
    bf16 alone would be ~2^-9 of it)."""
    assert out.dtype == ref.dtype and out.shape == ref.shape and out.is_contiguous()
    assert torch.isfinite(out).all()
    if out.dtype == torch.float32:
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
        return
    exact, scale = truth
    bits = {torch.bfloat16: 7, torch.float16: 10}[out.dtype]  # stored mantissa bits
    ulp = torch.exp2(torch.floor(torch.log2(exact.abs().clamp_min(1e-30))) - bits)
    excess = (out.float() - exact).abs() - (0.5 if ON_GPU else 1.0) * ulp
    worst = (excess / scale).max().item()
    assert worst <= (2e-5 if ON_GPU else 5e-5), f"{worst:.2e} of the sums' scale past the rounding of the result"


# ---- reference vs torch SDPA (no Triton) ---------------------------------------------------


@pytest.mark.parametrize("heads,kv_heads,dim", HEADS)
@pytest.mark.parametrize("starts,q_len", [([7], 1), ([0, 13, 37], 5)])
def test_reference_is_sdpa_with_a_bool_mask(heads, kv_heads, dim, starts, q_len):
    case = attention_case(torch.float32, heads, kv_heads, dim, starts, q_len, span=48, device="cpu")
    ref = slot_attention_reference(*case)
    torch.testing.assert_close(ref, engine_sdpa(*case, q_len), rtol=2e-6, atol=2e-6)
    scaled = slot_attention_reference(*case, scale=0.3)
    torch.testing.assert_close(scaled, engine_sdpa(*case, q_len, scale=0.3), rtol=2e-6, atol=2e-6)


def test_cpu_tensors_take_the_reference(monkeypatch):
    monkeypatch.setattr(attention, "slot_attention_triton", lambda *a, **k: pytest.fail("Triton on CPU tensors"))
    case = attention_case(torch.float32, 4, 2, 64, [3, 9], 2, device="cpu")
    assert torch.equal(slot_attention(*case, query_len=2), slot_attention_reference(*case))


# ---- Triton vs reference -------------------------------------------------------------------


@pytest.mark.skipif(KERNELS_RUN_HERE, reason="the kernel tests run in this process")
def test_kernels_in_the_interpreter():
    """Runs this file's kernel tests in a child with TRITON_INTERPRET=1 set before any import."""
    pytest.importorskip("triton")
    cmd = [sys.executable, "-m", "pytest", "-q", "--noconftest", "-p", "no:cacheprovider", "-k", "kernel", __file__]
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    child = subprocess.run(cmd, check=False, env=env, capture_output=True, text=True, cwd=Path(__file__).parent.parent)
    assert child.returncode == 0 and " passed" in child.stdout, child.stdout[-5000:] + child.stderr[-2000:]


@kernel_test
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("heads,kv_heads,dim", HEADS)
@pytest.mark.parametrize("starts,q_len", [([40], 1), ([0, 13, 37], 5)])  # prefixes off the 32-key blocks
def test_kernel_matches_reference(dtype, heads, kv_heads, dim, starts, q_len):
    case = attention_case(dtype, heads, kv_heads, dim, starts, q_len, span=48)
    out = slot_attention_triton(*case, query_len=q_len, block_n=32)
    assert_close(out, slot_attention_reference(*case), truth(case))


@kernel_test
@pytest.mark.parametrize("query_len", [1, 3])
def test_kernel_rows_alone_and_key_splits(query_len):
    """query_len=1: every row its own program (slots may differ row to row). Three splits of
    two 16-key blocks, the later ones empty for the shorter requests."""
    case = attention_case(torch.bfloat16, 4, 1, 64, [2, 50], 3, span=72, seed=1)
    out = slot_attention_triton(*case, query_len=query_len, num_splits=3, block_n=16)
    assert_close(out, slot_attention_reference(*case), truth(case))


@kernel_test
@pytest.mark.parametrize("query_len", [1, 6])
def test_kernel_padding_rows_past_the_span(query_len):
    """Padding rows (positions >= span) attend keys 0..span-1 of a cache exactly span long
    (NaN beyond), and leave the real rows beside them bit for bit as harmless padding does."""
    q, k, v, slots, _, span = attention_case(torch.bfloat16, 4, 1, 64, [0], 6, span=8, seed=2)
    q[3:] = q[2]
    positions = torch.tensor([5, 6, 7, 8, 13, 1000], device=DEVICE)
    out = slot_attention_triton(q, k, v, slots, positions, span, query_len=query_len, block_n=16)
    case = q, k, v, slots, positions, span
    assert_close(out, slot_attention_reference(*case), truth(case))
    assert torch.equal(out[3:], out[2:3].expand(3, -1))  # clamped to the last key
    harmless = torch.tensor([5, 6, 0, 0, 0, 0], device=DEVICE)
    real = slot_attention_triton(q, k, v, slots, harmless, span, query_len=query_len, block_n=16)
    assert torch.equal(out[:2], real[:2])


@kernel_test
def test_kernel_exact_rows_are_the_same_bits_in_any_call():
    """exact=True (one tile shape, no key splits): a row's output is the same bits alone (a
    decode), inside a verify of 9 rows, in a batch of decodes of other slots and lengths, and
    inside a verify padded past the span. bf16 (the interpreter's fp32 products depend on a
    row's place in its tile; a GPU's do not)."""
    q, k, v, slots, positions, span = attention_case(torch.bfloat16, 8, 2, 64, [3, 30], 9, span=64, seed=4)
    want = 9 + 4  # request 1's row 4: position 34
    alone = slot_attention_triton(q[want : want + 1], k, v, slots[want : want + 1], positions[want : want + 1], span,
                                  query_len=1, exact=True, block_n=16)
    verify = slot_attention_triton(q[9:], k, v, slots[9:], positions[9:], span, query_len=9, exact=True, block_n=16)
    mixed = slot_attention_triton(q, k, v, slots, positions, span, query_len=1, exact=True, block_n=16)
    padded_positions = positions.clone()
    padded_positions[-2:] = 1000  # padding rows of a bucket: past the span
    padded = slot_attention_triton(q, k, v, slots, padded_positions, span, query_len=9, exact=True, block_n=16)
    for out in (verify[4:5], mixed[want : want + 1], padded[want : want + 1]):
        assert torch.equal(out, alone)


@kernel_test
def test_kernel_head_dim_below_16_and_fp16():
    """D = 8 is padded to tl.dot's minimum of 16; fp16 takes the hi + lo path as bf16 does."""
    case = attention_case(torch.float16, 4, 1, 8, [5, 30], 3, span=40, seed=3)
    out = slot_attention_triton(*case, query_len=3, num_splits=2, block_n=16)
    assert_close(out, slot_attention_reference(*case), truth(case))


# ---- engine-sized shapes, compiled on a GPU ------------------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="needs CUDA")
@pytest.mark.parametrize("query_len", [1, 9])
def test_verify_batch_on_gpu(query_len):
    starts = [0, 5, 100, 257, 511, 640, 900, 1015]
    case = attention_case(torch.bfloat16, 16, 8, 128, starts, 9, span=1024, slots_count=12)
    out = slot_attention(*case, query_len=query_len)  # the dispatcher: Triton on CUDA
    assert_close(out, slot_attention_reference(*case), truth(case))
    torch.testing.assert_close(out, engine_sdpa(*case, 9), rtol=2**-6, atol=2**-6)


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("starts,q_len", [([3000], 1), ([1200, 3999], 5), ([17], 32)])
def test_small_batch_long_span_splits_on_gpu(dtype, starts, q_len):
    case = attention_case(dtype, 32, 8, 128, starts, q_len, span=4096 + 32)
    out = slot_attention(*case, query_len=q_len)
    assert_close(out, slot_attention_reference(*case), truth(case))


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="needs CUDA")
def test_cuda_graph_replay_follows_new_positions_and_slots():
    case = attention_case(torch.bfloat16, 32, 8, 128, [10, 700], 4, span=1024, slots_count=6)
    slots, positions = case[3], case[4]
    slot_attention(*case, query_len=4)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = slot_attention(*case, query_len=4)
    for new_slots, new_starts in (([5, 2], [900, 3]), ([1, 0], [64, 1019])):
        slots.copy_(torch.tensor(new_slots).repeat_interleave(4))
        positions.copy_((torch.tensor(new_starts)[:, None] + torch.arange(4)).flatten())
        graph.replay()
        assert_close(out, slot_attention_reference(*case), truth(case))
