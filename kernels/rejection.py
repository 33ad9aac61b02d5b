"""Lossless verification of draft tokens: batched rejection sampling (DESIGN §3).

For a draft token d drafted from q, checked against the target's p at the same position:
    accept with probability min(1, p(d) / q(d));
    on the first rejection sample the correction from norm(max(0, p - q)) and stop;
    if every draft is accepted (and the caller asks for one), sample a bonus token from p.
Leviathan et al. 2023 (Theorem 1) show the output then follows p exactly.

Greedy requests need no special path: their p and q are one-hot (kernels.sampling), so the
ratio is 1 or 0 and the correction is argmax p. A one-hot (greedy) *draft* at T > 0 is the
same formula with q = one_hot(d): accept iff u < p(d), else sample p with d masked out.

All randomness comes in as tensors (uniforms for the accept tests, exponential noise for the
categorical draws), so a fused kernel given the same tensors must produce the same tokens.
Categorical draws use the exponential race: argmax_v probs[v] / E[v] with E ~ Exp(1) is a
sample from probs (normalisation is not needed).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class RejectionOutput:
    output_ids: torch.Tensor  # [B, K+1] int64: accepted drafts then correction/bonus, -1 padded
    num_accepted: torch.Tensor  # [B] int64: drafts accepted (0..num_draft)
    num_emitted: torch.Tensor  # [B] int64: tokens written to output_ids (accepted + 0 or 1)


def draw_randoms(
    generators: list[torch.Generator | None], num_draft: list[int], width: int, vocab: int, device
) -> tuple[torch.Tensor, torch.Tensor]:  # uniforms [B, width], noise [B, V]
    """Per-request random draws, each from that request's own seeded generator.

    Request b draws exactly num_draft[b] uniforms, so its stream does not depend on what else
    is in the batch (a seeded request gives the same tokens alone or batched).
    """
    uniforms = torch.ones(len(generators), width, device=device)
    noise = torch.empty(len(generators), vocab, device=device)
    for b, g in enumerate(generators):
        uniforms[b, : num_draft[b]] = torch.rand(num_draft[b], generator=g, device=device)
        noise[b].exponential_(generator=g)
    return uniforms, noise


def rejection_sample_reference(
    draft_ids: torch.Tensor,  # [B, K] int64; entries at j >= num_draft[b] are ignored
    num_draft: torch.Tensor,  # [B] int64
    draft_probs: torch.Tensor | None,  # [B, K, V] q; None = one-hot (greedy) drafts
    target_probs: torch.Tensor,  # [B, K+1, V] p; row num_draft[b] is the bonus position
    bonus: torch.Tensor,  # [B] bool: emit a bonus token when all drafts are accepted
    uniforms: torch.Tensor,  # [B, K] in [0, 1)
    noise: torch.Tensor,  # [B, V] ~ Exp(1)
) -> RejectionOutput:
    """Pure-torch reference: one request at a time, written to be read. See rejection_sample."""
    batch, k = draft_ids.shape
    out = torch.full((batch, k + 1), -1, dtype=torch.long, device=draft_ids.device)
    num_accepted = torch.zeros(batch, dtype=torch.long, device=draft_ids.device)
    num_emitted = torch.zeros(batch, dtype=torch.long, device=draft_ids.device)
    for b in range(batch):
        n = int(num_draft[b])
        q = draft_probs[b] if draft_probs is not None else None
        accepted, extra = _verify_one(draft_ids[b, :n], q, target_probs[b], uniforms[b], noise[b])
        out[b, :accepted] = draft_ids[b, :accepted]
        emitted = accepted
        if extra is None and bool(bonus[b]):
            extra = _race(target_probs[b, n], noise[b])
        if extra is not None:
            out[b, accepted] = extra
            emitted += 1
        num_accepted[b], num_emitted[b] = accepted, emitted
    return RejectionOutput(out, num_accepted, num_emitted)


def _verify_one(draft, q, p, uniforms, noise) -> tuple[int, int | None]:
    """Accepted count and the correction token (None when every draft was accepted)."""
    for j, d in enumerate(draft.tolist()):
        q_d = q[j, d] if q is not None else torch.tensor(1.0)
        if uniforms[j] < (p[j, d] / q_d.clamp_min(1e-30)).clamp(max=1.0):
            continue
        q_j = q[j] if q is not None else torch.nn.functional.one_hot(draft[j], p.shape[-1]).to(p)
        residual = (p[j] - q_j).clamp_min(0)
        if residual.sum() <= 0:  # p == q up to rounding: rejection was a rounding artefact
            residual = p[j]
        return j, _race(residual, noise)
    return len(draft), None


def _race(weights: torch.Tensor, noise: torch.Tensor) -> int:  # weights [V] >= 0, noise [V]
    """Sample index v with probability weights[v] / sum(weights) (exponential race)."""
    return int((weights / noise).argmax())


def rejection_sample(
    draft_ids: torch.Tensor,  # [B, K] int64
    num_draft: torch.Tensor,  # [B] int64
    draft_probs: torch.Tensor | None,  # [B, K, V] or None (one-hot drafts)
    target_probs: torch.Tensor,  # [B, K+1, V]
    bonus: torch.Tensor,  # [B] bool
    uniforms: torch.Tensor,  # [B, K]
    noise: torch.Tensor,  # [B, V]
) -> RejectionOutput:
    """Batched, no host sync: the same tokens as rejection_sample_reference for the same inputs."""
    batch, k = draft_ids.shape
    arange_k = torch.arange(k, device=draft_ids.device)
    valid = arange_k[None, :] < num_draft[:, None]  # [B, K]
    p_d = target_probs[:, :k].gather(-1, draft_ids.unsqueeze(-1)).squeeze(-1)  # [B, K]
    q_d = draft_probs.gather(-1, draft_ids.unsqueeze(-1)).squeeze(-1) if draft_probs is not None else torch.ones_like(p_d)
    ratio = (p_d / q_d.clamp_min(1e-30)).clamp(max=1.0)
    rejected_at = (uniforms >= ratio) & valid  # [B, K]
    # First rejection, or num_draft when none: e.g. rejected_at [F, T, T] -> 1.
    if k > 0:
        first = torch.where(rejected_at.any(1), rejected_at.int().argmax(1), num_draft)  # [B]
    else:
        first = num_draft.clone()
    was_rejected = first < num_draft
    rows = torch.arange(batch, device=draft_ids.device)
    p_row = target_probs[rows, first]  # [B, V]: the rejected position, or the bonus position
    if k > 0:
        at = first.clamp(max=k - 1)
        q_row = draft_probs[rows, at] if draft_probs is not None else _one_hot_rows(draft_ids[rows, at], p_row)
        residual = (p_row - q_row).clamp_min(0)
        residual = torch.where(residual.sum(-1, keepdim=True) > 0, residual, p_row)
        weights = torch.where(was_rejected[:, None], residual, p_row)
    else:
        weights = p_row
    extra = (weights / noise).argmax(-1)  # [B]
    emits_extra = was_rejected | bonus
    out = torch.where(arange_k[None, :] < first[:, None], draft_ids, -1)
    out = torch.cat([out, torch.full((batch, 1), -1, dtype=torch.long, device=out.device)], 1)
    out.scatter_(1, first[:, None], torch.where(emits_extra, extra, -1)[:, None])
    return RejectionOutput(out, first, first + emits_extra.long())


def _one_hot_rows(ids: torch.Tensor, like: torch.Tensor) -> torch.Tensor:  # ids [B] -> [B, V]
    return torch.zeros_like(like).scatter_(-1, ids[:, None], 1.0)
