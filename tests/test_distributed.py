"""A lane's processes without Ray: verifier TP over gloo and a drafter in its own process.

Three processes (TP rank 0 = leader, TP rank 1, drafter) join one gloo world, exactly as the
cluster's lane actors do; the leader's greedy output must equal the single-process result.
A colocated drafter has no process of its own: the leader drafts (TP 1: one process in all).
With two drafters each request drafts in one of them (tandem/actors/drafter_pool.py).
"""
from __future__ import annotations

import socket

import pytest
import torch.multiprocessing as mp
from conftest import TINY

from tandem.actors.lane_roles import (
    LaneSpec,
    leave,
    run_drafter,
    run_follower,
    run_leader,
)
from tandem.actors.offline import generate, run_batch
from tandem.engine.pair import load_pair
from tandem.params import SamplingParams, SpecParams

PROMPTS = ["def _parse_header(line):\n", "import os\n", "class Queue:\n    def put(self, item):\n"]
SPECS = [SpecParams("ar"), SpecParams("sd", 4, adaedl=False), SpecParams("pearl", 4, adaedl=True)]
# Seeded sampling with q rows sent: each chunk's message is larger than the channel's buffer.
# (AdaEDL off: its cost rule drafts by measured timing, so seeded tokens would differ run to run.)
SAMPLED = (SamplingParams(max_tokens=24, temperature=1.0, seed=7, ignore_eos=True), SpecParams("sd", 4, adaedl=False))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _role(rank: int, spec: LaneSpec, init: str, prompts, results) -> None:
    if rank in spec.drafter_ranks:
        return run_drafter(spec, rank, init)
    if rank > 0:
        return run_follower(spec, rank, init)
    batch = run_leader(spec, init, stop_ids={0})
    sampling = SamplingParams(max_tokens=24, ignore_eos=True)
    out = [run_batch(batch, prompts, sampling, s) for s in SPECS] + [run_batch(batch, prompts, *SAMPLED)]
    results.put([[d.token_ids for d in done] for done in out])
    results.put(batch.free_slots)
    batch.close()
    leave()


def run_lane(tp: int, prompts, colocate: bool = False, drafters: int = 1) -> tuple[list, int]:
    spec = LaneSpec(str(TINY / "target"), str(TINY / "draft"), tp=tp, max_slots=4, colocate_drafter=colocate,
                    num_drafters=drafters)
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    init = f"tcp://127.0.0.1:{_free_port()}"
    procs = [ctx.Process(target=_role, args=(r, spec, init, prompts, results)) for r in range(spec.world)]
    for p in procs:
        p.start()
    outputs, free = results.get(timeout=240), results.get(timeout=60)
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    return outputs, free


@pytest.fixture(scope="module")
def reference():
    pair = load_pair(TINY / "target", TINY / "draft", max_slots=4)
    prompts = [pair.tokenizer.encode(p, add_special_tokens=False) for p in PROMPTS]
    sampling = SamplingParams(max_tokens=24, ignore_eos=True)
    sampled = [d.token_ids for d in generate(pair, prompts, *SAMPLED)]
    return prompts, generate(pair, prompts, sampling, SpecParams("ar")), sampled


@pytest.mark.parametrize("tp,colocate,drafters", [(1, False, 1), (2, False, 1), (1, True, 1), (2, True, 1),
                                                  (1, False, 2), (2, False, 2)])
def test_remote_drafter_and_tensor_parallel_match_single_process(tp, colocate, drafters, reference):
    prompts, ar, sampled = reference
    outputs, free_slots = run_lane(tp, prompts, colocate, drafters)
    for spec, out in zip(SPECS, outputs):
        assert out == [d.token_ids for d in ar], (tp, colocate, drafters, spec)
    if tp == 1 and drafters == 1:  # the same computation in the same order: seeded sampling gives the same tokens
        assert outputs[-1] == sampled
    assert all(len(o) == 24 for o in outputs[-1])
    assert free_slots == 4  # every request released its slots on both sides


def _echo(rank: int, init: str, messages) -> None:
    import torch.distributed as dist

    from tandem.actors.remote_drafter import Channel

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    channel = Channel(1 - rank)
    for m in messages:  # rank 0 sends, rank 1 echoes back what it got
        if rank == 0:
            channel.send(m)
            got = channel.recv()
            assert type(got) is type(m) and repr(got) == repr(m), (got, m)
        else:
            channel.send(channel.recv())
    dist.destroy_process_group()


def test_channel_carries_small_and_large_messages():
    import torch

    messages = [("propose", ([1, 2, 3], [], None)), list(range(4096 - 8)),  # larger than the buffer
                {"q": torch.arange(20000, dtype=torch.float32).view(2, -1)}, "", ("stop", ())]
    ctx = mp.get_context("spawn")
    init = f"tcp://127.0.0.1:{_free_port()}"
    procs = [ctx.Process(target=_echo, args=(r, init, messages)) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
        assert p.exitcode == 0


def test_drafter_pool_splits_requests_and_frees_every_slot(reference):
    """In one process: two drafters behind a DrafterPool give the target's greedy tokens, each
    request drafting on one of them, and every slot comes back."""
    from tandem.actors.drafter import LocalDrafter
    from tandem.actors.drafter_pool import DrafterPool
    from tandem.engine.pair import load_engine
    from tandem.spec.batch import SpecBatch

    prompts, ar, _ = reference
    target = load_engine(TINY / "target", "cpu", "float32", "auto", 4, None)
    pool = DrafterPool([LocalDrafter(load_engine(TINY / "draft", "cpu", "float32", "auto", 2, None)) for _ in range(2)])
    batch = SpecBatch(target, pool, stop_ids={0})
    sampling = SamplingParams(max_tokens=24, ignore_eos=True)
    for spec in SPECS[1:]:
        assert [d.token_ids for d in run_batch(batch, prompts, sampling, spec)] == [d.token_ids for d in ar], spec
    assert pool.free_slots == 4 and not pool._of
    assert batch.free_slots == 4
    batch.add("a", prompts[0], sampling, SPECS[1])
    batch.add("b", prompts[1], sampling, SPECS[1])
    assert [d.free_slots for d in pool.drafters] == [1, 1]  # one request on each drafter


def test_pool_future_puts_chunks_back_in_batch_order():
    """Each drafter's chunks land at its requests' rows; the slowest drafter's time counts, and
    the step overlapped if any drafter drafted beside the verify."""
    from tandem.actors.drafter_pool import PoolFuture
    from tandem.spec.drafting import DraftFuture
    from tandem.spec.messages import DraftChunk

    class Beside(DraftFuture):
        concurrent = True

    chunks = [DraftChunk([b], None) for b in range(4)]
    future = PoolFuture([([1, 3], Beside([chunks[1], chunks[3]], 0.002)),
                         ([0, 2], DraftFuture([chunks[0], chunks[2]], 0.0))], 4)
    assert future.concurrent
    assert future.result() == chunks and future.seconds == 0.002
    assert not PoolFuture([([0], DraftFuture([chunks[0]], 0.0))], 1).concurrent

