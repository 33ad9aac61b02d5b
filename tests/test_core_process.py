"""A lane's step loop in a process of its own (tandem/actors/core_process.py), without Ray: the
same tokens as the target alone, cancels and capacity answered on the replica's side at once, and
a core process that dies fails its streams with the lane instead of leaving them hanging."""
from __future__ import annotations

import os
import signal
import threading

import pytest
from conftest import TINY

from tandem.actors.core_process import CoreProcess
from tandem.actors.lane_roles import LaneAddresses, LaneSpec
from tandem.actors.offline import generate
from tandem.engine.pair import load_pair
from tandem.errors import LaneFull
from tandem.params import SamplingParams, SpecParams
from tandem.spec.messages import Emission

PROMPTS = ["def _parse_header(line):\n", "import os\n", "class Queue:\n    def put(self, item):\n"]


@pytest.fixture(scope="module")
def core():
    spec = LaneSpec(str(TINY / "target"), str(TINY / "draft"), max_slots=2, colocate_drafter=True)
    proc = CoreProcess(spec, LaneAddresses("tcp://127.0.0.1:1", ()), {0}, max_queued=1, max_batch_size=2,
                       request_timeout_s=60)
    yield proc
    proc.stop()


def collect(core: CoreProcess, jobs: dict) -> dict:
    got, done = {rid: [] for rid in jobs}, threading.Event()
    ends = {}

    def sink(e: Emission) -> None:
        got[e.rid] += e.token_ids
        if e.finish_reason:
            ends[e.rid] = e
            if len(ends) == len(jobs):
                done.set()

    for rid, (prompt, sampling, spec) in jobs.items():
        core.submit(rid, prompt, sampling, spec, sink)
    assert done.wait(timeout=120)
    return {rid: (got[rid], ends[rid]) for rid in jobs}


def test_the_core_process_serves_the_targets_tokens(core):
    pair = load_pair(TINY / "target", TINY / "draft", max_slots=2)
    prompts = [pair.tokenizer.encode(p, add_special_tokens=False) for p in PROMPTS]
    sampling = SamplingParams(max_tokens=16, ignore_eos=True)
    want = [d.token_ids for d in generate(pair, prompts, sampling, SpecParams("ar"))]
    modes = [SpecParams("sd", 4, adaedl=False), SpecParams("pearl", 4), SpecParams("auto", 8)]
    out = collect(core, {str(i): (p, sampling, m) for i, (p, m) in enumerate(zip(prompts, modes))})
    assert [out[str(i)][0] for i in range(3)] == want
    assert all(e.finish_reason == "length" for _, e in out.values())
    assert core.load()["healthy"] and core.load()["running"] == 0


def test_capacity_and_cancel_are_answered_at_once(core):
    long = SamplingParams(max_tokens=900, ignore_eos=True)
    ends = {}
    for rid in ("a", "b", "c"):  # two running, one queued: the lane's limit
        core.submit(rid, [5, 6, 7], long, SpecParams("ar"), lambda e, r=rid: ends.__setitem__(r, e) if e.finish_reason else None)
    with pytest.raises(LaneFull, match="max_batch_size 2"):
        core.submit("d", [5, 6, 7], long, SpecParams("ar"), lambda e: None)
    assert core.cancel("zzz") is False
    assert all(core.cancel(rid) for rid in ("a", "b", "c"))
    threading.Event().wait(2.0)
    assert {r: e.finish_reason for r, e in ends.items()} == {"a": "cancelled", "b": "cancelled", "c": "cancelled"}


def test_a_dead_core_process_fails_its_streams_with_the_lane():
    spec = LaneSpec(str(TINY / "target"), str(TINY / "draft"), max_slots=2, colocate_drafter=True)
    proc = CoreProcess(spec, LaneAddresses("tcp://127.0.0.1:1", ()), {0}, max_queued=1, max_batch_size=2,
                       request_timeout_s=60)
    ended, done = [], threading.Event()

    def sink(e: Emission) -> None:
        if e.finish_reason:
            ended.append(e)
            done.set()

    proc.submit("x", [5, 6, 7], SamplingParams(max_tokens=900, ignore_eos=True), SpecParams("ar"), sink)
    os.kill(proc.proc.pid, signal.SIGKILL)
    assert done.wait(timeout=30)
    assert ended[0].finish_reason == "error" and ended[0].lane_failed
    assert not proc.load()["healthy"]
