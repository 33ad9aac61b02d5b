"""Turning logits into the distributions both sides of speculative decoding sample from.

The draft distribution q and the target distribution p must go through exactly the same
transform (temperature, top-k, top-p) or rejection sampling stops being lossless (docs/design.md §3).
Temperature 0 is greedy: the distribution is one-hot on the argmax, which turns rejection
sampling into "accept while the argmaxes match".

Pure torch; this is the reference a fused kernel is checked against.
"""
from __future__ import annotations

import torch


def logits_to_probs(
    logits: torch.Tensor,  # [N, V] float
    temperature: torch.Tensor,  # [N] float, 0 = greedy
    top_k: torch.Tensor,  # [N] int, 0 = off
    top_p: torch.Tensor,  # [N] float in (0, 1], 1 = off
    flags: tuple[bool, bool, bool] | None = None,  # sampling_flags(): skips three device syncs
) -> torch.Tensor:  # [N, V] float32, rows sum to 1
    """Per-row temperature / top-k / top-p, then softmax; greedy rows become one-hot."""
    any_greedy, any_top_k, any_top_p = flags or (
        bool((temperature <= 0).any()), bool((top_k > 0).any()), bool((top_p < 1).any()))
    logits = logits.float()
    greedy = temperature <= 0
    scaled = logits / torch.where(greedy, 1.0, temperature).unsqueeze(-1)
    if any_top_k:
        scaled = _mask_top_k(scaled, top_k)
    if any_top_p:
        scaled = _mask_top_p(scaled, top_p)
    probs = torch.softmax(scaled, dim=-1)
    if any_greedy:
        one_hot = torch.zeros_like(probs)
        one_hot.scatter_(-1, logits.argmax(-1, keepdim=True), 1.0)
        probs = torch.where(greedy.unsqueeze(-1), one_hot, probs)
    return probs


def _mask_top_k(logits: torch.Tensor, top_k: torch.Tensor) -> torch.Tensor:
    """Keep the k largest logits of each row (k = 0 keeps all)."""
    vocab = logits.shape[-1]
    k = torch.where(top_k > 0, top_k.clamp(max=vocab), vocab).long()
    # kth largest value per row: sort descending, pick index k-1.
    kth = logits.sort(dim=-1, descending=True).values.gather(-1, (k - 1).unsqueeze(-1))
    return logits.masked_fill(logits < kth, float("-inf"))


def _mask_top_p(logits: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Keep the smallest set of tokens whose probability reaches top_p (always the top one)."""
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    sorted_probs = torch.softmax(sorted_logits, dim=-1)
    # Mass strictly before each token; a token is dropped once that mass already reaches top_p.
    # e.g. probs [.5, .3, .2], top_p .7: before = [0, .5, .8] -> keep the first two.
    before = sorted_probs.cumsum(-1) - sorted_probs
    drop_sorted = before >= top_p.unsqueeze(-1)
    drop_sorted[..., 0] = False
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def entropy(probs: torch.Tensor) -> torch.Tensor:  # probs [N, V] -> [N] nats
    """Shannon entropy in nats, with 0·log 0 = 0."""
    logp = torch.log(probs.clamp_min(1e-30))
    return -(probs * logp).sum(-1)


def sampling_tensors(params, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """temperature [n], top_k [n], top_p [n] from n objects with those attributes."""
    temp = to_device(torch.tensor([p.temperature for p in params], dtype=torch.float32), device)
    top_k = to_device(torch.tensor([p.top_k for p in params], dtype=torch.long), device)
    top_p = to_device(torch.tensor([p.top_p for p in params], dtype=torch.float32), device)
    return temp, top_k, top_p


def to_device(host: torch.Tensor, device) -> torch.Tensor:
    """A small host tensor on the device without waiting for the device's queue to drain.

    torch.tensor(..., device="cuda") and .to("cuda") wait for the stream after the copy (a
    cudaStreamSynchronize each; a sampled step makes several such copies). From pageable
    memory CUDA stages the bytes before cudaMemcpyAsync returns, so the host tensor may go at once.
    """
    return host.to(device, non_blocking=True)


def sampling_flags(params) -> tuple[bool, bool, bool]:
    """(any greedy, any top-k, any top-p) from the host-side parameters, for logits_to_probs."""
    return (any(p.temperature <= 0 for p in params), any(p.top_k > 0 for p in params),
            any(p.top_p < 1 for p in params))
