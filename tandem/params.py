"""What a request asks for: its sampling parameters and its speculation settings.

Light (no torch): the front ends validate requests with these before anything heavy runs, and
the CLI and config name the decoding modes from here. `MODES` is the one list of modes.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

from tandem.errors import TandemError

Mode = Literal["ar", "sd", "pearl"]
MODES: tuple[str, ...] = get_args(Mode)


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
    send_draft_probs: bool = True  # False: one-hot (greedy) drafts, cheaper to send (docs/design.md §3)

    def validate(self) -> SpecParams:
        if self.mode not in MODES:
            raise TandemError(f"mode must be one of {MODES}, got {self.mode!r}")
        if not 0 <= self.max_draft <= 64:
            raise TandemError(f"max_draft must be in [0, 64], got {self.max_draft}")
        return self

    @staticmethod
    def make_dummy() -> SpecParams:
        return SpecParams(mode="sd", max_draft=3)
