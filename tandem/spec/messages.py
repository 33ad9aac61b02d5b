"""Small typed structs passed between the request front, the drafter and the verifier.

No logic beyond validation. Each has `make_dummy()` for tests. In the cluster these cross
process boundaries (token ids as int tensors over torch.distributed, docs/design.md §2).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from tandem.params import SamplingParams


@dataclass
class DraftItem:
    """Ask the drafter for up to max_len tokens after seq."""

    rid: str
    slot: int
    seq: list[int]
    max_len: int
    sampling: SamplingParams
    adaedl: bool
    send_probs: bool = True

    @staticmethod
    def make_dummy() -> DraftItem:
        return DraftItem("r0", 0, [1, 2, 3], 4, SamplingParams.make_dummy(), True)


@dataclass
class DraftChunk:
    """What the drafter proposes for one request."""

    ids: list[int]
    probs: torch.Tensor | None  # [len(ids), V] q; None for one-hot drafts
    lam: float | None = None  # the request's AdaEDL threshold after this draft (stats)
    entropies: list[float] = field(default_factory=list)  # AdaEDL: each token's draft entropy

    @staticmethod
    def make_dummy(vocab: int = 8) -> DraftChunk:
        return DraftChunk([1, 2], torch.full((2, vocab), 1.0 / vocab), 0.5)


@dataclass
class VerifyItem:
    """Ask the verifier for p at the last num_logits positions of seq."""

    slot: int
    seq: list[int]
    num_logits: int
    sampling: SamplingParams

    @staticmethod
    def make_dummy() -> VerifyItem:
        return VerifyItem(0, [1, 2, 3], 2, SamplingParams.make_dummy())


@dataclass
class DraftRound:
    """A finished draft round, fed back to the drafter's AdaEDL state (paper's update)."""

    rid: str
    n_drafted: int
    n_accepted: int
    max_len: int
    entropies: list[float] = field(default_factory=list)  # the chunk's, from DraftChunk

    @staticmethod
    def make_dummy() -> DraftRound:
        return DraftRound("r0", 4, 2, 4, [0.1, 0.5, 2.0, 0.3])


@dataclass
class RequestStats:
    steps: int = 0  # verifier forwards this request took part in
    drafted: int = 0  # tokens the drafter proposed
    checked: int = 0  # draft tokens the verifier judged
    accepted: int = 0  # draft tokens accepted
    generated: int = 0  # tokens emitted (accepted + corrections + bonuses)
    adaedl_lambda: float | None = None
    time_to_first_token_s: float | None = None
    elapsed_s: float = 0.0

    def as_dict(self) -> dict:
        d = dict(self.__dict__)
        d["acceptance_rate"] = self.accepted / self.checked if self.checked else 0.0
        d["mean_accepted_per_verify"] = self.generated / self.steps if self.steps else 0.0
        d["tokens_per_s"] = self.generated / self.elapsed_s if self.elapsed_s > 0 else 0.0
        return d


@dataclass
class Emission:
    """Tokens a step verified for one request; finish_reason set on its last emission."""

    rid: str
    token_ids: list[int]
    finish_reason: str | None = None  # "stop" | "length" | "cancelled" | "error"
    stats: RequestStats = field(default_factory=RequestStats)
    error: str | None = None  # with "error": what failed, for the server log and a short client message
    lane_failed: bool = False  # with "error": the whole lane failed (retry elsewhere), not this request
