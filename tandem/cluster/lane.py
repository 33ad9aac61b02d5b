"""The Lane deployment: one Serve replica = one verifier group and its drafter (docs/design.md §2).

The replica is verifier rank 0 and runs the lane's step loop (tandem/actors/lane_core.py) in a
thread, or in a process of its own (lane.core_process). Requests do not come as Serve calls:
routers connect to the lane's request channel (tandem/cluster/channel.py), submit and cancel
over it, and get each step's tokens back as one frame per router, all in plain threads, so the
replica's event loop serves only Serve's own calls (channel, load, cancel, health). The
placement group Serve reserves for the replica holds the other verifier ranks and the drafter
(tandem/cluster/topology.py builds both the bundles and the workers).
"""
from __future__ import annotations

import asyncio
import logging
import uuid

import ray
import torch
from ray import serve

from tandem import logs
from tandem.cluster.channel import LaneServer
from tandem.cluster.config import AppConfig
from tandem.cluster.metrics import LaneMetrics
from tandem.cluster.topology import start_lane

logger = logging.getLogger(__name__)
DRAIN_S = 60.0  # how long a lane that Serve stops lets its requests finish (app.py gives Serve a bit more)


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
        self.metrics = LaneMetrics(self.lane_id, self.core.load)  # the Ray dashboard's tandem_* series
        self.server = LaneServer(self.core, ray.util.get_node_ip_address(), self.metrics.ended)
        self.core.flush = self.server.flush  # after each step: one frame per router
        logger.info("lane %s serving at %s: %d KV slots, %d queued at most", self.lane_id, self.server.address,
                    lane.max_batch_size, lane.max_queued)

    async def channel(self) -> dict:
        """Where routers send requests: this lane's id, address and secret."""
        return {"lane": self.lane_id, **self.server.info()}

    async def cancel(self, rid: str) -> bool:
        return self.core.cancel(rid)

    async def load(self) -> dict:
        return {"lane": self.lane_id, **self.core.load(), "streamed": dict(self.server.streamed),
                "torch_threads": torch.get_num_threads()}

    def record_autoscaling_stats(self) -> dict[str, float]:
        """Serve's autoscaling input (tandem.cluster.app wires the policy that reads it): the
        requests this lane holds, running and queued, since none arrive as Serve calls."""
        load = self.core.load()
        return {"held_requests": float(load["running"] + load["queued"])}

    async def topology(self) -> dict:
        """Node and pid of this replica (verifier rank 0) and of each worker (ranks 1..T-1, then the
        drafters), by rank."""
        import os

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
        self.server.streamed = {"frames": 0, "tokens": 0}

    def check_health(self) -> None:
        if self.core.error is not None:
            raise RuntimeError(f"lane {self.lane_id} step loop failed: {self.core.error!r}")

    def __del__(self) -> None:
        """Serve's graceful shutdown (a redeploy, a downscale): requests do not come as Serve
        calls, so Serve cannot drain them; the lane refuses new ones (routers send them to
        another lane) and lets the running ones finish, up to DRAIN_S, before it stops."""
        server, core = getattr(self, "server", None), getattr(self, "core", None)
        if server is not None and core is not None and core.error is None and server.held():
            logger.info("lane %s shutting down: letting %d requests finish", self.lane_id, server.held())
            left = server.drain(DRAIN_S)
            if left:
                logger.warning("lane %s: %d requests still running after %s s are cut off", self.lane_id, left, DRAIN_S)
        for name, stop in (("metrics", "stop"), ("server", "close"), ("core", "stop")):
            obj = getattr(self, name, None)
            if obj is not None:
                getattr(obj, stop)()


LaneDeployment = serve.deployment(Lane, name="Lane")
