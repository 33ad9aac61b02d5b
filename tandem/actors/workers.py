"""Ray actors for a lane's other processes: verifier TP ranks 1..T-1 and the drafter.

Each actor's one long call (`run`) joins the lane's torch.distributed world and serves the
leader until it says stop; per-step traffic never goes through Ray (docs/design.md §2). Ray places the
actors in the lane's placement-group bundles, so a drafter can sit on a small GPU of another
node while the verifier ranks share a node with large GPUs.
"""
from __future__ import annotations

import logging
import os

import ray
from ray.util.placement_group import get_current_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from tandem import logs
from tandem.actors.lane_roles import (
    LaneAddresses,
    LaneSpec,
    free_address,
    run_drafter,
    run_follower,
)

logger = logging.getLogger(__name__)


@ray.remote(max_concurrency=2)  # a role's run() blocks for the lane's life; node_id() must still answer
class LaneWorker:
    """One non-leader process of a lane: a verifier shard or a drafter."""

    def run_follower(self, spec: LaneSpec, rank: int, addresses: LaneAddresses) -> None:
        self._run(f"rank {rank} (verifier shard)", run_follower, spec, rank, addresses)

    def run_drafter(self, spec: LaneSpec, rank: int, address: str) -> None:
        self._run(f"rank {rank} (drafter)", run_drafter, spec, address)

    def _run(self, role: str, fn, *args) -> None:
        logs.to_stderr()
        logger.info("lane %s starting", role)
        try:
            fn(*args)
        except BaseException:
            logger.exception("lane %s failed", role)
            raise
        logger.info("lane %s released", role)

    def node_id(self) -> str:
        return ray.get_runtime_context().get_node_id()

    def pid(self) -> int:
        return os.getpid()


class LaneWorkers:
    """A lane's other processes, as Ray actors in the lane's placement-group bundles: verifier
    ranks 1..T-1, then the drafters (rank T+i in bundle T+i). A lost drafter is replaced in its
    own bundle (`respawn_drafter`, called by the leader's ResilientDrafter)."""

    def __init__(self, spec: LaneSpec, bundles: list[dict]) -> None:
        self.spec, self.bundles = spec, bundles
        self.pg = get_current_placement_group()
        ip = ray.util.get_node_ip_address()  # the leader's node: it hosts every rendezvous
        self.addresses = LaneAddresses(f"tcp://{free_address(ip)}",
                                       tuple(free_address(ip) for _ in spec.drafter_ranks))
        self.actors: dict[int, ray.actor.ActorHandle] = {}
        self.runs: dict[int, ray.ObjectRef] = {}

    def start(self) -> None:
        for rank in range(1, self.spec.tp):
            self.runs[rank] = self._actor(rank).run_follower.remote(self.spec, rank, self.addresses)
        for i, rank in enumerate(self.spec.drafter_ranks):
            self.runs[rank] = self._actor(rank).run_drafter.remote(self.spec, rank, self.addresses.drafters[i])

    def respawn_drafter(self, i: int, address: str) -> None:
        """A new process for drafter i, meeting the leader at address (the old one is ended)."""
        rank = self.spec.drafter_ranks[i]
        old = self.actors.pop(rank, None)
        if old is not None:
            ray.kill(old, no_restart=True)  # dead already, or hung: its bundle is free again
        logger.info("starting a new drafter %d (rank %d) at %s", i, rank, address)
        self.runs[rank] = self._actor(rank).run_drafter.remote(self.spec, rank, address)

    def _actor(self, rank: int) -> ray.actor.ActorHandle:
        res = dict(self.bundles[rank])
        opts = {"num_cpus": res.pop("CPU", 0), "num_gpus": res.pop("GPU", 0), "resources": res}
        if self.pg is not None:
            opts["scheduling_strategy"] = PlacementGroupSchedulingStrategy(self.pg, placement_group_bundle_index=rank)
        self.actors[rank] = LaneWorker.options(**opts).remote()
        return self.actors[rank]
