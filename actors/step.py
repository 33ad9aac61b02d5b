"""One speculative step over a lane's batch: draft ‖ verify → rejection sample → apply.

The same function serves AR, vanilla SD and PEARL requests side by side; what differs per
request is its mode object (actors/modes.py). In-process the drafter runs first; with PEARL
requests the verifier's work does not depend on this step's drafts, which is what lets the
cluster run both at once (DESIGN §4).
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from actors.drafter import Drafter
from actors.messages import DraftChunk
from actors.modes import MODE_STEPS
from actors.request import RequestState
from actors.verifier import Verifier
from kernels.rejection import RejectionOutput, draw_randoms, rejection_sample


@dataclass
class StepTiming:
    """Where one step's time went, in seconds (DESIGN §4's draft / verify / exchange)."""

    total: float = 0.0
    draft: float = 0.0  # the drafter's own compute
    verify: float = 0.0  # the verifier's forward and the sampling transform
    wait: float = 0.0  # the leader waiting for drafts (after verifying, or before for SD)
    exchange: float = 0.0  # draft round trip not spent drafting: messages and their latency


def speculative_step(
    reqs: list[RequestState], drafter: Drafter, verifier: Verifier, rooms: list[int]
) -> tuple[list[list[int]], StepTiming]:
    """Advance every request by one verifier forward; return the tokens each one gained."""
    t = StepTiming()
    t0 = time.perf_counter()
    modes = [MODE_STEPS[r.spec.mode] for r in reqs]
    future = drafter.submit([m.draft_item(r, room) for m, r, room in zip(modes, reqs, rooms)])
    overlapped = not any(m.verify_needs_draft for m in modes)
    if overlapped:  # PEARL / AR: the verifier does not wait for the drafter (they overlap when remote)
        target_probs, t.verify = _timed(verifier.score, [m.verify_item(r, None) for m, r in zip(modes, reqs)])
        chunks, t.wait = _timed(future.result)
    else:  # vanilla SD: verify what was just drafted
        chunks, t.wait = _timed(future.result)
        target_probs, t.verify = _timed(verifier.score, [m.verify_item(r, c) for m, r, c in zip(modes, reqs, chunks)])
    t.draft = future.seconds
    round_trip = time.perf_counter() - t0 - (0.0 if overlapped else t.verify)
    # What the round trip spent beyond computing: with overlap, beyond the longer of the two sides.
    t.exchange = max(0.0, round_trip - (max(t.draft, t.verify) if overlapped else t.draft))
    checks = [m.checked(r, c) for m, r, c in zip(modes, reqs, chunks)]
    verdict = judge(checks, target_probs, [r.generator for r in reqs])
    emitted_all, rounds = [], []
    for b, (m, r, c) in enumerate(zip(modes, reqs, chunks)):
        accepted = int(verdict.num_accepted[b])
        emitted = verdict.output_ids[b, : int(verdict.num_emitted[b])].tolist()
        _count(r, c, len(checks[b][0]), accepted)
        rounds += m.apply(r, c, accepted, emitted)
        emitted_all.append(emitted)
    drafter.update(rounds)
    t.total = time.perf_counter() - t0
    return emitted_all, t


def _timed(fn, *args):
    start = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - start


def judge(checks, target_probs: list[torch.Tensor], generators) -> RejectionOutput:
    """Pad the per-request checks into one batch for the rejection sampler.

    checks[b] = (ids, q [n_b, V] or None, bonus); target_probs[b] = p [n_b (+1 if bonus), V].
    """
    vocab, device = target_probs[0].shape[-1], target_probs[0].device
    num = [len(ids) for ids, _, _ in checks]
    k = max(num)
    draft_ids = torch.zeros(len(checks), k, dtype=torch.long, device=device)  # [B, K]
    p = torch.zeros(len(checks), k + 1, vocab, device=device)  # [B, K+1, V]
    q = None
    if any(probs is not None for _, probs, _ in checks):
        q = torch.zeros(len(checks), k, vocab, device=device)  # [B, K, V]
    for b, (ids, probs, _) in enumerate(checks):
        draft_ids[b, : num[b]] = torch.tensor(ids, dtype=torch.long)
        p[b, : target_probs[b].shape[0]] = target_probs[b]
        if q is not None and num[b]:
            q[b, : num[b]] = probs if probs is not None else _one_hot(ids, vocab, device)
    bonus = torch.tensor([bonus for _, _, bonus in checks], device=device)
    uniforms, noise = draw_randoms(generators, num, k, vocab, device)
    num_draft = torch.tensor(num, dtype=torch.long, device=device)
    return rejection_sample(draft_ids, num_draft, q, p, bonus, uniforms, noise)


def _one_hot(ids: list[int], vocab: int, device) -> torch.Tensor:  # [n, V]
    return torch.nn.functional.one_hot(torch.tensor(ids, device=device), vocab).float()


def _count(r: RequestState, chunk: DraftChunk, checked: int, accepted: int) -> None:
    s = r.stats
    s.steps += 1
    s.drafted += len(chunk.ids)
    s.checked += checked
    s.accepted += accepted
    if chunk.lam is not None and r.spec.adaedl and r.spec.mode != "ar":
        s.adaedl_lambda = chunk.lam
