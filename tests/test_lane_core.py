"""The lane's step loop (tandem/actors/lane_core.py) and the lane's stream coalescing (tandem/cluster/lane.py),
without Ray: tokens delivered through the sinks equal offline AR, the loop reports where its time
goes, and emissions that piled up go out as one, in order."""
from __future__ import annotations

import asyncio
import threading
import time

import pytest
from conftest import make_pair, random_llama

from tandem.actors.drafter import LocalDrafter
from tandem.actors.lane_core import LaneCore
from tandem.actors.offline import generate
from tandem.params import SamplingParams, SpecParams
from tandem.spec.batch import SpecBatch
from tandem.spec.load_control import LoadControlConfig, LoadController
from tandem.spec.messages import Emission, RequestStats

PROMPTS = [[1, 2, 3, 4], [9, 8, 7]]


def serve_all(core: LaneCore, prompts, sampling: SamplingParams, spec: SpecParams) -> tuple[list[list[int]], dict]:
    """Submit every prompt to the running lane loop, wait for all to finish; their tokens (in
    prompt order) and the loop's load() at the end."""
    got = {str(i): [] for i in range(len(prompts))}
    done = threading.Event()
    finished = []

    def sink(e: Emission) -> None:
        got[e.rid] += e.token_ids
        if e.finish_reason:
            finished.append(e.rid)
            if len(finished) == len(prompts):
                done.set()

    try:
        for i, p in enumerate(prompts):
            core.submit(str(i), p, sampling, spec, sink)
        assert done.wait(timeout=60)
        load = core.load()
    finally:
        core.stop()
    return [got[str(i)] for i in range(len(prompts))], load


def test_sinks_get_offline_tokens_and_the_loop_times_its_gaps():
    pair = make_pair(random_llama(0), random_llama(0, layers=1))
    sampling = SamplingParams(max_tokens=12, ignore_eos=True)
    ref = [d.token_ids for d in generate(pair, PROMPTS, sampling, SpecParams("ar"))]
    core = LaneCore(SpecBatch(pair.target, LocalDrafter(pair.draft), set()), max_queued=4, max_batch_size=2)
    got, load = serve_all(core, PROMPTS, sampling, SpecParams("sd", 3, adaedl=False))
    timing = load["step_timing"]
    assert got == ref
    assert timing["steps"] > 0 and timing["gap_ms"] >= 0 and timing["total_ms"] > 0
    slowest = timing["slowest"]
    assert 0 <= slowest["step"] < timing["steps"] and slowest["batch"] >= 1
    assert slowest["total_ms"] >= timing["total_ms"] >= 0 and slowest["total_ms"] >= slowest["verify_ms"]


def test_the_loop_times_delivery_and_the_idle_spans_between_requests():
    pair = make_pair(random_llama(0), random_llama(0, layers=1))
    core = LaneCore(SpecBatch(pair.target, LocalDrafter(pair.draft), set()), max_queued=4, max_batch_size=2)
    sampling, spec = SamplingParams(max_tokens=4, ignore_eos=True), SpecParams("ar")
    try:
        for i in range(3):  # one request at a time, 50 ms apart: two idle spans (not the start's)
            done = threading.Event()
            core.submit(str(i), [1, 2, 3], sampling, spec, lambda e, done=done: e.finish_reason and done.set())
            assert done.wait(timeout=60)
            time.sleep(0.05)
        timing = core.load()["step_timing"]
    finally:
        core.stop()
    assert timing["steps"] == 12 and timing["deliver_ms"] > 0
    assert timing["idle_s"] >= 0.1 and timing["idle_ms_per_span"] >= 50


def test_a_lane_with_load_control_reports_it():
    pair = make_pair(random_llama(0), random_llama(0, layers=1))
    sampling = SamplingParams(max_tokens=16, ignore_eos=True)
    prompts = PROMPTS + [list(range(10, 40)), [42]]
    ref = [d.token_ids for d in generate(pair, prompts, sampling, SpecParams("ar"))]
    batch = SpecBatch(pair.target, LocalDrafter(pair.draft), set(), LoadController(LoadControlConfig(warmup_steps=2)))
    got, load = serve_all(LaneCore(batch, max_queued=8, max_batch_size=4), prompts, sampling, SpecParams("sd", 4, adaedl=False))
    assert got == ref
    state = load["load_control"]
    assert state["steps_observed"] > 2 and state["rest_ms"]["fixed"] is not None
    assert set(state) >= {"cap", "draft_position_ms", "lane_acceptance", "goodput_tokens_per_s", "measured_tokens_per_s"}


def test_inbox_merges_what_piled_up():
    pytest.importorskip("ray")
    from tandem.cluster.channel import Inbox, merge

    stats = RequestStats(steps=3)

    async def run():
        inbox = Inbox(asyncio.get_running_loop())
        for e in (Emission("r", [1, 2]), Emission("r", [3]), Emission("r", [4], "length", stats)):
            inbox.put(e)
        items = await inbox.take()
        assert not inbox.items
        return merge(items)

    merged = asyncio.run(run())
    assert merged.token_ids == [1, 2, 3, 4] and merged.finish_reason == "length" and merged.stats is stats
    single = Emission("r", [5])
    assert merge([single]) is single


