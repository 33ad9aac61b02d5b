"""Small typed structs passed between the request front, the drafter and the verifier.

No logic beyond validation. Each has `make_dummy()` for tests. In the cluster these cross
process boundaries (token ids as int tensors over torch.distributed, DESIGN §2).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch

from tandem.errors import TandemError

Mode = Literal["ar", "sd", "pearl"]
MODES: tuple[str, ...] = ("ar", "sd", "pearl")


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 64
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    seed: int | None = None  # None: the server picks one
    ignore_eos: bool = False

    def validate(self) -> SamplingParams:
        if self.max_tokens <= 0:
            raise TandemError(f"max_tokens must be > 0, got {self.max_tokens}")
        if self.temperature < 0:
            raise TandemError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise TandemError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise TandemError(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        return self

    @staticmethod
    def make_dummy() -> SamplingParams:
        return SamplingParams(max_tokens=8, temperature=1.0, top_p=0.9, seed=0)


@dataclass(frozen=True)
class SpecParams:
    mode: Mode = "pearl"
    max_draft: int = 8  # SD: draft length k (AdaEDL may stop earlier); PEARL: window γ
    adaedl: bool = True
    send_draft_probs: bool = True  # False: one-hot (greedy) drafts, cheaper to send (DESIGN §3)

    def validate(self) -> SpecParams:
        if self.mode not in MODES:
            raise TandemError(f"mode must be one of {MODES}, got {self.mode!r}")
        if not 0 <= self.max_draft <= 64:
            raise TandemError(f"max_draft must be in [0, 64], got {self.max_draft}")
        return self

    @staticmethod
    def make_dummy() -> SpecParams:
        return SpecParams(mode="sd", max_draft=3)


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
    finish_reason: str | None = None  # "stop" | "length" | "cancelled"
    stats: RequestStats = field(default_factory=RequestStats)
