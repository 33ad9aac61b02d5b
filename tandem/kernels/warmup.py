"""Compile the Triton kernels before the first request needs them.

Triton compiles a kernel the first time it meets a new specialization: the rejection sampler
has one per power-of-two draft length (BLOCK_K), with and without q, and a few more for
integer arguments equal to 1 or divisible by 16. Each compile takes a fraction of a second to
a second, inside whichever step asks first (a 3 ms step becomes a 10-26 ms one on a GPU), so a
lane compiles them all before it serves. Triton keeps compiled
kernels on disk (~/.triton/cache), so a later process on the same machine pays nothing.
"""
from __future__ import annotations

import gc

import torch

from tandem.kernels._triton import pick_triton
from tandem.kernels.entropy import softmax_entropy_triton
from tandem.kernels.rejection import rejection_sample_triton
from tandem.kernels.streams import draw_triton

MAX_DRAFT = 64  # speculation.max_draft's limit (tandem/cluster/config.py)
LOGIT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def warm_kernels(vocab: int, device, max_draft: int = MAX_DRAFT, rejection: bool = True,
                 use_triton: bool | None = None) -> int:
    """Launch each Triton kernel once per specialization a step can ask for, on one row of
    zeros: rejection sampling for 0..max_draft draft tokens with and without q (rejection=True,
    the verifier's side), the softmax-entropy for each logits dtype and the random streams'
    uniforms and exponentials (both sides). Returns how many launches ran:
    0 where the torch paths run instead (CPU, no Triton, TANDEM_TRITON=0)."""
    device = torch.device(device)
    if not pick_triton(torch.empty(0, device=device), use_triton):
        return 0
    launches = 0
    for dtype in LOGIT_DTYPES:  # the kernel specializes on its input's dtype (engines give fp32 or bf16/fp16 logits)
        softmax_entropy_triton(torch.zeros(1, vocab, device=device, dtype=dtype), torch.ones(1, device=device))
        launches += 1
    for exponential in (False, True):  # the random streams (both sides)
        draw_triton(torch.zeros(1, 3, dtype=torch.long, device=device), vocab, exponential)
        launches += 1
    for k in range(max_draft + 1) if rejection else ():
        p = torch.full((1, k + 1, vocab), 1.0 / vocab, device=device)
        for q in (None, torch.full((1, k, vocab), 1.0 / vocab, device=device)):
            rejection_sample_triton(torch.zeros(1, k, dtype=torch.long, device=device),
                                    torch.full((1,), k, dtype=torch.long, device=device), q, p,
                                    torch.ones(1, dtype=torch.bool, device=device),
                                    torch.full((1, k), 0.5, device=device), torch.ones(1, vocab, device=device))
            launches += 1
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return launches


def record_compiles() -> list[str]:
    """From now on, append every Triton kernel variant this process compiles (or loads from the
    disk cache), with its arguments' specializations, to the returned list: benchmarks attribute a
    slow step to a compile and name what differed from the warmed variants.
    Empty (nothing recorded) without Triton or without its runtime hooks."""
    log: list[str] = []
    try:
        from triton import knobs
    except ImportError:
        return log

    def hook(*args, fn=None, repr=None, **kwargs):
        log.append(str(repr))  # name[options](argument: type and specialization, ...)
        return None  # compile as usual

    knobs.runtime.jit_cache_hook = hook
    return log


def freeze_heap() -> int:
    """Collect once, then put every object alive now out of the cyclic collector's reach.

    A full collection walks every tracked object, and a process that has loaded a pair holds
    ~0.4 M of them (torch, transformers, the engines, the graphs' Python side): one collection
    takes ~240 ms, a stall of a whole step's worth of tokens for every running request. Nothing made at start becomes
    garbage while serving, so freezing it leaves later collections only what serving makes (vLLM
    freezes after capturing its graphs). Returns how many objects are frozen."""
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()
