"""The Lane deployment: one Serve replica = one verifier group and its drafter (docs/design.md §2).

The replica is verifier rank 0 and runs the lane's step loop (tandem/actors/lane_core.py) in a thread;
`generate` streams each request's verified tokens back to the router: the first at once, later
ones at most once per `lane.stream_batching_interval_ms` (as Ray Serve LLM does), because every
streamed item costs this interpreter, which the step loop shares, and the router time.
The placement group Serve reserves for the replica holds the other verifier ranks and the
drafter (tandem/cluster/topology.py builds both the bundles and the workers).
"""
from __future__ import annotations

import asyncio
import logging
import uuid
from collections import deque
from typing import AsyncIterator, Callable

import torch
from ray import serve

from tandem import logs
from tandem.cluster.config import AppConfig
from tandem.cluster.metrics import LaneMetrics
from tandem.cluster.topology import start_lane
from tandem.params import SamplingParams, SpecParams
from tandem.spec.messages import Emission

logger = logging.getLogger(__name__)


class Lane:
    def __init__(self, config: dict) -> None:
        logs.to_serve_log()
        self.config = AppConfig(**config)
        self.lane_id = uuid.uuid4().hex[:8]
        lane = self.config.lane
        logger.info("lane %s starting: %s on %s, tensor parallel %d, %s drafter(s)", self.lane_id,
                    self.config.model.target, lane.device, lane.tensor_parallel_size,
                    "colocated" if lane.colocate_drafter else lane.num_drafters)
        self.core, self.workers = start_lane(self.config)
        self.batching_interval_s = lane.stream_batching_interval_ms / 1000
        self.streamed = {"items": 0, "tokens": 0}  # since reset_timing(); tokens / items = batching
        self.metrics = LaneMetrics(self.lane_id, self.core.load)  # the Ray dashboard's tandem_* series
        self.callers = CallerWatch(self.core.cancel)
        logger.info("lane %s serving: %d KV slots, %d queued at most", self.lane_id, lane.max_batch_size, lane.max_queued)

    async def generate(self, rid: str, prompt: list[int], sampling: dict, spec: dict,
                       caller: str = "") -> AsyncIterator[dict]:
        """Stream {token_ids, finish_reason, stats} dicts; the last one has finish_reason set.
        caller: the Router replica's actor id; if that process dies, the request is cancelled."""
        loop = asyncio.get_running_loop()
        inbox = Inbox(loop)
        spec = SpecParams(**spec)
        self.core.submit(rid, prompt, SamplingParams(**sampling), spec, inbox.put)
        self.callers.watch(caller, rid)
        finished = False
        last_item = None  # loop time of this request's previous streamed item (inter-token latency)
        hold_until = 0.0  # loop time before which tokens wait for company; 0: the first goes out at once
        try:
            while not finished:
                e = _merge(await inbox.take(hold_until))
                now = loop.time()
                if last_item is not None:
                    self.metrics.streamed(spec.mode, now - last_item, len(e.token_ids))
                last_item = now if e.token_ids else last_item
                hold_until = now + self.batching_interval_s
                finished = e.finish_reason is not None
                self.streamed["items"] += 1
                self.streamed["tokens"] += len(e.token_ids)
                if finished:
                    self.metrics.request_finished(spec.mode, e.finish_reason, e.stats)
                if e.error is not None:
                    logger.error("lane %s: request %s ended with an error: %s", self.lane_id, rid, e.error)
                yield {"token_ids": e.token_ids, "finish_reason": e.finish_reason,
                       "error": e.error, "lane_failed": e.lane_failed,
                       "stats": e.stats.as_dict() if finished else None, "lane": self.lane_id}
        finally:
            self.callers.forget(caller, rid)
            if not finished:  # the caller went away (disconnect, Cancel): free the slot now
                logger.info("lane %s: request %s ended by its caller", self.lane_id, rid)
                self.core.cancel(rid)
                self.metrics.request_finished(spec.mode, "cancelled", None)

    async def cancel(self, rid: str) -> bool:
        return self.core.cancel(rid)

    async def load(self) -> dict:
        return {"lane": self.lane_id, **self.core.load(), "streamed": dict(self.streamed),
                "torch_threads": torch.get_num_threads()}

    async def topology(self) -> dict:
        """Node and pid of this replica (verifier rank 0) and of each worker (ranks 1..T-1, then the
        drafters), by rank."""
        import os

        import ray

        ranks = sorted(self.workers.actors)
        actors = [self.workers.actors[r] for r in ranks]
        nodes, pids = await asyncio.gather(asyncio.gather(*[a.node_id.remote() for a in actors]),
                                           asyncio.gather(*[a.pid.remote() for a in actors]))
        core = getattr(self.core, "proc", None)  # rank 0's own process (lane.core_process), if any
        return {"leader": ray.get_runtime_context().get_node_id(), "leader_pid": os.getpid(),
                "core_pid": core.pid if core is not None else os.getpid(),
                "workers": list(nodes), "pids": dict(zip(ranks, pids))}

    async def reset_timing(self) -> None:
        """Start a new step-timing window (benchmarks read it back through load())."""
        self.core.reset_timing()
        self.streamed = {"items": 0, "tokens": 0}

    def check_health(self) -> None:
        if self.core.error is not None:
            raise RuntimeError(f"lane {self.lane_id} step loop failed: {self.core.error!r}")

    def __del__(self) -> None:
        metrics = getattr(self, "metrics", None)
        if metrics is not None:
            metrics.stop()
        core = getattr(self, "core", None)
        if core is not None:
            core.stop()


