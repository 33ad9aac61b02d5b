"""CUDA graphs for the native engine's decode, verify and draft shapes (docs/design.md §7).

At batch 1 a 1B-parameter target's step is about a millisecond of weight reads but a few
hundred kernel launches; replaying a captured graph removes the launch gaps. Shapes are
bucketed: batch size and query length (1 for decode, k+1 for verify) round up to the next
bucket, and the attention span up to the next power of two. Padding rows write to the
engine's scratch slot / column and are never read. A graph is captured the first time its
bucket is used (`warmup` captures ahead of time). Prompts are graphed too: a forward of at most
PREFILL_BATCH requests rounds its query length up to a PREFILL_QUERY bucket (or the context, if
shorter). Eagerly, a 1B target's 24 layers cost ~14 ms of host time (launches, cuBLAS's
per-shape heuristics) for ~3 ms of device work (H200, 150-200 tokens:
benchmarks/prefill_probe.py), whatever the number of prompts; under continuous batching
requests join at almost every step, at 64 requests three or four at a time (a join step took
24 ms against 7 for the others with SD k=5 when only two were graphed). Larger shapes (more
prompts at once, longer prompts) run eagerly.

Two kinds of program are captured: a forward (`run`: logits of the rows asked for) and a
multi-step draft (`draft`: tandem/engine/draft_steps.py, a whole draft window in one replay).
All of an engine's graphs share one memory pool; each keeps its own input and output tensors,
and the caller copies what it needs out of the outputs before the next replay.

Two engines' graphs may replay at the same time (PEARL in one process: the draft on the
drafter's stream while the target verifies), so nothing they write may be shared. cuBLAS keys
its workspace by (handle, stream) and a graph bakes in the workspace of the stream it was
captured on: were both engines captured on one stream, their split-K GEMMs would write the same
workspace concurrently (seen on an H200: wrong target logits, outputs that left AR's). Each
runner therefore warms up and captures on a stream of its own. Captures themselves are
serialized process-wide: PyTorch cannot capture two graphs at once (its allocator and RNG
bookkeeping are global).
"""
from __future__ import annotations

import gc
import itertools
import logging
import threading
from contextlib import nullcontext
from typing import Callable

import torch

from tandem.engine.draft_steps import (
    LONG_PIECE,
    MAX_FIRST,
    DraftBatch,
    DraftShape,
    draft_program,
)
from tandem.engine.layout import HostBatch, Shape

BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)
QUERY_BUCKETS = (1, 2, 4, 8, 16, 32)
PREFILL_BATCH = 8  # prefill forwards of up to this many requests are graphed, in query buckets of:
PREFILL_QUERY = (64, 128, 192, 256, 384, 512)
PREFILL_ROWS = 72  # logits a prompt's graph computes (its static rows); a call asking more runs eagerly
MIN_SPAN = 128
log = logging.getLogger(__name__)
_CAPTURE_LOCK = threading.Lock()  # one capture at a time in the process (see the module docstring)


class _Graph:
    """One bucket's static inputs and outputs. Off CUDA `graph` is None and replay reruns fn.
    rows_inside: the graph computes only the logits of the rows its input lists (a prompt's
    graph: PREFILL_ROWS of them, not all B x Q), in order."""

    def __init__(self, graph, inputs: tuple, outputs, fn: Callable, rows_inside: bool = False) -> None:
        self.graph, self.inputs, self.outputs, self._fn = graph, inputs, outputs, fn
        self.rows_inside = rows_inside

    def replay(self):
        if self.graph is not None:
            self.graph.replay()
        else:
            self.outputs = self._fn(*self.inputs)
        return self.outputs


