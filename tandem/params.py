"""What a request asks for: its sampling parameters and its speculation settings.

Light (no torch): the front ends validate requests with these before anything heavy runs, and
the CLI and config name the decoding modes from here. `MODES` is the one list of modes.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Literal, get_args

from tandem.errors import TandemError

Mode = Literal["auto", "ar", "sd", "pearl"]  # auto: the lane chooses SD or PEARL and each step's length
MODES: tuple[str, ...] = get_args(Mode)


MAX_SEED = 2**63 - 1  # torch generators take a signed 64-bit seed
MAX_TEMPERATURE = 100.0
GREEDY_BELOW = 1e-5  # temperatures under this are greedy (as vLLM does): logits / t would overflow
MAX_DRAFT = 64


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 64
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    seed: int | None = None  # None: the server picks one
    ignore_eos: bool = False

    def validate(self, vocab_size: int | None = None) -> SamplingParams:
        """Every field in range (the message names it and what is allowed), or TandemError.
        Returns the parameters to use: a temperature under GREEDY_BELOW becomes 0."""
        _check_int("max_tokens", self.max_tokens, 1, None)
        _check_number("temperature", self.temperature, 0.0, MAX_TEMPERATURE)
        if not 0 < _number("top_p", self.top_p) <= 1:
            raise TandemError(f"top_p must be in (0, 1], got {self.top_p}")
        _check_int("top_k", self.top_k, 0, vocab_size, "0 = off")
        if self.seed is not None:
            _check_int("seed", self.seed, 0, MAX_SEED)
        if not isinstance(self.ignore_eos, bool):
            raise TandemError(f"ignore_eos must be true or false, got {self.ignore_eos!r}")
        if 0 < self.temperature < GREEDY_BELOW:
            return replace(self, temperature=0.0)
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
        _check_int("max_draft", self.max_draft, 0, MAX_DRAFT)
        for name in ("adaedl", "send_draft_probs"):
            if not isinstance(getattr(self, name), bool):
                raise TandemError(f"{name} must be true or false, got {getattr(self, name)!r}")
        return self

    @staticmethod
    def make_dummy() -> SpecParams:
        return SpecParams(mode="sd", max_draft=3)


def _number(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise TandemError(f"{name} must be a finite number, got {value!r}")
    return float(value)


def _check_number(name: str, value, low: float, high: float) -> None:
    if not low <= _number(name, value) <= high:
        raise TandemError(f"{name} must be in [{low:g}, {high:g}], got {value!r}")


def _check_int(name: str, value, low: int, high: int | None, note: str = "") -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TandemError(f"{name} must be an integer, got {value!r}")
    if value < low or (high is not None and value > high):
        allowed = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise TandemError(f"{name} must be {allowed}{f' ({note})' if note else ''}, got {value}")
