"""One speculative step over a lane's batch: draft ‖ verify → rejection sample → apply.

The same function serves AR, vanilla SD and PEARL requests side by side; what differs per
request is its mode object (tandem/spec/modes.py). In-process the drafter runs first; with PEARL
requests the verifier's work does not depend on this step's drafts, which is what lets the
cluster run both at once (docs/design.md §4).
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from tandem.kernels.rejection import RejectionOutput, draw_randoms, rejection_sample
from tandem.kernels.sampling import to_device
from tandem.spec.drafting import Drafter
from tandem.spec.messages import DraftChunk
from tandem.spec.modes import MODE_STEPS
from tandem.spec.request import RequestState
from tandem.spec.verifier import Verifier


@dataclass
class StepTiming:
    """Where one step's time went, in seconds (docs/design.md §4's draft / verify / exchange)."""

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
    overlapped = not any(m.verify_needs_draft for m in modes)
    future = drafter.submit([m.draft_item(r, room) for m, r, room in zip(modes, reqs, rooms)], overlap=overlapped)
    greedy = all(r.sampling.temperature <= 0 for r in reqs)  # p one-hot: only argmaxes matter
    score = verifier.greedy if greedy else verifier.score
    if overlapped:  # PEARL / AR: the verifier does not wait for the drafter (they overlap when remote)
        target, t.verify = _timed(score, [m.verify_item(r, None) for m, r in zip(modes, reqs)])
        chunks, t.wait = _timed(future.result)
    else:  # vanilla SD: verify what was just drafted
        chunks, t.wait = _timed(future.result)
        target, t.verify = _timed(score, [m.verify_item(r, c) for m, r, c in zip(modes, reqs, chunks)])
    t.draft = future.seconds
    round_trip = time.perf_counter() - t0 - (0.0 if overlapped else t.verify)
    # What the round trip spent beyond computing: where both sides ran at once, beyond the longer
    # of the two; where the drafter drafted inside submit (in-process, no thread), beyond both.
    concurrent = overlapped and future.concurrent
    busy = max(t.draft, t.verify) if concurrent else t.draft + (t.verify if overlapped else 0.0)
    t.exchange = max(0.0, round_trip - busy)
    checks = [m.checked(r, c) for m, r, c in zip(modes, reqs, chunks)]
    if greedy:
        num_accepted, out_ids = judge_greedy(checks, target)
        num_emitted = [len(o) for o in out_ids]
    else:
        verdict = judge(checks, target, [r.stream for r in reqs])
        # One device-to-host copy for the whole batch and all three results: each is a sync.
        rows = torch.cat([verdict.output_ids, verdict.num_accepted[:, None], verdict.num_emitted[:, None]], 1).tolist()
        out_ids = [row[:-2] for row in rows]
        num_accepted, num_emitted = [row[-2] for row in rows], [row[-1] for row in rows]
    emitted_all, rounds = [], []
    for b, (m, r, c) in enumerate(zip(modes, reqs, chunks)):
        accepted = num_accepted[b]
        emitted = out_ids[b][: num_emitted[b]]
        _count(r, c, len(checks[b][0]), accepted)
        rounds += m.apply(r, c, accepted, emitted)
        emitted_all.append(emitted)
    # AdaEDL's cost ratio: what the step cost beyond drafting (all of it where the draft ran beside)
    drafter.update(rounds, time.perf_counter() - t0 - (0.0 if concurrent else t.draft))
    t.total = time.perf_counter() - t0
    return emitted_all, t


def _timed(fn, *args):
    start = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - start


def judge_greedy(checks, target_ids: list[list[int]]) -> tuple[list[int], list[list[int]]]:
    """Rejection sampling with one-hot p (temperature 0), on the host: accept while the draft
    equals the target's argmax; at the first mismatch emit the argmax; all accepted, the bonus.
    The same tokens rejection_sample gives for one-hot p and any q (tests/test_rejection.py)."""
    accepted_all, emitted_all = [], []
    for (ids, _, bonus), top in zip(checks, target_ids):
        n = 0
        while n < len(ids) and ids[n] == top[n]:
            n += 1
        emitted = list(ids[:n])
        if n < len(ids) or bonus:
            emitted.append(top[n])
        accepted_all.append(n)
        emitted_all.append(emitted)
    return accepted_all, emitted_all


def judge(checks, target_probs: list[torch.Tensor], streams) -> RejectionOutput:
    """Pad the per-request checks into one batch for the rejection sampler.

    checks[b] = (ids, q [n_b, V] or None, bonus); target_probs[b] = p [n_b (+1 if bonus), V].
    """
    vocab, device = target_probs[0].shape[-1], target_probs[0].device
    num = [len(ids) for ids, _, _ in checks]
    batch, k = len(checks), max(num)
    # Host-side inputs go in one copy that does not wait for the device (tandem/kernels/sampling.py).
    rows = [[*ids, *[0] * (k - len(ids)), int(bonus), len(ids)] for ids, _, bonus in checks]
    host = to_device(torch.tensor(rows, dtype=torch.long), device)  # [B, K+2]: drafts | bonus | count
    draft_ids, bonus, num_draft = host[:, :k].contiguous(), host[:, k].bool(), host[:, k + 1].contiguous()
    if all(t.shape[0] == k + 1 for t in target_probs):  # every row present (AR, full windows)
        p = torch.cat(target_probs).float().view(batch, k + 1, vocab)
    else:  # scatter every request's rows into the padded batch with one copy (not one per request)
        p = torch.zeros(batch * (k + 1), vocab, device=device)
        p_rows = [b * (k + 1) + j for b, t in enumerate(target_probs) for j in range(t.shape[0])]
        p.index_copy_(0, to_device(torch.tensor(p_rows), device), torch.cat(target_probs).float())
        p = p.view(batch, k + 1, vocab)  # [B, K+1, V]
    q = None
    if any(probs is not None for _, probs, _ in checks):
        q = torch.zeros(batch * k, vocab, device=device)
        parts = [to_device(probs if probs is not None else _one_hot(ids, vocab, device), device)
                 for ids, probs, _ in checks if ids]
        q_rows = [b * k + j for b in range(batch) for j in range(num[b])]
        if q_rows:
            q.index_copy_(0, to_device(torch.tensor(q_rows), device), torch.cat(parts).float())
        q = q.view(batch, k, vocab)  # [B, K, V]
    uniforms, noise = draw_randoms(streams, num, k, vocab, device)
    return rejection_sample(draft_ids, num_draft, q, p, bonus, uniforms, noise)


def _one_hot(ids: list[int], vocab: int, device) -> torch.Tensor:  # [n, V]
    return torch.nn.functional.one_hot(to_device(torch.tensor(ids), device), vocab).float()


def _count(r: RequestState, chunk: DraftChunk, checked: int, accepted: int) -> None:
    s = r.stats
    s.steps += 1
    s.drafted += len(chunk.ids)
    s.checked += checked
    s.accepted += accepted
    if chunk.lam is not None and r.adaedl and r.spec.mode != "ar":
        s.adaedl_lambda = chunk.lam
