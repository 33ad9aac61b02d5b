"""A lane's processes without Ray: verifier TP over gloo and drafters in their own processes.

The verifier ranks (rank 0 = leader) join one gloo world and each drafter meets the leader in a
group of its own, exactly as the cluster's lane actors do; the leader's greedy output must equal
the single-process result. A colocated drafter has no process of its own: the leader drafts (TP 1:
one process in all). With two drafters each request drafts in one of them
(tandem/actors/drafter_pool.py). A drafter killed mid-run is replaced and nothing is lost.
"""
from __future__ import annotations

import socket

import pytest
import torch.multiprocessing as mp
from conftest import TINY

from tandem.actors.lane_roles import (
    LaneAddresses,
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


def _addresses(spec: LaneSpec) -> LaneAddresses:
    return LaneAddresses(f"tcp://127.0.0.1:{_free_port()}", tuple(f"127.0.0.1:{_free_port()}" for _ in spec.drafter_ranks))


def _role(rank: int, spec: LaneSpec, addresses: LaneAddresses, prompts, results) -> None:
    if rank in spec.drafter_ranks:
        return run_drafter(spec, addresses.drafters[rank - spec.tp])
    if rank > 0:
        return run_follower(spec, rank, addresses)
    batch = run_leader(spec, addresses, stop_ids={0})
    sampling = SamplingParams(max_tokens=24, ignore_eos=True)
    out = [run_batch(batch, prompts, sampling, s) for s in SPECS] + [run_batch(batch, prompts, *SAMPLED)]
    results.put([[d.token_ids for d in done] for done in out])
    results.put(batch.free_slots)
    batch.close()
    leave()


def run_lane(tp: int, prompts, colocate: bool = False, drafters: int = 1, exact: bool = False) -> tuple[list, int]:
    spec = LaneSpec(str(TINY / "target"), str(TINY / "draft"), tp=tp, max_slots=4, colocate_drafter=colocate,
                    num_drafters=drafters, exact=exact)
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    addresses = _addresses(spec)
    procs = [ctx.Process(target=_role, args=(r, spec, addresses, prompts, results)) for r in range(spec.processes)]
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


@pytest.mark.parametrize("tp,colocate,drafters,exact", [
    (1, False, 1, False), (2, False, 1, False), (1, True, 1, False), (2, True, 1, False), (1, False, 2, False),
    (2, False, 2, False), (2, True, 1, True)])  # exact: the ranks' partial sums added in rank order
def test_remote_drafter_and_tensor_parallel_match_single_process(tp, colocate, drafters, exact, reference):
    prompts, ar, sampled = reference
    outputs, free_slots = run_lane(tp, prompts, colocate, drafters, exact)
    for spec, out in zip(SPECS, outputs):
        assert out == [d.token_ids for d in ar], (tp, colocate, drafters, spec)
    if tp == 1 and drafters == 1 and not exact:  # the same computation in the same order: seeded sampling gives the same tokens
        assert outputs[-1] == sampled
    assert all(len(o) == 24 for o in outputs[-1])
    assert free_slots == 4  # every request released its slots on both sides


def _echo(rank: int, address: str, messages) -> None:
    from tandem.actors.remote_drafter import connect

    channel = connect(address, leader=rank == 0)
    for m in messages:  # rank 0 sends, rank 1 echoes back what it got
        if rank == 0:
            channel.send(m)
            got = channel.recv()
            assert type(got) is type(m) and repr(got) == repr(m), (got, m)
        else:
            channel.send(channel.recv())


def test_channel_carries_small_and_large_messages():
    import torch

    messages = [("propose", ([1, 2, 3], [], None)), list(range(4096 - 8)),  # larger than the buffer
                {"q": torch.arange(20000, dtype=torch.float32).view(2, -1)}, "", ("stop", ())]
    ctx = mp.get_context("spawn")
    address = f"127.0.0.1:{_free_port()}"
    procs = [ctx.Process(target=_echo, args=(r, address, messages)) for r in range(2)]
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



MIXED = [SpecParams("sd", 4, adaedl=False), SpecParams("pearl", 4, adaedl=True), SpecParams("ar")]


def _leader_losing_its_drafter(spec: LaneSpec, addresses: LaneAddresses, prompts, victim, results) -> None:
    """Run the prompts (SD, PEARL and AR side by side), kill the drafter at step 3, finish them;
    then serve again until the replacement drafter is up, and once more with it."""
    import os
    import time

    ctx, spawned = mp.get_context("spawn"), []

    def respawn(i: int, address: str) -> None:
        p = ctx.Process(target=run_drafter, args=(spec, address))
        p.start()
        spawned.append(p)

    batch = run_leader(spec, addresses, stop_ids={0}, respawn=respawn)
    sampling = SamplingParams(max_tokens=40, ignore_eos=True)
    for i, (p, s) in enumerate(zip(prompts, MIXED)):
        batch.add(str(i), p, sampling, s)
    tokens, steps, ended = {str(i): [] for i in range(len(prompts))}, 0, []
    while batch.requests:
        for e in batch.step():
            tokens[e.rid] += e.token_ids
            if e.finish_reason:
                ended.append(e.finish_reason)
        steps += 1
        if steps == 3:
            os.kill(victim, 9)
    lost = batch.drafter.status()[0]
    deadline = time.monotonic() + 120
    while not batch.drafter.status()[0]["up"] and time.monotonic() < deadline:
        run_batch(batch, prompts[:1], SamplingParams(max_tokens=4, ignore_eos=True), MIXED[0])
        time.sleep(0.2)
    again = run_batch(batch, prompts, sampling, MIXED[0])
    results.put(([tokens[str(i)] for i in range(len(prompts))], ended, lost, batch.drafter.status()[0],
                 [d.token_ids for d in again], sum(d.stats.drafted for d in again)))
    batch.close()
    for p in spawned:
        p.join(timeout=30)


def test_a_lost_drafter_is_replaced_and_no_request_fails(reference):
    prompts, _, _ = reference
    pair = load_pair(TINY / "target", TINY / "draft", max_slots=4)
    ar = [d.token_ids for d in generate(pair, prompts, SamplingParams(max_tokens=40, ignore_eos=True), SpecParams("ar"))]
    spec = LaneSpec(str(TINY / "target"), str(TINY / "draft"), max_slots=4)
    addresses = _addresses(spec)
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    drafter = ctx.Process(target=run_drafter, args=(spec, addresses.drafters[0]))
    drafter.start()
    leader = ctx.Process(target=_leader_losing_its_drafter, args=(spec, addresses, prompts, drafter.pid, results))
    leader.start()
    first, ended, lost, back, again, drafted = results.get(timeout=240)
    leader.join(timeout=60)
    drafter.join(timeout=10)
    assert first == ar and ended == ["length"] * 3  # greedy output as if nothing happened, no request failed
    assert lost == {"kind": "remote", "up": False, "lost": 1}
    assert back == {"kind": "remote", "up": True, "lost": 1}  # a new drafter process took over
    assert again == ar and drafted > 0  # and speculation resumed on it
    assert leader.exitcode == 0
