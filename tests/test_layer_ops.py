"""Layer-op kernels vs their torch references, and the references vs transformers' own modules.

Without CUDA the Triton kernels run under Triton's CPU interpreter. Triton reads
TRITON_INTERPRET when triton.language is first imported, and conftest's transformers import
(through torch._dynamo) has usually done that before this file runs; the kernel tests then run
in a child pytest that sets the variable from the start (test_kernels_in_the_interpreter).
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ON_GPU = torch.cuda.is_available()
if not ON_GPU and "triton.language" not in sys.modules:
    os.environ["TRITON_INTERPRET"] = "1"
KERNELS_RUN_HERE = ON_GPU or os.environ.get("TRITON_INTERPRET") == "1"
pytest.importorskip("triton")

from tandem.kernels import layer_ops
from tandem.kernels.layer_ops import (
    rms_norm,
    rms_norm_reference,
    rope_and_cache,
    rope_and_cache_reference,
    silu_mul,
    silu_mul_reference,
)

DEVICE = "cuda" if ON_GPU else "cpu"
DTYPES = [torch.float32, torch.bfloat16]
KERNEL_DTYPES = [torch.float32, torch.float16, torch.bfloat16]
kernel_test = pytest.mark.skipif(not KERNELS_RUN_HERE, reason="run by test_kernels_in_the_interpreter")


def assert_close(actual, expected):
    """A few ulp: Triton's exp/rsqrt and summation order differ from torch's in the last fp32 bit,
    which rounding to a 16-bit dtype mostly hides. Triton's CPU interpreter truncates fp32 -> bf16
    where GPUs round to nearest even, so there bf16 may be one ulp further off."""
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    bf16 = 2**-7 if ON_GPU else 2**-6
    tol = {torch.float32: 1e-5, torch.float16: 2**-10, torch.bfloat16: bf16}[actual.dtype]
    torch.testing.assert_close(actual, expected, rtol=tol, atol=tol)


def randn(*shape, dtype, seed=0, device=DEVICE):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(dtype=dtype, device=device)


# ---- references vs transformers (exact) -----------------------------------------------------
# transformers is imported in the tests, not above, so the interpreter child process skips it.


@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm_reference_is_llama_rms_norm(dtype):
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    norm = LlamaRMSNorm(96, eps=1e-5).to(dtype)
    torch.nn.init.normal_(norm.weight)
    x, res = randn(7, 96, dtype=dtype, seed=1, device="cpu"), randn(7, 96, dtype=dtype, seed=2, device="cpu")
    y, out = rms_norm_reference(x, norm.weight.data, 1e-5)
    assert torch.equal(y, norm(x)) and out is x
    y, out = rms_norm_reference(x, norm.weight.data, 1e-5, residual=res)
    assert torch.equal(out, res + x) and torch.equal(y, norm(res + x))  # LlamaDecoderLayer's order


@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_mul_reference_is_llama_mlp(dtype):
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaMLP

    cfg = LlamaConfig(hidden_size=48, intermediate_size=200, num_attention_heads=4, hidden_act="silu")
    mlp = LlamaMLP(cfg).to(dtype)
    x = randn(7, 48, dtype=dtype, device="cpu")
    with torch.no_grad():
        gate_up = torch.cat([mlp.gate_proj(x), mlp.up_proj(x)], dim=-1)
        assert torch.equal(mlp.down_proj(silu_mul_reference(gate_up)), mlp(x))


@pytest.mark.parametrize("dtype", DTYPES)
def test_rope_reference_is_apply_rotary_pos_emb(dtype):
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import (
        LlamaRotaryEmbedding,
        apply_rotary_pos_emb,
    )

    heads, kv_heads, dim, n = 4, 2, 32, 7
    cfg = LlamaConfig(hidden_size=heads * dim, num_attention_heads=heads, num_key_value_heads=kv_heads)
    qkv = randn(n, (heads + 2 * kv_heads) * dim, dtype=dtype, device="cpu")
    positions = torch.tensor([0, 1, 2, 5, 9, 30, 31])
    cos, sin = LlamaRotaryEmbedding(cfg)(qkv, positions[None])  # [1, N, D] in qkv's dtype
    k_cache, v_cache = torch.zeros(2, 2, 40, kv_heads, dim, dtype=dtype)
    slots = torch.tensor([0, 0, 0, 1, 1, 1, 1])
    q_rot = rope_and_cache_reference(qkv, heads, kv_heads, dim, cos[0], sin[0], k_cache, v_cache, slots, positions)
    q, k, v = qkv.view(1, n, -1, dim).transpose(1, 2).split([heads, kv_heads, kv_heads], dim=1)  # [1, h, N, D]
    q_hf, k_hf = apply_rotary_pos_emb(q, k, cos, sin)
    assert torch.equal(q_rot, q_hf[0].transpose(0, 1))
    assert torch.equal(k_cache[slots, positions], k_hf[0].transpose(0, 1))
    assert torch.equal(v_cache[slots, positions], v[0].transpose(0, 1))


def test_cpu_tensors_take_the_torch_path(monkeypatch):
    monkeypatch.setattr(layer_ops, "_kernels", lambda: pytest.fail("built Triton kernels for CPU tensors"))
    x, weight = torch.randn(3, 96), torch.randn(96)
    assert torch.equal(rms_norm(x, weight, 1e-6)[0], rms_norm_reference(x, weight, 1e-6)[0])
    assert torch.equal(silu_mul(x), silu_mul_reference(x))


# ---- Triton vs reference -------------------------------------------------------------------


@pytest.mark.skipif(KERNELS_RUN_HERE, reason="the kernel tests run in this process")
def test_kernels_in_the_interpreter():
    """Runs this file's kernel tests in a child with TRITON_INTERPRET=1 set before any import."""
    cmd = [sys.executable, "-m", "pytest", "-q", "--noconftest", "-p", "no:cacheprovider",
           "-k", "kernel_matches", __file__]
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    child = subprocess.run(cmd, check=False, env=env, capture_output=True, text=True, cwd=Path(__file__).parent.parent)
    assert child.returncode == 0, child.stdout[-5000:] + child.stderr[-2000:]


