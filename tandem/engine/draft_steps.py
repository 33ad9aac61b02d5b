"""A whole draft window in one device program (docs/design.md §5, §7).

Drafting token by token costs, per token, a forward, a softmax-entropy and a host sync while
Python decides whether to go on; on a GPU a small draft's step is mostly launches, and each
sync leaves the device idle. Here a window of `steps` tokens runs on the device with no sync:
the first forward feeds each request's unfed tokens (1..MAX_FIRST of them), then `steps - 1`
single-token forwards each feed the token just chosen. Greedy rows take the argmax; sampled
rows take the exponential race argmax_v q[v] / E[v] with E ~ Exp(1) drawn beforehand from the
request's own stream (tandem/kernels/streams.py), an exact sample from q (as tandem/kernels/rejection.py draws).

AdaEDL's stop rule reads only the entropies, so the drafter applies it afterwards on the host:
the tokens it keeps are exactly those its token-by-token loop (tandem/actors/drafter.py, the
reference) would draft. On CUDA the program is a CUDA graph per DraftShape (tandem/engine/graphs.py).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from tandem.engine.layout import HostBatch, Shape
from tandem.kernels.entropy import softmax_entropy
from tandem.kernels.streams import Stream, draw

MAX_FIRST = 4  # unfed tokens the first step takes; a longer backlog (a prompt) is prefilled first
# AdaEDL requests draft PIECE tokens per device program, their first piece LONG_PIECE where
# their drafts have been running longer than PIECE (one program, not two); the graphs captured
# at start cover windows up to LONG_PIECE for that reason.
PIECE, LONG_PIECE = 4, 8


@dataclass(frozen=True)
class DraftShape:
    """A multi-step draft's CUDA-graph bucket: the first forward's shape, the steps, whether rows sample."""

    first: Shape  # batch, first-step query length (the unfed tokens), attention span
    steps: int
    sampled: bool  # some row draws from q (noise in, q out); else argmax only


@dataclass
class DraftBatch:
    """The first forward of a draft, padded to a shape, as one int64 host tensor.

    Layout: HostBatch's ids, positions, writes [B·Q each], slots [B]; then last [B] (the row
    in B·Q of each request's last fed token), steps [B] (tokens it wants; 0 for padding) and
    sample [B] (1: draw from q, 0: argmax).
    """

    shape: Shape
    data: torch.Tensor

    @staticmethod
    def build(slots, starts, tokens, steps, sample, shape: Shape, scratch: tuple[int, int]) -> DraftBatch:
        first = HostBatch.build(slots, starts, tokens, [1] * len(slots), shape, scratch)  # real rows' last
        pad = shape.batch - len(slots)
        pad_rows = [b * shape.query for b in range(len(slots), shape.batch)]  # any valid row
        tail = pad_rows + list(steps) + [0] * pad + [int(s) for s in sample] + [0] * pad
        return DraftBatch(shape, torch.cat([first.data, torch.tensor(tail, dtype=torch.long)]))

    @staticmethod
    def splitter(shape: Shape):
        """data -> (ids [B, Q], positions [B, Q], writes [B, Q], slots, last, steps, sample [B])."""
        bsz, q = shape.batch, shape.query
        n = bsz * q

        def split(data: torch.Tensor):
            ids, positions, writes, slots, last, steps, sample = data.split([n, n, n, bsz, bsz, bsz, bsz])
            return ids.view(bsz, q), positions.view(bsz, q), writes.view(bsz, q), slots, last, steps, sample.bool()

        return split


def draft_program(
    eng, ids, positions, writes, slots, last, steps_per_row, sample,
    temperature: torch.Tensor,  # [B] float32, <= 0 = greedy
    noise: torch.Tensor | None,  # [B, steps, V] Exp(1) draws; None when no row samples
    steps: int, span: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """tokens [B, steps] int64, entropies [B, steps] float32 (AdaEDL's H of each token's
    distribution), q [B, steps, V] float32 (None without noise). All on the device, no sync.

    ids / positions / writes [B, Q], slots / last / steps_per_row / sample [B]: DraftBatch.
    Steps past a row's steps_per_row still run (one program for the batch) but write their KV
    to the scratch column; their tokens are never read.
    """
    scratch_col = eng.scratch[1]
    logits = eng.run(ids, positions, writes, slots, span, last)  # [B, V]
    pos = positions.flatten().index_select(0, last)  # [B]: position of each request's last token
    tokens, entropies, qs = [], [], []
    token = None
    for j in range(steps):
        if j:  # feed token j-1 at the next position; its logits give token j
            pos = pos + 1
            write = torch.where(steps_per_row > j, pos, scratch_col)
            logits = eng.run(token[:, None], pos[:, None], write[:, None], slots, span)
        q, h, top = softmax_entropy(logits, temperature)
        token = top
        if noise is not None:  # exponential race: argmax q / E is a sample from q
            token = torch.where(sample, (q / noise[:, j]).argmax(-1), top)
            qs.append(q)
        tokens.append(token)
        entropies.append(h)
    q_out = torch.stack(qs, 1) if noise is not None else None
    return torch.stack(tokens, 1), torch.stack(entropies, 1), q_out


def draft_window(
    eng, slots: list[int], seqs: list[list[int]], steps: list[int], temperature: list[float],
    sample: list[bool], streams: list[Stream], min_batch: int = 0,
) -> tuple[list[list[int]], list[list[float]], torch.Tensor | None]:
    """Draft steps[b] >= 1 tokens after seqs[b] for each request in one program.

    min_batch pads the batch to at least that many rows (padding drafts into the scratch slot):
    a drafter's later pieces, for the rows still drafting, keep the first piece's CUDA graph
    bucket instead of asking for a bucket of every subset size.

    Returns the tokens and their entropies (host lists, steps[b] each) and q [B, max steps, V]
    when some row samples (else None). The slots then hold seq + all but the last token.
    """
    try:
        return _draft_window(eng, slots, seqs, steps, temperature, sample, streams, min_batch)
    except BaseException:
        eng.forget(slots)  # what the slots hold is unknown: the next draft feeds from the start
        raise


def _draft_window(eng, slots, seqs, steps, temperature, sample, streams, min_batch):
    backlog = [b for b, (slot, seq) in enumerate(zip(slots, seqs)) if len(seq) - eng.fed_start(slot, seq) > MAX_FIRST]
    if backlog:  # a prompt: one prefill forward for all of it but the last token
        eng.forward([slots[b] for b in backlog], [seqs[b][:-1] for b in backlog], [1] * len(backlog))
    starts = [eng.feed(slot, seq) for slot, seq in zip(slots, seqs)]
    fresh = [seq[s:] for seq, s in zip(seqs, starts)]
    total = max(steps)
    span = max(s + len(t) + n - 1 for s, t, n in zip(starts, fresh, steps))
    rows = max(len(slots), min_batch) if eng.graphs is not None else len(slots)  # padding buys only a graph
    shape = Shape(rows, max(len(t) for t in fresh), span)
    bucket = eng.graphs.bucket(shape) if eng.graphs is not None else None
    batch = DraftBatch.build(slots, starts, fresh, steps, sample, bucket or shape, eng.scratch)
    temps = torch.zeros(batch.shape.batch)
    temps[: len(slots)] = torch.tensor(temperature, dtype=torch.float32)

    def fill_noise(noise: torch.Tensor) -> None:  # [B, steps, V]: each row from its own stream, in one launch
        rows, width = noise.shape[0], noise[0].numel()
        used = [steps[b] * eng.vocab_size if sample[b] else 0 for b in range(len(streams))]
        draw([*streams, *[None] * (rows - len(streams))], used + [0] * (rows - len(streams)), width, noise.device,
             exponential=True, out=noise.view(rows, width))

    if bucket is not None:
        key = DraftShape(bucket, total, any(sample))
        tokens, entropy, q = eng.graphs.draft(key, batch.data, temps, fill_noise)
    else:
        noise = None
        if any(sample):
            noise = torch.ones(batch.shape.batch, total, eng.vocab_size, device=eng.device)
            fill_noise(noise)
        args = DraftBatch.splitter(batch.shape)(batch.data.to(eng.device))
        tokens, entropy, q = draft_program(eng, *args, temps.to(eng.device), noise, total, shape.span)
    n = len(slots)
    q = q[:n].clone() if q is not None else None  # graph outputs are overwritten by the next replay
    token_rows, entropy_rows = tokens[:n].tolist(), entropy[:n].tolist()  # the one sync
    for slot, seq, row, k in zip(slots, seqs, token_rows, steps):
        eng.record_fed(slot, seq + row[: k - 1])
    return [row[:k] for row, k in zip(token_rows, steps)], [row[:k] for row, k in zip(entropy_rows, steps)], q
