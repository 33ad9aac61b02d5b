"""The processes of one lane and how they meet (docs/design.md §2).

Ranks 0..T-1 are the verifier's tensor-parallel ranks (rank 0 is the leader, which runs the step
loop); they join one torch.distributed world (NCCL on GPUs, gloo on CPU) for their all-reduces.
The D drafters (ranks T..T+D-1 in the placement group's bundles; each request drafts on one of
them, tandem/actors/drafter_pool.py) are not in that world: each meets the leader in a two-rank
gloo group of its own (tandem/actors/remote_drafter.py), so a drafter that dies is replaced by a
new process while the lane goes on (tandem/actors/resilient.py). The same functions run in Ray
actors (tandem/actors/workers.py) and in plain processes (tests).

A colocated drafter (`colocate_drafter`) has no rank: rank 0 loads the draft beside its shard
and drafts in-process, inline for SD and on a thread with its own CUDA stream while PEARL
verifies. That is the layout for a drafter sharing the verifier's GPU: no exchange per step.
"""
from __future__ import annotations

import socket
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist

from tandem.actors.drafter import LocalDrafter, ThreadedDrafter
from tandem.actors.drafter_pool import DrafterPool
from tandem.actors.remote_drafter import RemoteDrafter, connect, serve_drafter
from tandem.actors.resilient import ResilientDrafter
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
    load_control: bool = False  # cap every request's draft length by the lane's load (tandem/spec/load_control.py)
    drafter_own_device: bool = False  # drafters on GPUs of their own: "auto" requests run PEARL
    exact: bool = False  # the target's logits independent of batch and draft length (tandem/kernels/exact.py)

    @property
    def processes(self) -> int:
        """The lane's processes: T verifier ranks, then the drafters."""
        return self.tp + len(self.drafter_ranks)

    @property
    def draft_slots(self) -> int:
        """KV slots per drafter: the lane's slots shared out (a request drafts on one drafter)."""
        return -(-self.max_slots // max(1, len(self.drafter_ranks)))

    @property
    def drafter_ranks(self) -> range:
        return range(self.tp, self.tp + (0 if self.colocate_drafter else self.num_drafters))


@dataclass(frozen=True)
class LaneAddresses:
    """Where a lane's processes meet: the verifier ranks' world, and each drafter's exchange with
    the leader (which hosts its rendezvous store)."""

    world: str  # tcp://host:port
    drafters: tuple[str, ...]  # host:port, one per drafter


def join_world(spec: LaneSpec, rank: int, addresses: LaneAddresses):
    """Verifier rank `rank` joins the TP world; its group, or None at TP 1 (no world needed)."""
    if spec.tp == 1:
        return None
    if spec.device == "cuda":
        torch.cuda.set_device(0)  # Ray exposes each worker's own GPU as device 0
    backend = "nccl" if spec.device == "cuda" else "gloo"
    dist.init_process_group(backend, init_method=addresses.world, rank=rank, world_size=spec.tp)
    return dist.group.WORLD


def _kwargs(spec: LaneSpec) -> dict:
    return {"max_slots": spec.max_slots, "max_context": spec.max_context}


def _target_engine(spec: LaneSpec, rank: int, group):
    from tandem.engine.llama import LlamaEngine

    if spec.tp == 1:
        return load_engine(spec.target, spec.device, spec.dtype, spec.engine, spec.max_slots, spec.max_context,
                           exact=spec.exact)
    model = load_hf_model(spec.target, spec.device, spec.dtype)
    shard_llama(model, rank, spec.tp)
    return LlamaEngine(model, tp_group=group, exact=spec.exact, **_kwargs(spec))


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


def run_leader(spec: LaneSpec, addresses: LaneAddresses, stop_ids: set[int],
               respawn: Callable[[int, str], None] | None = None) -> SpecBatch:
    """Rank 0: the sharded target behind a TPLeader; each drafter behind a RemoteDrafter (a
    DrafterPool of them for several), or the drafter in this process when colocated.
    respawn(i, address): start a new process for drafter i that will meet the leader at address
    (None: a lost drafter is not replaced; its requests decode without drafts)."""
    group = join_world(spec, 0, addresses)
    engine = _target_engine(spec, 0, group)
    warm_kernels(engine.vocab_size, engine.device)  # Triton compiles now, not in a request's step
    _capture_graphs(spec, engine, draft=False)
    target = TPLeader(engine, group, src=0) if group is not None else engine
    if spec.colocate_drafter:
        drafter = ThreadedDrafter(_draft_engine(spec), _adaedl(spec))
    else:
        drafters = [_resilient(spec, i, address, respawn) for i, address in enumerate(addresses.drafters)]
        drafter = drafters[0] if len(drafters) == 1 else DrafterPool(drafters)
    freeze_heap()  # no collection walks the start-up heap inside a step
    return SpecBatch(target, drafter, stop_ids, _controller(spec), prefer_pearl=spec.drafter_own_device)


def _resilient(spec: LaneSpec, i: int, address: str, respawn) -> ResilientDrafter:
    def reconnect() -> RemoteDrafter:
        fresh = free_address(address.rsplit(":", 1)[0])
        respawn(i, fresh)
        return RemoteDrafter(connect(fresh, leader=True), spec.draft_slots)

    first = RemoteDrafter(connect(address, leader=True), spec.draft_slots)
    return ResilientDrafter(first, spec.draft_slots, reconnect if respawn is not None else None, f"drafter {i}")


def free_address(host: str) -> str:
    """host:port with a port free on this machine now (for a rendezvous this process hosts)."""
    with socket.socket() as s:
        s.bind(("", 0))
        return f"{host}:{s.getsockname()[1]}"


def run_follower(spec: LaneSpec, rank: int, addresses: LaneAddresses) -> None:
    """Ranks 1..T-1: hold a shard and replay the leader's engine calls until it stops."""
    group = join_world(spec, rank, addresses)
    engine = _target_engine(spec, rank, group)
    freeze_heap()
    follow(engine, group, src=0)
    leave()


def run_drafter(spec: LaneSpec, address: str) -> None:
    """A drafter: meet the leader at address, load the draft, answer draft requests until told to stop."""
    channel = connect(address, leader=False)
    engine = _draft_engine(spec)
    warm_kernels(engine.vocab_size, engine.device, rejection=False)
    freeze_heap()
    serve_drafter(LocalDrafter(engine, _adaedl(spec)), channel)


def leave() -> None:
    """Leave the lane's world once this rank's loop has ended: its communicators' threads are
    joined now, not torn down while the process exits (which can abort it)."""
    if dist.is_initialized():
        dist.destroy_process_group()
