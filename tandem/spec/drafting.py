"""What the step needs of a drafter: a small protocol, as transformers' candidate generators
are (propose, then learn from the outcome). The drafter proposes; only the rejection sampler
decides output tokens.

Implementations live in tandem/actors/: a drafter in this process (`LocalDrafter`, and
`ThreadedDrafter` which drafts beside the verify on its own CUDA stream), a drafter in another
process (`RemoteDrafter`, over torch.distributed) and several of them behind one (`DrafterPool`).
"""
from __future__ import annotations

from typing import Protocol

from tandem.spec.messages import DraftChunk, DraftItem, DraftRound


class DraftResult(Protocol):
    """A submitted draft: `result()` gives its chunks in the order of the items."""

    concurrent: bool  # the drafting ran (or runs) beside the caller's verify
    seconds: float  # the drafter's compute time, known once result() has returned

    def result(self) -> list[DraftChunk]: ...


class Drafter(Protocol):
    max_context: int  # longest sequence a draft slot holds

    @property
    def free_slots(self) -> int: ...

    def start(self, rid: str, seed: int) -> int:
        """Per-request state (a KV slot, a seeded random stream, AdaEDL); returns the draft slot."""

    def finish(self, rid: str, slot: int) -> None:
        """Free the request's slot and state."""

    def submit(self, items: list[DraftItem], overlap: bool = False) -> DraftResult:
        """Start drafting. overlap: the caller verifies before it reads the chunks (PEARL, AR), so
        a drafter that can draft meanwhile should."""

    def update(self, rounds: list[DraftRound], step_s: float | None = None) -> None:
        """Fold the verifier's verdicts into AdaEDL; step_s: the step's time outside drafting."""

    def close(self) -> None:
        """Release threads and peer processes."""

    def status(self) -> list[dict]:
        """One entry per drafter process: {"kind": "local" | "remote", "up": bool, "lost": processes lost}."""


class DraftFuture:
    """Chunks drafted already (inside submit, or nothing to draft)."""

    concurrent = False  # nothing ran beside the verify

    def __init__(self, chunks: list[DraftChunk], seconds: float) -> None:
        self._chunks = chunks
        self.seconds = seconds

    def result(self) -> list[DraftChunk]:
        return self._chunks
