"""The model engine interface the step logic drives, and its KV bookkeeping.

An engine holds a KV cache slot per request. The step logic never manages cache lengths by
hand: it passes each request's full token sequence, and the engine feeds only what its slot
has not seen yet, after rolling the slot back to the longest prefix it shares with the new
sequence. Rejected drafts are therefore rolled back by simply not being in the next sequence.

Implementations (tandem/engine/llama.py for Llama-family checkpoints with a batched slot cache,
tandem/engine/hf_engine.py for any other transformers causal LM) only implement `_forward` and
`_truncate`; a CUDA-graph or tensor-parallel engine slots in the same way.
"""
from __future__ import annotations

import math
from abc import ABC, abstractmethod

import torch

from tandem.errors import TandemError

PREFILL_APART = 16  # tokens a row may feed beside others before its prefill runs apart (_prefill_apart)
# A forward's fixed cost in fed tokens' worth: the weights are read once per forward whatever it
# feeds (a 1B target on an H200: ~0.5 ms, what ~100 tokens of its compute take).
FORWARD_TOKENS = 128


class Engine(ABC):
    """A causal LM with per-request KV slots."""

    vocab_size: int
    max_context: int  # longest sequence a slot can hold
    device: torch.device
    # Drafts a whole window in one device program (tandem/engine/draft_steps.py); else a drafter
    # feeds one token per forward.
    drafts_windows: bool = False
    # Prompts per prefill forward where that forward replays a graph (tandem/engine/graphs.py's
    # PREFILL_BATCH); None: every prompt of a step in one forward.
    prefill_group: int | None = None

    def __init__(self, max_slots: int) -> None:
        self.max_slots = max_slots
        self._fed: dict[int, list[int]] = {}  # slot -> tokens whose KV the slot holds
        self._free = list(range(max_slots - 1, -1, -1))

    # -- slots -------------------------------------------------------------------------------
    def allocate(self) -> int:
        if not self._free:
            raise TandemError(f"all {self.max_slots} KV slots are in use")
        return self.allocate_slot(self._free[-1])

    def allocate_slot(self, slot: int) -> int:
        """Take a given free slot (a remote peer mirrors the owner's choice)."""
        assert slot in self._free, f"slot {slot} is not free"
        self._free.remove(slot)
        self._fed[slot] = []
        return slot

    def release(self, slot: int) -> None:
        assert slot in self._fed, f"slot {slot} is not allocated"
        del self._fed[slot]
        self._truncate(slot, 0)
        self._free.append(slot)

    @property
    def free_slots(self) -> int:
        return len(self._free)

    def cached_length(self, slot: int) -> int:
        return len(self._fed[slot])

    def close(self) -> None:
        """Release what the engine holds beyond its memory (TPLeader: the other ranks)."""

    # -- forward -----------------------------------------------------------------------------
    def forward(
        self, slots: list[int], seqs: list[list[int]], num_logits: list[int]
    ) -> torch.Tensor:  # [sum(num_logits), V] float, request b's rows are contiguous
        """Logits predicting the token after each of the last num_logits[b] tokens of seqs[b]."""
        starts = [self.feed(slot, seq, n) for slot, seq, n in zip(slots, seqs, num_logits)]
        new_tokens = [seq[start:] for seq, start in zip(seqs, starts)]
        try:
            self._prefill_apart(slots, starts, new_tokens, num_logits)
            return self._forward(slots, starts, new_tokens, num_logits)
        except BaseException:
            self.forget(slots)
            raise

    def _prefill_apart(self, slots, starts, new_tokens, num_logits) -> None:
        """A batch is padded to its longest row: a prompt of 200 tokens joining 63 requests that
        verify a few tokens each would make the step 64 x 200 rows (on one H200, 50 ms against
        the step's 3-10). Where some rows, not all, feed more than PREFILL_APART tokens before
        their logits, those tokens are fed first in forwards of the long rows alone; where every
        row is long, likewise when that costs less than one forward of them all. The long rows
        are grouped by `_prefill_plan` (similar lengths together, at most `prefill_group` a
        forward). starts and new_tokens are updated in place to what the batch's own forward
        then feeds."""
        long = [b for b, (t, n) in enumerate(zip(new_tokens, num_logits)) if len(t) - n > PREFILL_APART]
        if not long:
            return
        cut = {b: len(new_tokens[b]) - num_logits[b] for b in long}
        reach = {b: starts[b] + cut[b] for b in long}
        groups, cost = self._prefill_plan(long, cut, reach)
        # All long and at most a group: apart plus a forward of the last tokens, or all as one
        # (more than a group always goes apart: one forward of 128 long prompts would hold 128 x
        # their length in activations at once).
        if len(long) == len(slots) and len(long) <= (self.prefill_group or len(long)):
            span = max(s + len(t) for s, t in zip(starts, new_tokens))
            whole = self.prefill_cost(len(slots), max(map(len, new_tokens)), span, sum(num_logits))
            rest = self.prefill_cost(len(slots), max(num_logits), span, sum(num_logits))
            if whole <= cost + rest:
                return
        for part in groups:
            self._forward([slots[b] for b in part], [starts[b] for b in part],
                          [new_tokens[b][: cut[b]] for b in part], [1] * len(part))
        for b, c in cut.items():
            starts[b] += c
            new_tokens[b] = new_tokens[b][c:]

    def forward_rows(self, batch: int, query: int) -> int:
        """Rows a forward of `batch` requests of at most `query` new tokens each computes: the
        batch padded to a rectangle (tandem/engine/layout.py), where a request's shorter draft
        saves none of them; the load controller prices a verify by them. (HFEngine runs each
        request apart: for it an upper bound.)"""
        return batch * query

    def _prefill_plan(self, rows: list[int], lengths: dict[int, int], reach: dict[int, int]) -> tuple[list[list[int]], float]:
        """The rows' prefills grouped into forwards at the least total `prefill_cost`: each forward
        pads its rows to the longest (and, graphed, to a bucket), so rows of similar lengths go
        together. Sorted by length, the best grouping is a split into runs, found by dynamic
        programming over the split points (at most `prefill_group` rows a run). Returns the
        groups and their cost."""
        order = sorted(rows, key=lambda b: (lengths[b], reach[b]))
        size = self.prefill_group or len(order)
        best, cut_at = [0.0] + [math.inf] * len(order), [0] * (len(order) + 1)
        for i in range(1, len(order) + 1):
            for j in range(max(0, i - size), i):
                run = order[j:i]
                c = best[j] + self.prefill_cost(len(run), lengths[order[i - 1]], max(reach[b] for b in run), len(run))
                if c < best[i]:
                    best[i], cut_at[i] = c, j
        groups, i = [], len(order)
        while i:
            groups.append(order[cut_at[i] : i])
            i = cut_at[i]
        return groups[::-1], best[-1]

    def prefill_cost(self, rows: int, longest: int, span: int, logits: int) -> float:
        """What a forward of `rows` rows feeding at most `longest` tokens each (reaching position
        `span`, asking `logits` logits) costs, in fed tokens' worth: the padded rectangle plus
        FORWARD_TOKENS. An engine that pads further (graph buckets), costs more per forward
        (eager launches) or runs each row alone says so."""
        return FORWARD_TOKENS + rows * longest

    def forget(self, slots: list[int]) -> None:
        """The slots' KV is unknown (a forward failed part way): the next forward feeds each
        sequence from the start."""
        for slot in slots:
            if slot in self._fed:
                self._fed[slot] = []
                self._truncate(slot, 0)

    def feed(self, slot: int, seq: list[int], num_logits: int = 1) -> int:
        """Roll the slot back to what it shares with seq; return where seq's unfed tokens start.

        At least num_logits tokens are fed (their logits are asked for), even if the slot has
        their KV already. The slot is then recorded as holding all of seq.
        """
        keep = self.fed_start(slot, seq, num_logits)
        if keep < len(self._fed[slot]):
            self._truncate(slot, keep)
        self._fed[slot] = list(seq)
        return keep

    def fed_start(self, slot: int, seq: list[int], num_logits: int = 1) -> int:
        """Where `feed` would start feeding seq (changes nothing)."""
        assert 1 <= num_logits <= len(seq), f"num_logits {num_logits} for a sequence of {len(seq)}"
        if len(seq) > self.max_context:
            raise TandemError(f"sequence of {len(seq)} tokens exceeds the context of {self.max_context}")
        return min(_common_prefix(self._fed[slot], seq), len(seq) - num_logits)

    def record_fed(self, slot: int, seq: list[int]) -> None:
        """The slot's KV now holds seq (a caller that fed more than `feed` saw, e.g. drafted tokens)."""
        self._fed[slot] = list(seq)

    @abstractmethod
    def _forward(
        self, slots: list[int], starts: list[int], tokens: list[list[int]], num_logits: list[int]
    ) -> torch.Tensor:
        """Feed tokens[b] at positions starts[b].. into slot b; logits of the last num_logits[b]."""

    @abstractmethod
    def _truncate(self, slot: int, length: int) -> None:
        """Drop the slot's KV after `length` tokens."""


def _common_prefix(a: list[int], b: list[int]) -> int:
    """Length of the longest common prefix (fast path: a is a prefix of b)."""
    if len(a) <= len(b) and a == b[: len(a)]:
        return len(a)
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n
