"""What a lane is made of: its placement-group bundles and the engines built inside them.

Bundle 0 holds the lane replica itself, which is verifier rank 0. Bundles 1..T-1 hold the
other verifier ranks, bundle T the drafter (DESIGN §2). With TP = 1 and the drafter on the same
device as the verifier, everything runs in the replica's process.
"""
from __future__ import annotations

from actors.adaedl import AdaEDLConfig
from actors.batch import SpecBatch
from actors.drafter import Drafter
from actors.pair import load_engine, load_tokenizer
from cluster.config import AppConfig


def lane_bundles(cfg: AppConfig) -> list[dict[str, float]]:
    """Resources of each bundle: T verifier ranks, then the drafter."""
    lane = cfg.lane
    verifier = {"CPU": lane.verifier_cpus, **lane.verifier_resources}
    if lane.verifier_gpus:
        verifier["GPU"] = lane.verifier_gpus
    drafter = {"CPU": lane.drafter_cpus, **lane.drafter_resources}
    if lane.drafter_gpus:
        drafter["GPU"] = lane.drafter_gpus
    return [dict(verifier) for _ in range(lane.tensor_parallel_size)] + [drafter]


def stop_ids(cfg: AppConfig) -> set[int]:
    eos = load_tokenizer(cfg.model.target).eos_token_id
    return set() if eos is None else {int(eos)}


def build_lane_batch(cfg: AppConfig) -> tuple[SpecBatch, list]:
    """The lane's SpecBatch and the Ray workers it drives (kept alive by the caller)."""
    m, lane = cfg.model, cfg.lane
    kwargs = dict(device=lane.device, dtype=m.dtype, engine=m.engine, max_slots=lane.max_batch_size,
                  max_context=m.max_context)
    target = load_engine(m.target, **kwargs)
    drafter = Drafter(load_engine(m.draft, **kwargs), AdaEDLConfig(lambda0=cfg.speculation.adaedl_lambda0))
    return SpecBatch(target, drafter, stop_ids(cfg)), []
