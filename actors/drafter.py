"""The drafter: proposes chunks with the small model; AdaEDL decides where each chunk ends.

Two methods, as transformers' candidate generators have: `propose` and `update` (fold the
verifier's outcome into each request's AdaEDL state). The drafter never decides output tokens.
"""
from __future__ import annotations

import time

import torch

from actors.adaedl import AdaEDLConfig, AdaEDLState
from actors.engine import Engine
from actors.messages import DraftChunk, DraftItem, DraftRound
from kernels.sampling import entropy, logits_to_probs, sample, sampling_tensors


class Drafter:
    def __init__(self, engine: Engine, adaedl: AdaEDLConfig | None = None) -> None:
        self.engine = engine
        self.adaedl_config = adaedl or AdaEDLConfig()
        self._adaedl: dict[str, AdaEDLState] = {}
        self._generators: dict[str, torch.Generator] = {}

    @property
    def max_context(self) -> int:
        return self.engine.max_context

    @property
    def free_slots(self) -> int:
        return self.engine.free_slots

    def start(self, rid: str, seed: int, slot: int | None = None) -> int:
        """Per-request state: a KV slot, a seeded generator (independent of the verifier's), AdaEDL."""
        slot = self.engine.allocate() if slot is None else self.engine.allocate_slot(slot)
        g = torch.Generator(device=self.engine.device)
        g.manual_seed((seed * 0x9E3779B1 + 1) % (2**63))
        self._generators[rid] = g
        self._adaedl[rid] = AdaEDLState(self.adaedl_config)
        return slot

    def finish(self, rid: str, slot: int) -> None:
        self.engine.release(slot)
        self._generators.pop(rid, None)
        self._adaedl.pop(rid, None)

    def submit(self, items: list[DraftItem]) -> "DraftFuture":
        """Start drafting; in-process the work is done here, a remote drafter returns at once."""
        start = time.perf_counter()
        chunks = self.propose(items)
        return DraftFuture(chunks, time.perf_counter() - start)

    def lam(self, rid: str) -> float:
        return self._adaedl[rid].lam

    def update(self, rounds: list[DraftRound]) -> None:
        for r in rounds:
            if r.rid in self._adaedl:
                self._adaedl[r.rid].update(r.n_drafted, r.n_accepted, r.max_len)

    @torch.inference_mode()
    def propose(self, items: list[DraftItem]) -> list[DraftChunk]:
        """Draft up to item.max_len tokens per request, all requests in one batch per position."""
        seqs = [list(it.seq) for it in items]
        ids: list[list[int]] = [[] for _ in items]
        probs: list[list[torch.Tensor]] = [[] for _ in items]
        active = [b for b, it in enumerate(items) if it.max_len > 0]
        while active:
            q, h = self._next_distributions([items[b] for b in active], [seqs[b] for b in active])
            still = []
            for row, b in enumerate(active):
                it = items[b]
                if ids[b] and it.adaedl and self._adaedl[it.rid].should_stop(float(h[row])):
                    continue  # AdaEDL: the next token is likely rejected; always keep >= 1
                # One-hot drafts are the argmax (exact for any draft token, best acceptance).
                token = sample(q[row], self._generators[it.rid]) if it.send_probs else int(q[row].argmax())
                ids[b].append(token)
                probs[b].append(q[row])
                seqs[b].append(token)
                if len(ids[b]) < it.max_len:
                    still.append(b)
            active = still
        return [self._chunk(it, ids[b], probs[b]) for b, it in enumerate(items)]

    def _next_distributions(self, items, seqs) -> tuple[torch.Tensor, torch.Tensor]:
        """q [n, V] after each sequence, and the entropy [n] AdaEDL looks at."""
        logits = self.engine.forward([it.slot for it in items], seqs, [1] * len(items))
        temp, top_k, top_p = sampling_tensors([it.sampling for it in items], logits.device)
        q = logits_to_probs(logits, temp, top_k, top_p)
        # Greedy requests: entropy of the plain softmax, not of the one-hot q (DESIGN §5).
        plain = torch.softmax(logits.float(), dim=-1)
        h = entropy(torch.where((temp <= 0).unsqueeze(-1), plain, q))
        return q, h

    def _chunk(self, item: DraftItem, ids: list[int], probs: list[torch.Tensor]) -> DraftChunk:
        q = torch.stack(probs) if (probs and item.send_probs) else None
        lam = self._adaedl[item.rid].lam if item.rid in self._adaedl else None
        return DraftChunk(ids, q, lam)


class DraftFuture:
    """The chunks of a submitted draft, available through result()."""

    def __init__(self, chunks: list[DraftChunk], seconds: float) -> None:
        self._chunks = chunks
        self.seconds = seconds  # drafting compute time

    def result(self) -> list[DraftChunk]:
        return self._chunks
