"""In-process generation: one SpecBatch driven until every request has finished."""
from __future__ import annotations

from dataclasses import dataclass

from tandem.actors.drafter import LocalDrafter, ThreadedDrafter
from tandem.engine.pair import ModelPair
from tandem.params import SamplingParams, SpecParams
from tandem.spec.adaedl import AdaEDLConfig
from tandem.spec.batch import SpecBatch
from tandem.spec.load_control import LoadController
from tandem.spec.messages import RequestStats


@dataclass
class Completion:
    token_ids: list[int]
    finish_reason: str
    stats: RequestStats


def generate(
    pair: ModelPair,
    prompts: list[list[int]],
    sampling: SamplingParams | list[SamplingParams],
    spec: SpecParams | list[SpecParams],
    adaedl: AdaEDLConfig | None = None,
    overlap: bool = False,
    controller: LoadController | None = None,
) -> list[Completion]:
    """Run the prompts as one continuous batch; return each one's verified tokens.

    overlap=True drafts in a background thread on its own CUDA stream (or the draft's own GPU),
    so PEARL's draft and verify run at the same time in one process. controller caps the
    requests' draft lengths by the batch's load (tandem/spec/load_control.py).
    """
    kind = ThreadedDrafter if overlap else LocalDrafter
    drafter = kind(pair.draft, adaedl, acceptance=pair.acceptance)
    own_device = overlap and pair.draft.device != pair.target.device  # "auto" requests: PEARL only then
    if pair.controller is None:
        pair.controller = LoadController()
    try:
        batch = SpecBatch(pair.target, drafter, pair.stop_ids, controller or pair.controller, prefer_pearl=own_device,
                          control_all=controller is not None)
        return run_batch(batch, prompts, sampling, spec)
    finally:
        drafter.close()


def run_batch(batch: SpecBatch, prompts, sampling, spec) -> list[Completion]:
    """Drive an existing batch (local or distributed) until every prompt has finished."""
    n = len(prompts)
    samplings = sampling if isinstance(sampling, list) else [sampling] * n
    specs = spec if isinstance(spec, list) else [spec] * n
    tokens: dict[str, list[int]] = {str(i): [] for i in range(n)}
    done: dict[str, Completion] = {}
    waiting = list(enumerate(zip(prompts, samplings, specs)))
    while waiting or len(batch):
        while waiting and batch.free_slots:  # continuous batching: join between steps
            i, (p, s, sp) = waiting.pop(0)
            batch.add(str(i), p, s, sp)
        for e in batch.step():
            tokens[e.rid] += e.token_ids
            if e.finish_reason:
                done[e.rid] = Completion(tokens[e.rid], e.finish_reason, e.stats)
    return [done[str(i)] for i in range(n)]
