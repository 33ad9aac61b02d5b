"""Ray actors for a lane's other processes: verifier TP ranks 1..T-1 and the drafter.

Each actor's one long call (`run`) joins the lane's torch.distributed world and serves the
leader until it says stop; per-step traffic never goes through Ray (docs/design.md §2). Ray places the
actors in the lane's placement-group bundles, so a drafter can sit on a small GPU of another
node while the verifier ranks share a node with large GPUs.
"""
from __future__ import annotations

import logging
import socket

import ray
from ray.util.placement_group import get_current_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from tandem import logs
from tandem.actors.lane_roles import LaneSpec, run_drafter, run_follower

logger = logging.getLogger(__name__)


@ray.remote(max_concurrency=2)  # run() blocks for the lane's life; node_id() must still answer
class LaneWorker:
    """One non-leader process of a lane (a verifier shard or the drafter)."""

    def run(self, spec: LaneSpec, rank: int, init_method: str) -> None:
        logs.to_stderr()
        role = "drafter" if rank in spec.drafter_ranks else "verifier shard"
        logger.info("lane rank %d (%s) joining %s", rank, role, init_method)
        try:
            if rank in spec.drafter_ranks:
                run_drafter(spec, rank, init_method)
            else:
                run_follower(spec, rank, init_method)
        except BaseException:
            logger.exception("lane rank %d (%s) failed", rank, role)
            raise
        logger.info("lane rank %d (%s) released", rank, role)

    def node_id(self) -> str:
        return ray.get_runtime_context().get_node_id()


def rendezvous_address() -> str:
    """tcp://<this node's IP>:<a free port> for the lane's process group."""
    ip = ray.util.get_node_ip_address()
    with socket.socket() as s:
        s.bind(("", 0))
        return f"tcp://{ip}:{s.getsockname()[1]}"


def start_workers(spec: LaneSpec, bundles: list[dict], init_method: str) -> tuple[list, list]:
    """Start ranks 1..world-1 (verifier shards, then drafters) in the bundles of the same index;
    return (actors, their run() refs)."""
    pg = get_current_placement_group()
    actors, runs = [], []
    for rank in range(1, spec.world):
        res = dict(bundles[rank])
        opts = {"num_cpus": res.pop("CPU", 0), "num_gpus": res.pop("GPU", 0), "resources": res}
        if pg is not None:
            opts["scheduling_strategy"] = PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=rank)
        actor = LaneWorker.options(**opts).remote()
        actors.append(actor)
        runs.append(actor.run.remote(spec, rank, init_method))
    return actors, runs
