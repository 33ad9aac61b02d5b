"""CUDA graphs for the native engine's decode and verify shapes (DESIGN §7).

At batch 1 a 1B-parameter target's step is about a millisecond of weight reads but a few
hundred kernel launches; replaying a captured graph removes the launch gaps. Shapes are
bucketed: batch size and query length (1 for decode, k+1 for verify) round up to the next
bucket, and the attention span up to the next power of two. Padding rows write to the
engine's scratch slot / column and are never read. A graph is captured the first time its
bucket is used (`warmup` captures ahead of time); shapes past the largest bucket (prefill of a
long prompt) run eagerly.

All of an engine's graphs share one memory pool; each keeps its own input and output tensors,
and the caller gathers its logit rows before the next replay.
"""
from __future__ import annotations

from contextlib import nullcontext

import torch

from actors.llama import HostBatch, Shape

BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)
QUERY_BUCKETS = (1, 2, 4, 8, 16, 32)
MIN_SPAN = 128


class _Graph:
    """One bucket's static inputs and outputs; `graph` is None off CUDA (replay runs eagerly)."""

    def __init__(self, graph, data: torch.Tensor, logits: torch.Tensor | None, rerun=None) -> None:
        self.graph, self.data, self.logits, self._rerun = graph, data, logits, rerun

    def replay(self) -> None:
        if self.graph is not None:
            self.graph.replay()
        else:
            self.logits = self._rerun()


class GraphRunner:
    def __init__(self, engine, max_batch: int) -> None:
        self.engine = engine
        self.batch_buckets = [b for b in BATCH_BUCKETS if b < max_batch] + [min(max_batch, BATCH_BUCKETS[-1])]
        self.query_buckets = QUERY_BUCKETS
        self.graphs: dict[Shape, _Graph] = {}
        self.capture = engine.device.type == "cuda"  # elsewhere the same padded path runs eagerly (tests)
        self.pool = torch.cuda.graph_pool_handle() if self.capture else None

    def bucket(self, shape: Shape) -> Shape | None:
        """The graph shape that covers this forward, or None (run it eagerly)."""
        batch = next((b for b in self.batch_buckets if b >= shape.batch), None)
        query = next((q for q in self.query_buckets if q >= shape.query), None)
        if batch is None or query is None:
            return None
        span = max(MIN_SPAN, 1 << (shape.span - 1).bit_length())
        return Shape(batch, query, min(span, self.engine.max_context))

    def run(self, bucket: Shape, batch: HostBatch) -> torch.Tensor:  # [rows, V]
        with torch.cuda.device(self.engine.device) if self.capture else nullcontext():
            g = self.graphs.get(bucket) or self._capture(bucket)
            n = batch.data.numel()
            g.data[:n].copy_(batch.data, non_blocking=True)
            g.replay()
            rows = g.data[n - batch.num_rows : n]
            return g.logits.index_select(0, rows)

    def warmup(self, batch_sizes=None, query_lens=None, spans=None) -> int:
        """Capture the graphs of these buckets now (default: every bucket); returns how many."""
        spans = spans or [s for s in (MIN_SPAN << i for i in range(16)) if s < self.engine.max_context]
        spans = list(spans) + [self.engine.max_context]
        for b in batch_sizes or self.batch_buckets:
            for q in query_lens or self.query_buckets:
                for s in spans:
                    bucket = self.bucket(Shape(b, q, s))
                    if bucket is not None and bucket not in self.graphs:
                        with torch.cuda.device(self.engine.device) if self.capture else nullcontext():
                            self._capture(bucket)
        return len(self.graphs)

    @torch.inference_mode()
    def _capture(self, bucket: Shape) -> _Graph:
        eng = self.engine
        bsz, q = bucket.batch, bucket.query
        scratch_slot, scratch_col = eng.scratch
        n = bsz * q
        # Static inputs: ids, positions, write positions, slots, then room for every row index.
        data = torch.zeros(3 * n + bsz + n, dtype=torch.long, device=eng.device)
        data[2 * n : 3 * n] = scratch_col
        data[3 * n : 3 * n + bsz] = scratch_slot
        ids, positions, writes, slots = data[:n].view(bsz, q), data[n : 2 * n].view(bsz, q), \
            data[2 * n : 3 * n].view(bsz, q), data[3 * n : 3 * n + bsz]
        if not self.capture:
            g = _Graph(None, data, None, lambda: eng.run(ids, positions, writes, slots, bucket.span))
            self.graphs[bucket] = g
            return g
        side = torch.cuda.Stream(device=eng.device)
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm up: allocator, cuBLAS handles, lazy kernels
            for _ in range(2):
                eng.run(ids, positions, writes, slots, bucket.span)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"):
            logits = eng.run(ids, positions, writes, slots, bucket.span)
        g = _Graph(graph, data, logits)
        self.graphs[bucket] = g
        return g
