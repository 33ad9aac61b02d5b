"""Each request's own random stream, drawn for a whole batch in one kernel.

Sampling takes its randomness per request (uniforms for the accept tests, exponential noise for
the exact sample from q or the residual), each request from its own seed, so that a seeded
request gives the same tokens alone or in any batch. A torch.Generator per request costs a launch
per request and draw: at 64 requests and T=1 some 190 launches a step, host time the GPU waits
for. Here a request's stream is a key (its seed) and a position, and the value at a position is a
hash of the two (a counter-based generator, as Philox is: Salmon et al., "Parallel random numbers:
as easy as 1, 2, 3", SC 2011), so one kernel fills every request's values from its own positions.

The hash is lowbias32 (C. Wellons' integer hash prospector: a xorshift-multiply mix of 32-bit
words), chained over the position's and the key's two 32-bit halves. A uniform keeps 23 bits,
u = (2m + 1) / 2^24 for m < 2^23: in (0, 1), exact in float32, as fine as torch.rand's 24.
`draw_torch` is the reference (integers in int64, every product below 2^63); on CUDA
`draw_triton` computes the same integers the same way (the uniforms bit for bit; exponentials up
to the last bit of the log); on CPU `draw_numpy` computes them in uint32, whose products wrap
mod 2^32 as the hash wants (bit for bit, the log taken by torch as the reference takes it): the
reference's int64 emulation of 32-bit products costs ~4x the operations on 2x the bytes, and an
exponential race over an 8192-token vocabulary for 64 requests drafting 7 tokens hashes 3.7 M
values a step (on a 2-core CPU, ~0.45 s a step against ~0.04 at T=0).
"""
from __future__ import annotations

import numpy as np
import torch

from tandem.kernels._triton import jit, pick_triton, tl, triton
from tandem.kernels.sampling import to_device

_M32 = 0xFFFFFFFF
_C1, _C2 = 0x7FEB352D, 0x846CA68B  # lowbias32's multipliers
_S1, _S2, _S3 = 0x9E3779B9, 0x85EBCA6B, 0xC2B2AE35  # odd constants that keep position 0 of key 0 off 0


class Stream:
    """One request's stream: its key and how many values it has used."""

    def __init__(self, seed: int) -> None:
        self.key = seed & ((1 << 64) - 1)
        self.position = 0

    def take(self, n: int) -> int:
        """The position of the next n values, which count as used from now."""
        start = self.position
        self.position += n
        return start


def draw(streams: list[Stream | None], counts: list[int], width: int, device, exponential: bool = False,
         out: torch.Tensor | None = None, use_triton: bool | None = None) -> torch.Tensor:  # [B, width] float32
    """Row b: stream b's values from its position on, uniforms in (0, 1) or, exponential=True,
    -log of them (Exp(1)). Stream b advances by counts[b] (what the caller uses of the row; the
    rest of the row is never used). A row with no stream gets values of key 0. out: a
    contiguous [B, width] float32 tensor to write (else a new one)."""
    rows = [[s.key & _M32, s.key >> 32, s.take(n)] if s is not None else [0, 0, 0] for s, n in zip(streams, counts)]
    out = torch.empty(len(rows), width, device=device) if out is None else out
    assert out.shape == (len(rows), width) and out.is_contiguous(), (tuple(out.shape), len(rows), width)
    if width == 0 or not rows:
        return out
    keys = to_device(torch.tensor(rows, dtype=torch.long), device)  # [B, 3]: key low, key high, start
    if pick_triton(keys, use_triton):
        return draw_triton(keys, width, exponential, out)
    if keys.device.type == "cpu":
        return out.copy_(draw_numpy(keys, width, exponential))
    return out.copy_(draw_torch(keys, width, exponential))


def sample(probs: torch.Tensor, stream: Stream) -> int:  # probs [V]
    """One token from a distribution, by the exponential race argmax_v probs[v] / E[v] with
    E ~ Exp(1) from the request's own stream (as the rejection sampler and the draft program draw)."""
    noise = draw([stream], [probs.shape[-1]], probs.shape[-1], probs.device, exponential=True)[0]
    return int((probs / noise).argmax())


def draw_torch(keys: torch.Tensor, width: int, exponential: bool) -> torch.Tensor:
    """The reference: keys [B, 3] int64 (key low, key high, start) -> [B, width] float32."""
    pos = keys[:, 2:3] + torch.arange(width, device=keys.device)  # [B, width]
    h = _mix((pos & _M32) ^ _S1)
    h = _mix(h ^ (pos >> 32) ^ _S2)
    h = _mix(h ^ keys[:, 0:1])
    h = _mix(h ^ keys[:, 1:2] ^ _S3)
    u = ((h >> 9) * 2 + 1).float() * (1.0 / (1 << 24))
    return -torch.log(u) if exponential else u


