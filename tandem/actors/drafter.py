"""The drafter: proposes chunks with the small model; AdaEDL decides where each chunk ends.

Two methods, as transformers' candidate generators have: `propose` and `update` (fold the
verifier's outcome into each request's AdaEDL state). The drafter never decides output tokens.
"""
from __future__ import annotations

import time
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import nullcontext

import torch

from tandem.engine.base import Engine
from tandem.engine.draft_steps import LONG_PIECE, PIECE, draft_window
from tandem.kernels.entropy import softmax_entropy
from tandem.kernels.sampling import (
    entropy,
    logits_to_probs,
    sampling_flags,
    sampling_tensors,
    to_device,
)
from tandem.kernels.streams import Stream, sample
from tandem.spec.adaedl import AcceptanceTable, AdaEDLConfig, AdaEDLState, CostRatio
from tandem.spec.drafting import DraftFuture
from tandem.spec.messages import DraftChunk, DraftItem, DraftRound


class LocalDrafter:
    """The drafter in this process: drafts inside `submit` (ThreadedDrafter: beside the verify)."""

    def __init__(self, engine: Engine, adaedl: AdaEDLConfig | None = None, fused: bool = True,
                 acceptance: dict[bool, AcceptanceTable] | None = None) -> None:
        self.engine = engine
        # A whole window per device program (tandem/engine/draft_steps.py) where the engine has it.
        self.fused = fused and engine.drafts_windows
        self.adaedl_config = adaedl or AdaEDLConfig()
        self._adaedl: dict[str, AdaEDLState] = {}
        # What the verifier accepted, by draft entropy, greedy and sampled requests apart; pass
        # one dict to several drafters of one pair to share what they learn.
        self._tables = {} if acceptance is None else acceptance
        for sampled in (False, True):
            self._tables.setdefault(sampled, AcceptanceTable(self.adaedl_config.gamma))
        self._streams: dict[str, Stream] = {}
        self._cost = CostRatio()  # AdaEDL's c, from the steps and the drafting rounds measured
        self._unfed: set[str] = set()  # requests whose prompt the next round feeds (not drafting's time)

    @property
    def max_context(self) -> int:
        return self.engine.max_context

    @property
    def free_slots(self) -> int:
        return self.engine.free_slots

    def start(self, rid: str, seed: int, slot: int | None = None) -> int:
        """Per-request state: a KV slot, a seeded random stream (independent of the verifier's), AdaEDL."""
        slot = self.engine.allocate() if slot is None else self.engine.allocate_slot(slot)
        self._streams[rid] = Stream((seed * 0x9E3779B1 + 1) % (2**63))
        self._adaedl[rid] = AdaEDLState(self.adaedl_config)
        self._unfed.add(rid)
        return slot

    def finish(self, rid: str, slot: int) -> None:
        self.engine.release(slot)
        self._streams.pop(rid, None)
        self._adaedl.pop(rid, None)
        self._unfed.discard(rid)

    def submit(self, items: list[DraftItem], overlap: bool = False) -> DraftFuture:
        """Start drafting; in-process the work is done here, a remote drafter returns at once.
        overlap: the caller verifies before it reads the chunks (PEARL, AR), so a drafter that
        can draft meanwhile should."""
        start = time.perf_counter()
        chunks = self.propose(items)
        return DraftFuture(chunks, time.perf_counter() - start)

    def close(self) -> None:
        """Nothing to release: the drafting runs on the caller's thread."""

    def status(self) -> list[dict]:
        return [{"kind": "local", "up": True, "lost": 0}]

    def lam(self, rid: str) -> float:
        return self._adaedl[rid].lam

    @property
    def cost_ratio(self) -> float | None:
        """c for AdaEDL's cost-aware stop: configured, or measured (None until both are)."""
        if self.adaedl_config.cost_ratio is not None:
            return self.adaedl_config.cost_ratio
        return self._cost.value

    def update(self, rounds: list[DraftRound], step_s: float | None = None) -> None:
        """Fold the verifier's verdicts into AdaEDL; step_s: the step's time outside drafting."""
        if step_s is not None and rounds:
            self._cost.step(step_s)
        for r in rounds:
            if r.rid in self._adaedl:
                self._adaedl[r.rid].update(r.n_drafted, r.n_accepted, r.max_len, r.entropies)

    @torch.inference_mode()
    def propose(self, items: list[DraftItem]) -> list[DraftChunk]:
        """Draft up to item.max_len tokens per request (AdaEDL may stop a chunk earlier)."""
        plain = all(it.sampling.top_k == 0 and it.sampling.top_p >= 1 for it in items)
        c = self.cost_ratio
        for it in items:
            if it.adaedl:
                self._adaedl[it.rid].begin_round(self._tables[it.sampling.temperature > 0], c)
        start = time.perf_counter()
        chunks, positions = self.propose_fused(items) if self.fused and plain else self.propose_stepwise(items)
        fed = [it.rid for it in items if it.rid in self._unfed]
        self._unfed.difference_update(fed)
        if positions:  # both paths end in a device-to-host copy: the time is the device's
            self._cost.draft(positions, time.perf_counter() - start, prefilled=bool(fed))
        return chunks

    def propose_fused(self, items: list[DraftItem]) -> tuple[list[DraftChunk], int]:
        """Whole windows on the device (pieces of PIECE or LONG_PIECE for AdaEDL requests).
        The paper's rule is applied to the returned entropies token by token: the same tokens as
        propose_stepwise for the same distributions. The cost rule keeps whole pieces and decides
        at their ends whether to draft on (tandem/spec/adaedl.py says why). Also returns how many
        positions the device drafted (the longest window of each piece)."""
        d = _Drafts(items)
        ids, seqs = d.ids, d.seqs
        active = [b for b, it in enumerate(items) if it.max_len > 0]
        rows = len(active)  # later pieces pad to the first one's batch (one graph bucket)
        positions = 0
        while active:
            batch = [items[b] for b in active]
            steps = [min(it.max_len - len(ids[b]), PIECE if ids[b] else self._piece(it)) for b, it in zip(active, batch)]
            positions += max(steps)
            tokens, entropies, q = draft_window(
                self.engine, [it.slot for it in batch], [seqs[b] for b in active], steps,
                [it.sampling.temperature for it in batch], [_samples(it) for it in batch],
                [self._streams[it.rid] for it in batch], min_batch=rows)
            still = []
            for row, (b, it) in enumerate(zip(active, batch)):
                state = self._adaedl[it.rid] if it.adaedl else None
                kept = len(tokens[row])
                if state is not None and not state.by_piece:
                    # AdaEDL's paper rule: stop before the first token not worth drafting (keep >= 1)
                    kept = next((j for j, h in enumerate(entropies[row]) if state.stop_before(h)), kept)
                for token, h in zip(tokens[row][:kept], entropies[row][:kept]):
                    d.keep(b, token, h)
                if q is not None and kept:
                    d.keep_q(b, q[row, :kept])  # one view per piece, not a row per token
                if state is not None and state.by_piece:
                    room = it.max_len - len(ids[b])
                    if room > 0 and state.draft_on(entropies[row], min(room, PIECE)):
                        still.append(b)
                elif kept == len(tokens[row]) and len(ids[b]) < it.max_len:  # no stop: draft on if not full
                    still.append(b)
            active = still
        return [self._chunk(it, *d.of(b)) for b, it in enumerate(items)], positions

    def _piece(self, item: DraftItem) -> int:
        """Positions of a request's first piece (later pieces: PIECE)."""
        if not item.adaedl:
            return item.max_len
        return LONG_PIECE if self._adaedl[item.rid].mean_length > PIECE else PIECE

    def propose_stepwise(self, items: list[DraftItem]) -> tuple[list[DraftChunk], int]:
        """The reference: all requests in one batch per position, a host decision per token."""
        d = _Drafts(items)
        active = [b for b, it in enumerate(items) if it.max_len > 0]
        positions = 0
        while active:
            positions += 1
            q, h, top = self._next_distributions([items[b] for b in active], [d.seqs[b] for b in active])
            h, top = h.tolist(), top.tolist()  # one sync per position for the whole batch
            still = []
            for row, b in enumerate(active):
                it = items[b]
                if it.adaedl and self._adaedl[it.rid].stop_before(h[row]):
                    continue  # AdaEDL: the next token is not worth drafting; always keep >= 1
                token = sample(q[row], self._streams[it.rid]) if _samples(it) else top[row]
                d.keep(b, token, h[row])
                d.keep_q(b, q[row : row + 1])
                if len(d.ids[b]) < it.max_len:
                    still.append(b)
            active = still
        return [self._chunk(it, *d.of(b)) for b, it in enumerate(items)], positions

    def _next_distributions(self, items, seqs) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q [n, V] after each sequence, the entropy [n] AdaEDL looks at, and the argmax [n]."""
        logits = self.engine.forward([it.slot for it in items], seqs, [1] * len(items))
        params = [it.sampling for it in items]
        if all(p.top_k == 0 and p.top_p >= 1 for p in params):
            temp = to_device(torch.tensor([p.temperature for p in params], dtype=torch.float32), logits.device)
            return softmax_entropy(logits, temp)  # fused on CUDA
        temp, top_k, top_p = sampling_tensors(params, logits.device)
        q = logits_to_probs(logits, temp, top_k, top_p, sampling_flags(params))
        # Greedy requests: entropy of the plain softmax, not of the one-hot q (docs/design.md §5).
        plain = torch.softmax(logits.float(), dim=-1)
        h = entropy(torch.where((temp <= 0).unsqueeze(-1), plain, q))
        return q, h, logits.argmax(-1)

    def _chunk(self, item: DraftItem, ids: list[int], probs: list[torch.Tensor], hs: list[float]) -> DraftChunk:
        # At temperature 0 q is one-hot on the draft token: sending it adds nothing.
        send = probs and item.send_probs and item.sampling.temperature > 0
        q = (probs[0] if len(probs) == 1 else torch.cat(probs)) if send else None  # [len(ids), V]
        lam = self._adaedl[item.rid].lam if item.rid in self._adaedl else None
        return DraftChunk(ids, q, lam, hs if item.adaedl else [])


class _Drafts:
    """What a propose call has drafted so far, per request: the tokens, their q rows (when the
    path has them: blocks of rows, one per piece) and draft entropies, and each sequence with its
    drafted tokens appended."""

    def __init__(self, items: list[DraftItem]) -> None:
        self.seqs = [list(it.seq) for it in items]
        self.ids: list[list[int]] = [[] for _ in items]
        self.probs: list[list[torch.Tensor]] = [[] for _ in items]  # [m, V] blocks
        self.entropies: list[list[float]] = [[] for _ in items]

    def keep(self, b: int, token: int, entropy: float) -> None:
        self.ids[b].append(token)
        self.seqs[b].append(token)
        self.entropies[b].append(entropy)

    def keep_q(self, b: int, q_rows: torch.Tensor) -> None:  # [m, V]: the kept tokens' q, in order
        self.probs[b].append(q_rows)

    def of(self, b: int) -> tuple[list[int], list[torch.Tensor], list[float]]:
        return self.ids[b], self.probs[b], self.entropies[b]


def _samples(item: DraftItem) -> bool:
    """Sampled drafts come from q; one-hot drafts (and greedy requests) are the argmax."""
    return item.send_probs and item.sampling.temperature > 0


class ThreadedDrafter(LocalDrafter):
    """A drafter that drafts in a background thread, on its own CUDA stream (or its own GPU).

    In-process PEARL: `submit` returns at once, the verifier's forward runs on the caller's
    thread meanwhile, and the two overlap on the device (docs/design.md §4). Vanilla SD gains nothing
    from it (its verify waits for the draft), so a step that does not overlap drafts inline, on
    the caller's thread. On CPU it is correct but the GIL limits overlap.
    """

    def __init__(self, engine: Engine, adaedl: AdaEDLConfig | None = None, fused: bool = True,
                 acceptance: dict[bool, AcceptanceTable] | None = None) -> None:
        super().__init__(engine, adaedl, fused, acceptance)
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tandem-drafter")
        cuda = engine.device.type == "cuda"
        self._stream = torch.cuda.Stream(device=engine.device) if cuda else None

    def submit(self, items: list[DraftItem], overlap: bool = False) -> ThreadedDraftFuture | DraftFuture:
        if not overlap or all(it.max_len == 0 for it in items):  # nothing to run beside the verify
            return super().submit(items)
        consumer = torch.cuda.current_stream() if self._stream is not None else None
        return ThreadedDraftFuture(self._pool.submit(self._draft, items), consumer)

    def _draft(self, items: list[DraftItem]) -> tuple[list[DraftChunk], float]:
        start = time.perf_counter()
        with torch.cuda.stream(self._stream) if self._stream is not None else nullcontext():
            chunks = self.propose(items)
        if self._stream is not None:
            self._stream.synchronize()  # the chunks' q tensors are complete before anyone reads them
        return chunks, time.perf_counter() - start

    def close(self) -> None:
        self._pool.shutdown(wait=True)


class ThreadedDraftFuture:
    """result() waits for the drafting thread; `seconds` is its compute time."""

    concurrent = True  # the caller verifies while the thread drafts

    def __init__(self, future: Future, consumer_stream) -> None:
        self._future = future
        self._consumer = consumer_stream
        self.seconds = 0.0

    def result(self) -> list[DraftChunk]:
        chunks, self.seconds = self._future.result()
        for c in chunks:  # the caller's stream uses (and may free) tensors made on the drafter's
            if c.probs is not None and self._consumer is not None and c.probs.device == self._consumer.device:
                c.probs.record_stream(self._consumer)
        return chunks
