"""The Lane deployment: one Serve replica = one verifier group and its drafter (docs/design.md §2).

The replica is verifier rank 0 and runs the lane's step loop (tandem/actors/lane_core.py) in a
thread, or in a process of its own (lane.core_process). A request arrives as a Serve call to
`generate`, which answers once when the lane has taken the request and ends when the request
has; its tokens go to the router over the token channel (tandem/cluster/channel.py), one frame
per step for all of that router's requests, so the step loop's interpreter streams nothing.
The placement group Serve reserves for the replica holds the other verifier ranks and the
drafter (tandem/cluster/topology.py builds both the bundles and the workers).
"""
from __future__ import annotations

import asyncio
import logging
import uuid
from typing import AsyncIterator, Callable

import torch
from ray import serve

from tandem import logs
from tandem.cluster.channel import ChannelBroken, Senders
from tandem.cluster.config import AppConfig
from tandem.cluster.metrics import LaneMetrics
from tandem.cluster.topology import start_lane
from tandem.params import SamplingParams, SpecParams

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
        self.senders = Senders(self.lane_id)
        self.core.flush = self.senders.flush  # after each step: one frame per router
        self.metrics = LaneMetrics(self.lane_id, self.core.load)  # the Ray dashboard's tandem_* series
        self.callers = CallerWatch(self.core.cancel)
        logger.info("lane %s serving: %d KV slots, %d queued at most", self.lane_id, lane.max_batch_size, lane.max_queued)

    async def generate(self, rid: str, prompt: list[int], sampling: dict, spec: dict, reply_to: dict,
                       caller: str = "") -> AsyncIterator[dict]:
        """Take a request: yield {"lane": id} once it is queued (bad input and a full lane raise
        before), then end when it has ({"failed": reason} first if its tokens could not be sent). Its tokens go to `reply_to` ({"address", "secret"}: the
        router's token channel). caller: the Router replica's actor id; if that process dies,
        the request is cancelled. Cancelling this call cancels the request."""
        spec = SpecParams(**spec)
        sender = await self.senders.get(reply_to)
        ticket = sender.open(rid, asyncio.get_running_loop())
        submitted, finished = False, None
        try:
            self.core.submit(rid, prompt, SamplingParams(**sampling), spec, ticket.put)
            submitted = True
            self.callers.watch(caller, rid)
            yield {"lane": self.lane_id}
            try:
                finished = await ticket.done
            except ChannelBroken as e:  # said as an item, not raised: a call that fails toward a
                yield {"failed": str(e)}  # dead router costs Serve ~1 s each, one after another
                return
            if finished.error is not None:
                logger.error("lane %s: request %s ended with an error: %s", self.lane_id, rid, finished.error)
        finally:
            sender.forget(ticket)
            self.callers.forget(caller, rid)
            for gap in ticket.gaps:
                self.metrics.streamed(spec.mode, gap)
            if finished is not None:
                self.metrics.request_finished(spec.mode, finished.finish_reason, finished.stats)
            elif submitted:  # the caller went away (disconnect, Cancel) or the channel failed: free the slot now
                logger.info("lane %s: request %s ended by its caller", self.lane_id, rid)
                self.core.cancel(rid)
                self.metrics.request_finished(spec.mode, "cancelled", None)

    async def cancel(self, rid: str) -> bool:
        return self.core.cancel(rid)

    async def load(self) -> dict:
        return {"lane": self.lane_id, **self.core.load(), "streamed": dict(self.senders.streamed),
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
        self.senders.streamed = {"frames": 0, "tokens": 0}

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
        senders = getattr(self, "senders", None)
        if senders is not None:
            senders.close()


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


LaneDeployment = serve.deployment(Lane, name="Lane")