@kernel_test
@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
@pytest.mark.parametrize("n, hidden", [(1, 200), (7, 96)])  # widths not powers of 2: masked tails
@pytest.mark.parametrize("with_residual", [False, True])
def test_rms_norm_kernel_matches_reference(dtype, n, hidden, with_residual):
    x, weight = randn(n, hidden, dtype=dtype, seed=1), randn(hidden, dtype=dtype, seed=2)
    residual = randn(n, hidden, dtype=dtype, seed=3) if with_residual else None
    y, out = rms_norm(x, weight, 1e-6, residual, use_triton=True)
    y_ref, out_ref = rms_norm_reference(x, weight, 1e-6, residual)
    assert_close(y, y_ref)
    assert_close(out, out_ref)
    assert (out is x) == (not with_residual)


@kernel_test
@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
@pytest.mark.parametrize("n, inter", [(1, 96), (7, 1500)])  # 1500: two column blocks, the second partial
def test_silu_mul_kernel_matches_reference(dtype, n, inter):
    gate_up = randn(n, 2 * inter, dtype=dtype) * 4
    assert_close(silu_mul(gate_up, use_triton=True), silu_mul_reference(gate_up))


def rope_case(dtype, n, heads, kv_heads, dim, slots_count=3, length=16):
    """Fresh inputs and a cache poisoned with random values; (slot, position) pairs distinct."""
    qkv = randn(n, (heads + 2 * kv_heads) * dim, dtype=dtype, seed=1)
    cos, sin = randn(n, dim, dtype=dtype, seed=2), randn(n, dim, dtype=dtype, seed=3)
    pairs = torch.randperm(slots_count * length, generator=torch.Generator().manual_seed(4))[:n]
    slots, positions = (pairs // length).to(DEVICE), (pairs % length).to(DEVICE)
    cache = randn(2, slots_count, length, kv_heads, dim, dtype=dtype, seed=5)  # [k|v, S, T, kvH, D]
    return (qkv, heads, kv_heads, dim, cos, sin), cache, slots, positions


@kernel_test
@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
@pytest.mark.parametrize("n, heads, kv_heads, dim", [(1, 4, 2, 64), (7, 4, 2, 64), (7, 3, 1, 96)])  # 96: D/2 = 48
def test_rope_and_cache_kernel_matches_reference(dtype, n, heads, kv_heads, dim):
    args, cache, slots, positions = rope_case(dtype, n, heads, kv_heads, dim)
    poisoned, qkv_before, expected = cache.clone(), args[0].clone(), cache.clone()
    q_ref = rope_and_cache_reference(*args, expected[0], expected[1], slots, positions)
    q_rot = rope_and_cache(*args, cache[0], cache[1], slots, positions, use_triton=True)
    assert_close(q_rot, q_ref)
    assert torch.equal(args[0], qkv_before)  # qkv is not modified
    assert torch.equal(cache[1], expected[1])  # v is copied: exact
    assert_close(cache[0], expected[0])
    written = torch.zeros(cache.shape[1:3], dtype=torch.bool, device=DEVICE)  # [S, T]
    written[slots, positions] = True
    assert torch.equal(cache[:, ~written], poisoned[:, ~written])  # nothing else changed


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_llama_8b_shapes_kernel_matches_reference(dtype):
    n, hidden, inter = 37, 4096, 14336
    x, res = (randn(n, hidden, dtype=dtype, seed=s) for s in (1, 2))
    weight = randn(hidden, dtype=dtype, seed=3)
    for got, want in zip(rms_norm(x, weight, 1e-5, res), rms_norm_reference(x, weight, 1e-5, res)):
        assert_close(got, want)
    gate_up = randn(n, 2 * inter, dtype=dtype)
    assert_close(silu_mul(gate_up), silu_mul_reference(gate_up))
    args, cache, slots, positions = rope_case(dtype, n, 32, 8, 128, slots_count=8, length=64)
    expected = cache.clone()
    q_ref = rope_and_cache_reference(*args, expected[0], expected[1], slots, positions)
    assert_close(rope_and_cache(*args, cache[0], cache[1], slots, positions), q_ref)
    assert_close(cache, expected)
