"""A lane's processes without Ray: verifier TP over gloo and a drafter in its own process.

Three processes (TP rank 0 = leader, TP rank 1, drafter) join one gloo world, exactly as the
cluster's lane actors do; the leader's greedy output must equal the single-process result.
"""
from __future__ import annotations

import socket

import pytest
import torch.multiprocessing as mp

from actors.lane_roles import LaneSpec, run_drafter, run_follower, run_leader, stop_lane
from actors.messages import SamplingParams, SpecParams
from actors.offline import generate, run_batch
from actors.pair import load_pair
from conftest import TINY

PROMPTS = ["def _parse_header(line):\n", "import os\n", "class Queue:\n    def put(self, item):\n"]
SPECS = [SpecParams("ar"), SpecParams("sd", 4, adaedl=False), SpecParams("pearl", 4, adaedl=True)]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _role(rank: int, spec: LaneSpec, init: str, prompts, results) -> None:
    if rank == spec.drafter_rank:
        return run_drafter(spec, init)
    if rank > 0:
        return run_follower(spec, rank, init)
    batch = run_leader(spec, init, stop_ids={0})
    sampling = SamplingParams(max_tokens=24, ignore_eos=True)
    out = [run_batch(batch, prompts, sampling, s) for s in SPECS]
    results.put([[d.token_ids for d in done] for done in out])
    results.put(batch.free_slots)
    stop_lane(batch)


def run_lane(tp: int, prompts) -> tuple[list, int]:
    spec = LaneSpec(str(TINY / "target"), str(TINY / "draft"), tp=tp, max_slots=4)
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
    return prompts, generate(pair, prompts, sampling, SpecParams("ar"))


@pytest.mark.parametrize("tp", [1, 2])
def test_remote_drafter_and_tensor_parallel_match_single_process(tp, reference):
    prompts, ar = reference
    outputs, free_slots = run_lane(tp, prompts)
    for spec, out in zip(SPECS, outputs):
        assert out == [d.token_ids for d in ar], (tp, spec)
    assert free_slots == 4  # every request released its slots on both sides
