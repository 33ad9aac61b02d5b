"""Several drafters behind one drafter's interface (a lane with `lane.num_drafters` > 1).

Each request drafts on one drafter for its whole life: the one with the most free KV slots when
it starts. A step's draft requests are split by drafter and submitted to all of them before
any result is read, so drafters in their own processes (on their own GPUs) draft at the same
time, each on its share of the batch; the chunks come back in the batch's order. What the
verifier judged (`update`) goes to the drafter that drafted it.
"""
from __future__ import annotations

from tandem.spec.messages import DraftChunk, DraftItem, DraftRound


class DrafterPool:
    def __init__(self, drafters: list) -> None:
        assert drafters, "a pool needs at least one drafter"
        self.drafters = drafters
        self.max_context = min(d.max_context for d in drafters)
        self._of: dict[str, int] = {}  # request id -> index of its drafter

    @property
    def free_slots(self) -> int:
        return sum(d.free_slots for d in self.drafters)

    def start(self, rid: str, seed: int) -> int:
        i = max(range(len(self.drafters)), key=lambda j: self.drafters[j].free_slots)  # ties: the first
        self._of[rid] = i
        return self.drafters[i].start(rid, seed)

    def finish(self, rid: str, slot: int) -> None:
        self.drafters[self._of.pop(rid)].finish(rid, slot)

    def update(self, rounds: list[DraftRound], step_s: float | None = None) -> None:
        mine: dict[int, list[DraftRound]] = {}
        for r in rounds:
            if r.rid in self._of:  # a request that finished meanwhile has nobody to learn from it
                mine.setdefault(self._of[r.rid], []).append(r)
        for i, part in mine.items():
            self.drafters[i].update(part, step_s)

    def submit(self, items: list[DraftItem], overlap: bool = False) -> PoolFuture:
        rows: dict[int, list[int]] = {}
        for b, it in enumerate(items):
            rows.setdefault(self._of[it.rid], []).append(b)
        futures = [(rows[i], self.drafters[i].submit([items[b] for b in rows[i]], overlap)) for i in sorted(rows)]
        return PoolFuture(futures, len(items))

    def close(self) -> None:
        for d in self.drafters:
            d.close()

    def status(self) -> list[dict]:
        return [s for d in self.drafters for s in d.status()]


class PoolFuture:
    """Every drafter's chunks in the batch's order; `seconds` is the longest drafter's compute."""

    def __init__(self, futures: list[tuple[list[int], object]], n: int) -> None:
        self._futures, self._n = futures, n
        # Concurrent if any drafter drafts beside the verify (one whose requests have nothing to
        # draft returns a finished, non-concurrent future).
        self.concurrent = any(f.concurrent for _, f in futures)
        self.seconds = 0.0

    def result(self) -> list[DraftChunk]:
        chunks: list[DraftChunk | None] = [None] * self._n
        for rows, f in self._futures:
            for b, c in zip(rows, f.result()):
                chunks[b] = c
        self.seconds = max((f.seconds for _, f in self._futures), default=0.0)
        return chunks
