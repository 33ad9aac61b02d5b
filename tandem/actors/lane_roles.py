"""The processes of one lane and how they meet (docs/design.md §2).

Global ranks: 0..T-1 are the verifier's tensor-parallel ranks (rank 0 is the leader, which runs
the step loop), ranks T..T+D-1 the D drafters (each request drafts on one of them,
tandem/actors/drafter_pool.py). All join one torch.distributed world (gloo on CPU, NCCL on GPUs); the
TP ranks also form a subgroup for their all-reduces, and each drafter a gloo pair with rank 0.
The same functions run in Ray actors (tandem/actors/workers.py) and in plain processes (tests).

A colocated drafter (`colocate_drafter`) has no rank: rank 0 loads the draft beside its shard
and drafts in-process, inline for SD and on a thread with its own CUDA stream while PEARL
verifies. That is the layout for a drafter sharing the verifier's GPU: no exchange per step.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from tandem.actors.drafter import LocalDrafter, ThreadedDrafter
from tandem.actors.drafter_pool import DrafterPool
from tandem.actors.remote_drafter import RemoteDrafter, serve_drafter
from tandem.engine.pair import load_engine, load_hf_model
from tandem.engine.tensor_parallel import TPLeader, follow, shard_llama
from tandem.kernels.warmup import freeze_heap, warm_kernels
from tandem.spec.adaedl import AdaEDLConfig
from tandem.spec.batch import SpecBatch
from tandem.spec.load_control import LoadController


@dataclass(frozen=True)
class LaneSpec:
    """Everything a lane process needs to build its part (picklable, sent to Ray actors)."""

    target: str
    draft: str
    tp: int = 1
    device: str = "cpu"
    dtype: str = "float32"
    engine: str = "auto"
    max_slots: int = 8
    max_context: int | None = None
    adaedl_lambda0: float = 0.5
    adaedl_stop: str = "cost"
    adaedl_cost_ratio: float | None = None
    colocate_drafter: bool = False
    num_drafters: int = 1  # drafter processes (colocated: none, the leader drafts)
    graphs_at_start: bool = False  # capture every CUDA graph before serving (GraphRunner.capture_at_start)
    max_draft: int = 8  # the longest window those graphs cover
    load_control: bool = False  # cap draft lengths by the lane's load (tandem/spec/load_control.py)

    @property
    def world(self) -> int:
        return self.tp + len(self.drafter_ranks)

    @property
    def draft_slots(self) -> int:
        """KV slots per drafter: the lane's slots shared out (a request drafts on one drafter)."""
        return -(-self.max_slots // max(1, len(self.drafter_ranks)))

    @property
    def drafter_ranks(self) -> range:
        return range(self.tp, self.tp + (0 if self.colocate_drafter else self.num_drafters))


def join(spec: LaneSpec, rank: int, init_method: str):
    """Join the lane's world; return (TP group or None for TP = 1, {drafter rank: its exchange
    group with rank 0}).

    The TP all-reduces use NCCL on GPUs. The drafter exchange carries pickled messages and uses
    gloo: it works wherever the drafter sits, also on a GPU it shares with verifier rank 0 (a
    fractional GPU), where NCCL refuses two ranks on one device. Every rank calls this.
    """
    backend = "nccl" if spec.device == "cuda" else "gloo"
    if spec.device == "cuda":
        torch.cuda.set_device(0)  # Ray exposes each worker's own GPU as device 0
    dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=spec.world)
    tp_group = dist.new_group(list(range(spec.tp)))  # collective: all ranks, members or not
    exchanges = {d: dist.new_group([0, d], backend="gloo") for d in spec.drafter_ranks}  # collective, in order
    return (tp_group if spec.tp > 1 else None), exchanges


def _kwargs(spec: LaneSpec) -> dict:
    return {"max_slots": spec.max_slots, "max_context": spec.max_context}


def _target_engine(spec: LaneSpec, rank: int, group):
    from tandem.engine.llama import LlamaEngine

    if spec.tp == 1:
        return load_engine(spec.target, spec.device, spec.dtype, spec.engine, spec.max_slots, spec.max_context)
    model = load_hf_model(spec.target, spec.device, spec.dtype)
    shard_llama(model, rank, spec.tp)
    return LlamaEngine(model, tp_group=group, **_kwargs(spec))


def _adaedl(spec: LaneSpec) -> AdaEDLConfig:
    return AdaEDLConfig(lambda0=spec.adaedl_lambda0, stop=spec.adaedl_stop, cost_ratio=spec.adaedl_cost_ratio)


def _controller(spec: LaneSpec) -> LoadController | None:
    return LoadController() if spec.load_control else None


def _draft_engine(spec: LaneSpec):
    engine = load_engine(spec.draft, spec.device, spec.dtype, spec.engine, spec.draft_slots, spec.max_context)
    _capture_graphs(spec, engine, draft=True)
    return engine


def _capture_graphs(spec: LaneSpec, engine, draft: bool) -> None:
    graphs = getattr(engine, "graphs", None)  # native engine on CUDA at TP 1 only
    if spec.graphs_at_start and graphs is not None and graphs.capture:
        graphs.capture_at_start(spec.max_draft, draft)


def run_leader(spec: LaneSpec, init_method: str, stop_ids: set[int]) -> SpecBatch:
    """Rank 0: the sharded target behind a TPLeader; each drafter behind a RemoteDrafter (a
    DrafterPool of them for several), or the drafter in this process when colocated."""
    group, exchanges = join(spec, 0, init_method)
    engine = _target_engine(spec, 0, group)
    warm_kernels(engine.vocab_size, engine.device)  # Triton compiles now, not in a request's step
    _capture_graphs(spec, engine, draft=False)
    target = TPLeader(engine, group, src=0) if group is not None else engine
    if spec.colocate_drafter:
        drafter = ThreadedDrafter(_draft_engine(spec), _adaedl(spec))
    else:
        drafters = []
        for d, exchange in exchanges.items():
            box = [None]
            dist.recv_object_list(box, src=d, group=exchange)  # the drafter's context length
            drafters.append(RemoteDrafter(d, box[0], spec.draft_slots, exchange))
        drafter = drafters[0] if len(drafters) == 1 else DrafterPool(drafters)
    freeze_heap()  # no collection walks the start-up heap inside a step
    return SpecBatch(target, drafter, stop_ids, _controller(spec))


def run_follower(spec: LaneSpec, rank: int, init_method: str) -> None:
    """Ranks 1..T-1: hold a shard and replay the leader's engine calls until it stops."""
    group, _ = join(spec, rank, init_method)
    engine = _target_engine(spec, rank, group)
    freeze_heap()
    follow(engine, group, src=0)
    leave()


def run_drafter(spec: LaneSpec, rank: int, init_method: str) -> None:
    """Ranks T..T+D-1: the draft model; answers the leader's draft requests until it stops."""
    _, exchanges = join(spec, rank, init_method)
    engine = _draft_engine(spec)
    warm_kernels(engine.vocab_size, engine.device, rejection=False)
    dist.send_object_list([engine.max_context], dst=0, group=exchanges[rank])
    freeze_heap()
    serve_drafter(LocalDrafter(engine, _adaedl(spec)), leader=0, group=exchanges[rank])
    leave()


def leave() -> None:
    """Leave the lane's world once this rank's loop has ended: its communicators' threads are
    joined now, not torn down while the process exits (which can abort it)."""
    if dist.is_initialized():
        dist.destroy_process_group()