class GraphRunner:
    def __init__(self, engine, max_batch: int) -> None:
        self.engine = engine
        self.batch_buckets = [b for b in BATCH_BUCKETS if b < max_batch] + [min(max_batch, BATCH_BUCKETS[-1])]
        self.query_buckets = QUERY_BUCKETS
        self.graphs: dict[Shape | DraftShape, _Graph] = {}
        self._prompt_logits: torch.Tensor | None = None  # the prompt graphs' shared output
        self._warmed: set[tuple] = set()  # draft programs already run eagerly: (first shape, sampled, thread)
        self.capture = engine.device.type == "cuda"  # elsewhere the same padded path runs eagerly (tests)
        self.pool = torch.cuda.graph_pool_handle() if self.capture else None
        # This runner's own capture stream, hence its own cuBLAS workspace (module docstring).
        self.stream = torch.cuda.Stream(device=engine.device) if self.capture else None

    def bucket(self, shape: Shape, rows: int = 0) -> Shape | None:
        """The graph shape that covers this forward (asking for `rows` logits), or None (run it
        eagerly)."""
        batch = next((b for b in self.batch_buckets if b >= shape.batch), None)
        query = next((q for q in self.query_buckets if q >= shape.query), None)
        if query is None and shape.batch <= PREFILL_BATCH and rows <= PREFILL_ROWS:  # a prompt (module docstring)
            query = next((q for q in self.prompt_buckets if q >= shape.query), None)
        if batch is None or query is None:
            return None
        span = max(MIN_SPAN, 1 << (shape.span - 1).bit_length())
        return Shape(batch, query, min(span, self.engine.max_context))

    @property
    def prompt_buckets(self) -> list[int]:
        """A prompt forward's query buckets: PREFILL_QUERY below the context, then the context
        itself where it is shorter than the largest (a 300-token prompt in a 310-token context)."""
        limit = self.engine.max_context
        return [q for q in PREFILL_QUERY if q < limit] + ([limit] if limit <= PREFILL_QUERY[-1] else [])

    def _device(self):
        return torch.cuda.device(self.engine.device) if self.capture else nullcontext()

    def run(self, bucket: Shape, batch: HostBatch) -> torch.Tensor:  # [rows, V]
        with self._device():
            g = self.graphs.get(bucket) or self._capture_forward(bucket)
            n = batch.data.numel()
            data = g.inputs[0]
            data[:n].copy_(batch.data, non_blocking=True)
            logits = g.replay()
            if g.rows_inside:
                return logits[: batch.num_rows].clone()  # the next replay overwrites its output
            return logits.index_select(0, data[n - batch.num_rows : n])

    def draft(self, bucket: DraftShape, data: torch.Tensor, temperature: torch.Tensor, fill_noise):
        """Replay a multi-step draft: data (host int64, draft_steps.DraftBatch layout) and
        temperature [B] go into the static inputs, fill_noise(noise [B, steps, V]) writes the
        sampled rows' noise in place. Returns the graph's (tokens, entropy, q or None)."""
        with self._device():
            g = self.graphs.get(bucket) or self._capture_draft(bucket)
            static_data, static_temp, noise = g.inputs
            static_data[: data.numel()].copy_(data, non_blocking=True)
            static_temp.copy_(temperature, non_blocking=True)
            if noise is not None:
                fill_noise(noise)
            return g.replay()

    def warmup(self, batch_sizes=None, query_lens=None, spans=None) -> int:
        """Capture the forward graphs of these buckets now (default: every bucket); returns how many."""
        for s in self._spans(spans):
            for b in batch_sizes or self.batch_buckets:
                for q in query_lens or self.query_buckets:
                    bucket = self.bucket(Shape(b, q, s))
                    if bucket is not None and bucket.query <= bucket.span and bucket not in self.graphs:
                        with self._device():
                            self._capture_forward(bucket)
        return len(self.graphs)

    def warmup_drafts(self, batch_sizes, steps, first_lens=None, sampled=(False,), spans=None) -> int:
        """Capture multi-step draft graphs ahead of time; returns how many graphs there are now.
        first_lens: the first forward's query lengths (default: every bucket up to MAX_FIRST)."""
        first_lens = first_lens or [q for q in self.query_buckets if q <= MAX_FIRST]
        for s in self._spans(spans):
            for b in batch_sizes:
                for q in first_lens:
                    first = self.bucket(Shape(b, q, s))
                    for n in steps:
                        for smp in sampled:
                            key = DraftShape(first, n, smp) if first is not None else None
                            if key is not None and key not in self.graphs:
                                with self._device():
                                    self._capture_draft(key)
        return len(self.graphs)

    def capture_at_start(self, max_draft: int, draft: bool) -> int:
        """Every graph a lane can ask for up to windows of max_draft, captured now (as vLLM does at
        start-up) instead of inside the step that first needs it: forwards of every bucket
        (decode, verify, prompts) and, for a drafter, its multi-step windows of
        1..max(max_draft, LONG_PIECE) steps, greedy and sampled. Returns how many graphs the
        engine holds."""
        self.warmup()
        self.warmup(batch_sizes=[b for b in self.batch_buckets if b <= PREFILL_BATCH], query_lens=self.prompt_buckets)
        if draft:
            self.warmup_drafts(self.batch_buckets, list(range(1, max(max_draft, LONG_PIECE) + 1)), sampled=(False, True))
        return len(self.graphs)

    def _spans(self, spans) -> list[int]:
        spans = spans or [s for s in (MIN_SPAN << i for i in range(16)) if s < self.engine.max_context]
        return list(spans) + [self.engine.max_context]

    # -- capture -----------------------------------------------------------------------------
    def _capture_forward(self, bucket: Shape) -> _Graph:
        eng = self.engine
        prompt = bucket.query > self.query_buckets[-1]
        rows = PREFILL_ROWS if prompt else bucket.batch * bucket.query  # room for every row index
        data = _static_ints(bucket, eng.scratch, rows, eng.device)
        split = HostBatch(bucket, data, rows).split

        def forward(data):
            ids, positions, writes, slots, wanted = split(data)
            # a prompt's graph: the logits of the rows asked for only (B x Q x V would be
            # 512 x 128k floats for a Llama 3 vocabulary); decode / verify graphs: every row's
            logits = eng.run(ids, positions, writes, slots, bucket.span, wanted if prompt else None)
            return self._prompt_output(logits).copy_(logits) if prompt else logits

        return self._capture(bucket, (data,), forward, rows_inside=prompt)

    def _prompt_output(self, logits: torch.Tensor) -> torch.Tensor:
        """One output tensor for every prompt graph (made by the first one's warm-up, outside any
        capture): an engine replays one graph at a time and `run` copies the rows out, so ~50
        prompt graphs need not hold 50 outputs (72 x 128k floats each for a Llama 3 vocabulary)."""
        out = self._prompt_logits
        if out is None or out.shape != logits.shape or out.dtype != logits.dtype:
            out = self._prompt_logits = torch.empty_like(logits)
        return out

    def _capture_draft(self, key: DraftShape) -> _Graph:
        eng, first = self.engine, key.first
        data = _static_ints(first, eng.scratch, 3 * first.batch, eng.device)  # + last, steps, sample
        temperature = torch.zeros(first.batch, device=eng.device)
        noise = torch.ones(first.batch, key.steps, eng.vocab_size, device=eng.device) if key.sampled else None
        split = DraftBatch.splitter(first)

        def draft(data, temperature, noise):
            return draft_program(eng, *split(data), temperature, noise, key.steps, first.span)

        # A window of n >= 2 steps runs the kernels, shapes and allocations of the window of 2 (its
        # later steps repeat the second): once a window of two or more steps of this first shape
        # has been run eagerly, the others capture without warming up (at start a drafter
        # captures some 1300 windows, 176 s on an H200 for the bench pair, and two of the three
        # runs of each window were the eager warm-up). Per thread: PyTorch's cuBLAS handles and
        # workspaces are per thread and stream, and an in-process PEARL drafter captures on its own
        # thread; making them inside a capture invalidates it (seen on an H200).
        family = (first, key.sampled, _thread_number())
        warm = family not in self._warmed
        if key.steps >= 2:
            self._warmed.add(family)
        return self._capture(key, (data, temperature, noise), draft, warm=warm)

    @torch.inference_mode()
    def _capture(self, key, inputs: tuple, fn: Callable, rows_inside: bool = False, warm: bool = True) -> _Graph:
        if not self.capture:
            g = _Graph(None, inputs, None, fn, rows_inside)
            self.graphs[key] = g
            return g
        with _CAPTURE_LOCK:
            self.stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(self.stream):  # warm up: allocator, cuBLAS workspace, lazy kernels
                for _ in range(2 if warm else 0):
                    fn(*inputs)
            graph, caller = torch.cuda.CUDAGraph(), torch.cuda.current_stream()
            try:
                with torch.cuda.graph(graph, pool=self.pool, stream=self.stream, capture_error_mode="thread_local"):
                    outputs = fn(*inputs)
            except Exception as e:  # noqa: BLE001 - a failed capture costs this shape its graph, not the lane
                graph, outputs = None, None
                torch.cuda.set_stream(caller)  # the graph context raised before it restored the stream
                self._abandon_capture(key, e)
            caller.wait_stream(self.stream)
        g = _Graph(graph, inputs, outputs, fn, rows_inside)
        self.graphs[key] = g
        # A capture leaves thousands of long-lived Python objects behind; out of the collector's
        # reach (as the start-up heap is: tandem/kernels/warmup.py), a later full collection does
        # not walk them inside some request's step (a 375 ms step on an H200 after lazy captures).
        gc.freeze()
        return g

    def _abandon_capture(self, key, error: Exception) -> None:
        """After a capture failed (something in it was not capturable): this shape runs eagerly
        from now on. PyTorch ends a failed stream capture but leaves its allocator routing new
        blocks to the graph's pool (cudaStreamEndCapture raises before endAllocateToPool), and
        every later capture would fail with 'already recording to mempool_id': the routing is
        ended here, and later captures use a pool of their own."""
        log.warning("capturing %s failed (%s); that shape runs eagerly", key, str(error).splitlines()[0])
        try:
            torch._C._cuda_endAllocateToPool(torch.cuda.current_device(), self.pool)
        except RuntimeError:
            pass  # the routing had ended
        self.pool = torch.cuda.graph_pool_handle()


_THREAD = threading.local()
_NUMBERS = itertools.count()


def _thread_number() -> int:
    """This thread's number, unique for the process's life (threading.get_ident() is reused
    once a thread ends: a new drafter thread would pass for one that had warmed up)."""
    if not hasattr(_THREAD, "number"):
        _THREAD.number = next(_NUMBERS)
    return _THREAD.number


def _static_ints(shape: Shape, scratch: tuple[int, int], extra: int, device) -> torch.Tensor:
    """A static int64 input laid out as HostBatch.data (ids, positions, writes, slots) + extra,
    with padding already pointing at the scratch slot and column."""
    scratch_slot, scratch_col = scratch
    n = shape.batch * shape.query
    data = torch.zeros(3 * n + shape.batch + extra, dtype=torch.long)
    data[2 * n : 3 * n] = scratch_col
    data[3 * n : 3 * n + shape.batch] = scratch_slot
    return data.to(device)