def draw_numpy(keys: torch.Tensor, width: int, exponential: bool, block: int = 1 << 15) -> torch.Tensor:
    """draw_torch's values, bit for bit, hashed in uint32 on the CPU: keys [B, 3] int64 (CPU).
    Rows go through in blocks of about `block` values, so that the hash's passes stay in cache;
    a position's two 32-bit halves are the start's plus the offset, with the carry."""
    k = keys.numpy().astype(np.uint64)
    key_lo, key_hi = k[:, 0:1].astype(np.uint32), k[:, 1:2].astype(np.uint32)
    start_lo, start_hi = (k[:, 2:3] & np.uint64(_M32)).astype(np.uint32), (k[:, 2:3] >> np.uint64(32)).astype(np.uint32)
    out = np.empty((k.shape[0], width), dtype=np.uint32)
    step = max(1, block // max(width, 1))
    span = np.arange(width, dtype=np.uint32)
    with np.errstate(over="ignore"):
        for r in range(0, k.shape[0], step):
            rows = slice(r, r + step)
            h = out[rows]
            np.add(start_lo[rows], span, out=h)  # the low half, wrapping past 2^32...
            hi = start_hi[rows] + (h < start_lo[rows])  # ...into the high half
            h ^= np.uint32(_S1)
            _mix_np(h)
            h ^= hi
            h ^= np.uint32(_S2)
            _mix_np(h)
            h ^= key_lo[rows]
            _mix_np(h)
            h ^= key_hi[rows]
            h ^= np.uint32(_S3)
            _mix_np(h)
            h >>= np.uint32(9)
            h <<= np.uint32(1)
            h |= np.uint32(1)  # (h >> 9) * 2 + 1: odd, below 2^24
    u = torch.from_numpy(out.astype(np.float32)) * (1.0 / (1 << 24))
    return -torch.log(u) if exponential else u


def _mix_np(x: np.ndarray) -> None:  # lowbias32 in place on uint32 (products wrap mod 2^32)
    x ^= x >> np.uint32(16)
    x *= np.uint32(_C1)
    x ^= x >> np.uint32(15)
    x *= np.uint32(_C2)
    x ^= x >> np.uint32(16)


def _mix(x: torch.Tensor) -> torch.Tensor:  # lowbias32 on values below 2^32 held in int64
    x = x ^ (x >> 16)
    x = _mul32(x, _C1)
    x = x ^ (x >> 15)
    x = _mul32(x, _C2)
    return x ^ (x >> 16)


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """x * c mod 2^32 for x < 2^32, in two 16-bit halves of c (every product < 2^48, so int64
    never overflows)."""
    return (x * (c & 0xFFFF) + (((x * (c >> 16)) & 0xFFFF) << 16)) & _M32


def draw_triton(keys: torch.Tensor, width: int, exponential: bool, out: torch.Tensor | None = None,
                block: int = 1024) -> torch.Tensor:
    """One launch for the batch: the same uniforms as draw_torch, bit for bit."""
    assert keys.dim() == 2 and keys.shape[1] == 3 and keys.dtype == torch.long, (tuple(keys.shape), keys.dtype)
    batch = keys.shape[0]
    out = torch.empty(batch, width, device=keys.device) if out is None else out
    # one block size whatever the width: two variants in all (EXP or not), both warmed at start
    _draw_kernel[(batch, triton.cdiv(width, block))](keys, out, width, EXP=exponential, BLOCK=block)
    return out


@jit
def _mul32_t(x, c_lo, c_hi):  # as _mul32: int64 throughout, every product < 2^48
    return (x * c_lo + (((x * c_hi) & 0xFFFF) << 16)) & 0xFFFFFFFF


@jit
def _mix_t(x):  # as _mix (lowbias32 on int64 values below 2^32)
    x = x ^ (x >> 16)
    x = _mul32_t(x, 0x352D, 0x7FEB)
    x = x ^ (x >> 15)
    x = _mul32_t(x, 0xA68B, 0x846C)
    return x ^ (x >> 16)


@jit(do_not_specialize=["width"])
def _draw_kernel(keys_ptr, out_ptr, width, EXP: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < width
    key_lo = tl.load(keys_ptr + row * 3)
    key_hi = tl.load(keys_ptr + row * 3 + 1)
    pos = tl.load(keys_ptr + row * 3 + 2) + cols.to(tl.int64)
    h = _mix_t((pos & 0xFFFFFFFF) ^ 0x9E3779B9)
    h = _mix_t(h ^ (pos >> 32) ^ 0x85EBCA6B)
    h = _mix_t(h ^ key_lo)
    h = _mix_t(h ^ key_hi ^ 0xC2B2AE35)
    u = ((h >> 9) * 2 + 1).to(tl.float32) * (1.0 / 16777216.0)
    if EXP:
        u = -tl.log(u)
    tl.store(out_ptr + row.to(tl.int64) * width + cols, u, mask=mask)
