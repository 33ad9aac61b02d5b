"""A request's state inside a lane: its verified tokens, its PEARL chunk in flight, its stats."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from tandem.kernels.streams import Stream
from tandem.params import SamplingParams, SpecParams
from tandem.spec.messages import RequestStats


@dataclass
class RequestState:
    rid: str
    prompt: list[int]
    sampling: SamplingParams
    spec: SpecParams
    stop_ids: frozenset[int]
    target_slot: int
    draft_slot: int
    stream: Stream  # the verifier's randoms for this request (tandem/kernels/streams.py)
    verified: list[int] = field(default_factory=list)  # output tokens, all verified
    # PEARL: drafted tokens awaiting verification, their q, and the chunk they came from
    pending: list[int] = field(default_factory=list)
    pending_probs: torch.Tensor | None = None  # [len(pending), V]
    pending_chunk: tuple[int, int, list[float]] | None = None  # (length, window, entropies) of the chunk in flight
    stats: RequestStats = field(default_factory=RequestStats)
    finish_reason: str | None = None
    started_at: float = 0.0
    draft_cap: int | None = None  # the lane's load controller's cap on the window (None: none)
    adaptive: bool = False  # mode "auto": the lane chose its mode, and chooses its window every step
    early_stop: bool = True  # AdaEDL may stop this step's draft (the lane's choice for "auto" requests)

    @property
    def adaedl(self) -> bool:
        """Whether AdaEDL stops this step's draft early: the request asked for it and the lane
        has not turned it off. An "auto" request's lane turns it off while other requests draft
        beside it: a batch drafts as many positions as its longest draft, so a stop saves no
        drafting time there and costs tokens that would have been accepted; the lengths the load
        controller chooses per request do that job."""
        return self.spec.adaedl and self.early_stop

    @property
    def window(self) -> int:
        """The draft length / PEARL window this step: the request's max_draft, under the lane's cap."""
        return self.spec.max_draft if self.draft_cap is None else min(self.spec.max_draft, self.draft_cap)

    @property
    def seq(self) -> list[int]:
        """Prompt and verified output: what the target has committed to."""
        return self.prompt + self.verified

    def clear_pending(self) -> None:
        self.pending, self.pending_probs, self.pending_chunk = [], None, None
