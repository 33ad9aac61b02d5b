"""What a lane is made of: its placement-group bundles and the processes built inside them.

Bundle 0 holds the lane replica itself, which is verifier rank 0 and runs the step loop.
Bundles 1..T-1 hold the other verifier ranks, bundles T.. the drafters (docs/design.md §2); the
verifier ranks meet in one torch.distributed world, each drafter in a group of its own with the
leader (tandem/actors/lane_roles.py). A colocated drafter lives in bundle 0.
"""
from __future__ import annotations

from tandem.actors.core_process import CoreProcess
from tandem.actors.lane_core import LaneCore
from tandem.actors.lane_roles import LaneSpec, run_leader
from tandem.actors.workers import LaneWorkers
from tandem.cluster.config import AppConfig
from tandem.engine.pair import load_tokenizer
from tandem.spec.batch import SpecBatch


def lane_bundles(cfg: AppConfig) -> list[dict[str, float]]:
    """Resources of each bundle: T verifier ranks, then the drafters (none when colocated)."""
    lane = cfg.lane
    verifier = {"CPU": lane.verifier_cpus, **lane.verifier_resources}
    if lane.verifier_gpus:
        verifier["GPU"] = lane.verifier_gpus
    drafter = {"CPU": lane.drafter_cpus, **lane.drafter_resources}
    if lane.drafter_gpus:
        drafter["GPU"] = lane.drafter_gpus
    drafters = 0 if lane.colocate_drafter else lane.num_drafters
    return [dict(verifier) for _ in range(lane.tensor_parallel_size)] + [dict(drafter) for _ in range(drafters)]


def stop_ids(cfg: AppConfig) -> set[int]:
    eos = load_tokenizer(cfg.model.target).eos_token_id
    return set() if eos is None else {int(eos)}


def lane_spec(cfg: AppConfig) -> LaneSpec:
    m, lane, s = cfg.model, cfg.lane, cfg.speculation
    return LaneSpec(
        target=m.target, draft=m.draft, tp=lane.tensor_parallel_size, device=lane.device, dtype=m.dtype,
        engine=m.engine, max_slots=lane.max_batch_size, max_context=m.max_context,
        adaedl_lambda0=s.adaedl_lambda0, adaedl_stop=s.adaedl_stop, adaedl_cost_ratio=s.adaedl_cost_ratio,
        colocate_drafter=lane.colocate_drafter, num_drafters=lane.num_drafters,
        graphs_at_start=lane.cuda_graphs_at_start, max_draft=s.max_draft, load_control=s.load_control,
        drafter_own_device=lane.device == "cuda" and not lane.colocate_drafter and lane.drafter_gpus >= 1,
        exact=m.exact)


def build_lane_batch(cfg: AppConfig) -> tuple[SpecBatch, LaneWorkers]:
    """Start the lane's workers, join them as rank 0; the SpecBatch and the workers to keep."""
    spec = lane_spec(cfg)
    workers = LaneWorkers(spec, lane_bundles(cfg))
    workers.start()
    batch = run_leader(spec, workers.addresses, stop_ids(cfg), respawn=workers.respawn_drafter)
    return batch, workers


def start_lane(cfg: AppConfig):
    """The lane's workers and its step loop: a LaneCore in this process, or (lane.core_process) a
    CoreProcess, rank 0 in a process of its own (tandem/actors/core_process.py)."""
    lane = cfg.lane
    if not lane.core_process:
        batch, workers = build_lane_batch(cfg)
        return LaneCore(batch, lane.max_queued, lane.max_batch_size, cfg.request_timeout_s), workers
    spec = lane_spec(cfg)
    workers = LaneWorkers(spec, lane_bundles(cfg))
    workers.start()
    core = CoreProcess(spec, workers.addresses, stop_ids(cfg), lane.max_queued, lane.max_batch_size,
                       cfg.request_timeout_s, respawn=workers.respawn_drafter)
    return core, workers