class CallerWatch:
    """Cancels the requests of a Router replica whose process died.

    A dead caller's streaming calls reach the lane only after Ray notices the lost owner (tens of
    seconds), while the lane would go on generating for nobody. Every `period_s` while requests
    run, the lane asks the cluster (GCS) whether each calling router's actor is still alive
    (~0.3 ms a question), and cancels the requests of one that is not.
    """

    def __init__(self, cancel: Callable[[str], bool], period_s: float = 0.5) -> None:
        self.cancel, self.period_s = cancel, period_s
        self.rids: dict[str, set[str]] = {}  # caller actor id -> its running requests
        self._task: asyncio.Task | None = None

    def watch(self, caller: str, rid: str) -> None:
        if not caller:
            return
        self.rids.setdefault(caller, set()).add(rid)
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._run())

    def forget(self, caller: str, rid: str) -> None:
        rids = self.rids.get(caller)
        if rids is not None:
            rids.discard(rid)
            if not rids:
                del self.rids[caller]

    async def _run(self) -> None:
        while self.rids:
            await asyncio.sleep(self.period_s)
            for caller in list(self.rids):
                if not await asyncio.to_thread(_actor_alive, caller):
                    rids = self.rids.pop(caller, set())
                    logger.warning("router %s is gone: cancelling its %d requests", caller[:12], len(rids))
                    for rid in rids:
                        self.cancel(rid)


def _actor_alive(actor_id: str) -> bool:
    """Whether the cluster still has the actor alive; True when it cannot tell."""
    try:
        from ray._private.state import (
            state,  # the GCS's actor table (no public API without the dashboard)
        )

        info = state.actor_table(actor_id)
    except Exception:
        return True
    return not info or info.get("State") not in ("DEAD", "RESTARTING")


class Inbox:
    """One request's emissions, from the step thread to its generate() on the replica's event loop.

    The step thread appends and wakes the loop only when generate() waits for a first emission or
    when the request finishes, not at every step: each wake-up is Python work in this interpreter,
    which the step loop shares (an asyncio.Queue fed by call_soon_threadsafe woke the loop and the
    request's task once per step per stream). While generate() holds tokens to batch them, what
    the steps verify piles up here unseen until the hold ends; a finish ends a hold at once.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.items: deque[Emission] = deque()
        self.wake = asyncio.Event()
        self.waiting = False  # generate() sleeps until the next emission

    def put(self, e: Emission) -> None:  # the step thread's sink (thread-safe: deque append, one flag)
        self.items.append(e)
        if self.waiting or e.finish_reason is not None:
            self.waiting = False
            self.loop.call_soon_threadsafe(self.wake.set)

    async def take(self, hold_until: float = 0.0) -> list[Emission]:
        """The next emission, and every one that arrives behind it until `hold_until` (loop time);
        a finished request is never held."""
        while not self.items:  # a wake scheduled by an earlier put() can find nothing new: wait again
            self.wake.clear()
            self.waiting = True
            if not self.items:  # put() may have run before `waiting` was set
                await self.wake.wait()
            self.waiting = False
        delay = hold_until - self.loop.time()
        if delay > 0 and not self._finished():
            self.wake.clear()  # a wake scheduled before now runs after this: a finish is never missed
            if not self._finished():
                try:
                    await asyncio.wait_for(self.wake.wait(), delay)
                except asyncio.TimeoutError:
                    pass
        taken = []
        while self.items:
            taken.append(self.items.popleft())
        assert taken, "Inbox.take returned nothing"  # the loop above waits until there is something
        return taken

    def _finished(self) -> bool:
        return bool(self.items) and self.items[-1].finish_reason is not None


def _merge(items: list[Emission]) -> Emission:
    """Consecutive emissions of one request as one (the last one carries finish_reason and stats)."""
    last = items[-1]
    if len(items) == 1:
        return last
    return Emission(last.rid, [t for e in items for t in e.token_ids], last.finish_reason, last.stats,
                    last.error, last.lane_failed)


LaneDeployment = serve.deployment(Lane, name="Lane")
