"""Triton as an optional dependency: CPU installs may lack it, and every kernel in kernels/ has a
pure-torch reference that needs nothing from it.

Without Triton, `jit` leaves kernel bodies as plain functions that nothing launches.
"""
from __future__ import annotations

import functools
import os

import torch

try:
    import triton
    import triton.language as tl

    jit = triton.jit
except ImportError:  # CPU-only install: the torch paths are used
    triton = None
    tl = None

    def jit(fn=None, **options):  # @jit and @jit(do_not_specialize=...) alike
        return fn if fn is not None else (lambda f: f)


@functools.cache
def triton_enabled() -> bool:
    """TANDEM_TRITON=0 turns every Triton kernel off (the torch references run): a switch to
    rule a kernel in or out when an output looks wrong. Read once, when a kernel is first picked."""
    return os.environ.get("TANDEM_TRITON", "1") != "0"


def pick_triton(x: torch.Tensor, use_triton: bool | None) -> bool:
    """None: Triton for CUDA tensors when it is installed; True / False: the caller's choice.

    True on CPU tensors works only under Triton's interpreter (TRITON_INTERPRET=1 before triton
    is first imported), which is how the tests check the kernels without a GPU.
    """
    if use_triton is None:
        return triton is not None and x.is_cuda and triton_enabled()
    assert not use_triton or triton is not None, "use_triton=True but triton is not installed"
    return use_triton


# Argmax over a row streamed in blocks, the first index on ties (as torch.argmax): each lane keeps
# its largest value and where it was, strictly greater replacing, so a lane keeps its earliest;
# then the earliest position among the lanes holding the overall maximum.


@jit
def keep_first_max(val, at, best, best_at):  # all [BLOCK]
    better = val > best
    return tl.where(better, val, best), tl.where(better, at, best_at)


@jit
def first_argmax(best, best_at, V):  # [BLOCK] -> scalar; V (> every position) marks "none"
    top = tl.max(best, axis=0)
    return tl.min(tl.where(best == top, best_at, V), axis=0)