def test_inbox_wakes_for_a_first_emission_and_a_finish_only():
    """A step thread feeding the inbox: generate() wakes for the first emission after it waited
    and for the finish (which ends a hold early), not for the tokens in between."""
    pytest.importorskip("ray")
    from tandem.cluster.channel import Inbox

    async def run():
        loop = asyncio.get_running_loop()
        inbox = Inbox(loop)
        wakes = []
        original = loop.call_soon_threadsafe

        def counted(cb, *args):
            wakes.append(cb)
            return original(cb, *args)

        loop.call_soon_threadsafe = counted

        def steps():  # the step thread: 20 steps 2 ms apart, then the finish
            for i in range(20):
                time.sleep(0.002)
                inbox.put(Emission("r", [i]))
            inbox.put(Emission("r", [20], "length"))

        t = threading.Thread(target=steps)
        t.start()
        first = await inbox.take()
        start = loop.time()
        rest = await inbox.take(hold_until=loop.time() + 10.0)  # held, until the finish ends the hold
        held = loop.time() - start
        t.join()
        return first, rest, held, len(wakes)

    first, rest, held, wakes = asyncio.run(run())
    tokens = [t for e in first + rest for t in e.token_ids]
    assert tokens == list(range(21)) and rest[-1].finish_reason == "length"
    assert held < 5.0  # the finish ended the 10 s hold
    assert wakes <= 3  # the first emission (maybe one more, racing the flag) and the finish, not 21


def test_inbox_take_never_returns_empty_after_a_stale_wake():
    """put() racing take()'s first wait leaves a wake behind; the next take() must not return it
    with nothing (the reviewer's interleaving, replayed on the loop)."""
    pytest.importorskip("ray")
    from tandem.cluster.channel import Inbox

    async def run():
        loop = asyncio.get_running_loop()
        inbox = Inbox(loop)
        inbox.waiting = True  # take() was about to wait when the step thread's put() came
        inbox.put(Emission("r", [1]))  # schedules a wake
        first = await inbox.take()  # finds the item without waiting; the wake is still pending
        loop.call_later(0.05, inbox.put, Emission("r", [2], "length"))
        second = await inbox.take()  # the stale wake fires first: it must wait on for the real one
        return first, second

    first, second = asyncio.run(run())
    assert [e.token_ids for e in first] == [[1]] and [e.token_ids for e in second] == [[2]]


def test_lane_metrics_gauge_each_interval_and_start_over_on_a_reset(monkeypatch):
    """publish() turns the lane's running step means into per-interval means; a new timing window
    (a benchmark's reset) starts the count over instead of mixing the two windows."""
    pytest.importorskip("ray")
    import ray.util.metrics as rm

    from tandem.cluster.metrics import PARTS, LaneMetrics

    class Recorded:  # stands in for Ray's metric objects, which need a running Ray
        def __init__(self, name, description="", tag_keys=(), boundaries=None):
            self.name, self.values = name, {}

        def set(self, value, tags):
            self.values[tuple(sorted(tags.items()))] = value

        inc = observe = set

    for cls in ("Counter", "Gauge", "Histogram"):
        monkeypatch.setattr(rm, cls, Recorded)
    metrics = LaneMetrics("L", load=lambda: {}, interval_s=3600)

    def load(started, steps, mean_total_ms, mean_batch):
        timing = {"started": started, "steps": steps, "mean_batch": mean_batch,
                  **{f"{p}_ms": (mean_total_ms if p == "total" else 0.0) for p in PARTS}}
        return {"running": 2, "queued": 1, "free_slots": 5, "step_timing": timing, "load_control": {"cap": None}}

    def total_ms():
        return metrics.step_ms.values[(("lane", "L"), ("part", "total"))]

    metrics.publish(load(1.0, 10, 2.0, 4.0))  # 10 steps of 2 ms
    assert total_ms() == pytest.approx(2.0) and metrics.batch.values[(("lane", "L"),)] == pytest.approx(4.0)
    metrics.publish(load(1.0, 20, 3.0, 4.0))  # 10 more: their mean is (20 * 3 - 10 * 2) / 10
    assert total_ms() == pytest.approx(4.0)
    metrics.publish(load(2.0, 30, 1.0, 2.0))  # a new window with more steps than the old: from its start
    assert total_ms() == pytest.approx(1.0) and metrics.batch.values[(("lane", "L"),)] == pytest.approx(2.0)
    assert metrics.cap.values[(("lane", "L"),)] == -1 and metrics.running.values[(("lane", "L"),)] == 2
    metrics.stop()


def test_freeze_heap_keeps_collections_off_the_start_up_heap():
    import gc
    import weakref

    from tandem.kernels.warmup import freeze_heap

    class Node:
        pass

    def cycle():  # unreachable once returned, found only by the cyclic collector
        a, b = Node(), Node()
        a.other, b.other = b, a
        return weakref.ref(a)

    gc.disable()  # no automatic collection between the steps below
    try:
        before = cycle()
        assert freeze_heap() > 0 and before() is None  # collected first, then the rest frozen
        held = Node()
        held.me = held
        held_ref = weakref.ref(held)
        assert freeze_heap() > 0
        del held
        after = cycle()
        gc.collect()
        assert held_ref() is not None  # frozen: later collections do not walk it
        assert after() is None  # made after the freeze: collected as usual
    finally:
        gc.unfreeze()
        gc.enable()
        gc.collect()
    assert held_ref() is None
