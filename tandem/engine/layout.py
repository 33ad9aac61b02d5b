"""How a ragged batch is laid out for one padded forward: its shape bucket and its host tensor.

Shared by the eager forward (tandem/engine/llama.py), the CUDA graphs that replay bucketed shapes
(tandem/engine/graphs.py) and the multi-step draft program (tandem/engine/draft_steps.py).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Shape:
    """A forward's batch size, query length and attention span (keys 0..span-1)."""

    batch: int
    query: int
    span: int

    @staticmethod
    def of(starts: list[int], tokens: list[list[int]]) -> Shape:
        return Shape(len(tokens), max(len(t) for t in tokens), max(s + len(t) for s, t in zip(starts, tokens)))


@dataclass
class HostBatch:
    """A ragged batch padded to a shape, as one int64 host tensor (one copy to the device)."""

    shape: Shape
    data: torch.Tensor  # [3·B·Q + B + R]: ids, positions, write positions, slots, logit rows
    num_rows: int

    @staticmethod
    def build(slots, starts, tokens, num_logits, shape: Shape, scratch: tuple[int, int]) -> HostBatch:
        """Pad to shape (extra requests go to the scratch slot); rows = last num_logits[b] of each."""
        bsz, q = shape.batch, shape.query
        scratch_slot, scratch_col = scratch
        ids = [0] * (bsz * q)
        positions = [0] * (bsz * q)
        writes = [scratch_col] * (bsz * q)
        slot_ids = list(slots) + [scratch_slot] * (bsz - len(slots))
        rows = []
        for b, (start, t, n) in enumerate(zip(starts, tokens, num_logits)):
            base = b * q
            ids[base : base + len(t)] = t
            positions[base : base + q] = range(start, start + q)
            writes[base : base + len(t)] = range(start, start + len(t))
            rows.extend(range(base + len(t) - n, base + len(t)))
        data = torch.tensor(ids + positions + writes + slot_ids + rows, dtype=torch.long)
        return HostBatch(shape, data, len(rows))

    def split(self, data: torch.Tensor):
        """(ids [B, Q], positions [B, Q], write positions [B, Q], slots [B], rows [R]) views of data."""
        bsz, q = self.shape.batch, self.shape.query
        n = bsz * q
        ids, positions, writes, slot_ids, rows = data.split([n, n, n, bsz, self.num_rows])
        return ids.view(bsz, q), positions.view(bsz, q), writes.view(bsz, q), slot_ids, rows

    def to(self, device):
        return self.split(self.data.to(device, non_blocking=True))
