"""A lane's running batch: admit requests, step them together, emit verified tokens.

Continuous batching: requests join and leave between steps, each with its own mode, window,
AdaEDL state, sampling parameters and seed. The offline CLI and the cluster's lane both drive
this class; only where the drafter lives differs.
"""
from __future__ import annotations

import logging
import random
import time
from dataclasses import replace

from tandem.engine.base import Engine
from tandem.errors import LaneFull, TandemError
from tandem.kernels.streams import Stream
from tandem.params import SamplingParams, SpecParams
from tandem.spec.drafting import Drafter
from tandem.spec.load_control import Candidate, LoadController, Round, StepObservation
from tandem.spec.messages import Emission
from tandem.spec.request import RequestState
from tandem.spec.step import StepTiming, speculative_step
from tandem.spec.verifier import Verifier

logger = logging.getLogger(__name__)


class SpecBatch:
    """controller: chooses every speculating request's draft length by the lane's load
    (`speculation.load_control`; control_all=False: only "auto" requests'); without one, a
    controller of the batch's own still chooses the lengths of "auto" requests. prefer_pearl:
    "auto" requests run PEARL (the drafter has a device of its own, so drafting overlaps
    verifying), else SD."""

    def __init__(self, target: Engine, drafter: Drafter, stop_ids: set[int],
                 controller: LoadController | None = None, prefer_pearl: bool = False,
                 control_all: bool | None = None) -> None:
        self.verifier = Verifier(target)
        self.drafter = drafter
        self.stop_ids = frozenset(stop_ids)
        self.max_context = min(target.max_context, drafter.max_context)
        self.vocab_size = target.vocab_size
        self.requests: dict[str, RequestState] = {}
        self.timing = TimingStats()
        # control_all: the controller chooses every speculating request's length, not only auto ones'
        self.control_all = controller is not None if control_all is None else control_all
        self.controller = controller if controller is not None else LoadController()  # tandem/spec/load_control.py
        if self.controller.forward_rows is None:  # the verify's rows, as this engine pads them
            self.controller.forward_rows = target.forward_rows
        self.prefer_pearl = prefer_pearl

    def __len__(self) -> int:
        return len(self.requests)

    @property
    def free_slots(self) -> int:
        return min(self.verifier.engine.free_slots, self.drafter.free_slots)

    def add(self, rid: str, prompt: list[int], sampling: SamplingParams, spec: SpecParams) -> None:
        """Admit a request; it joins at the next step."""
        sampling, spec = sampling.validate(self.vocab_size), spec.validate()
        if rid in self.requests:
            raise TandemError(f"request id {rid!r} is already running")
        if not prompt:
            raise TandemError("prompt is empty: give at least one token")
        if len(prompt) >= self.max_context:
            raise TandemError(f"prompt of {len(prompt)} tokens does not fit the context of {self.max_context} tokens")
        if self.free_slots == 0:
            raise LaneFull(f"lane is full: {len(self.requests)} requests running")
        seed = sampling.seed if sampling.seed is not None else random.getrandbits(62)
        stream = Stream(seed)  # the verifier's randoms for this request
        target_slot = self.verifier.engine.allocate()
        try:
            draft_slot = self.drafter.start(rid, seed)
        except BaseException:  # nothing held when admission fails
            self.verifier.engine.release(target_slot)
            raise
        stops = frozenset() if sampling.ignore_eos else self.stop_ids
        adaptive = spec.mode == "auto"  # the lane chooses its mode and, every step, its length
        if adaptive:
            spec = replace(spec, mode="pearl" if self.prefer_pearl else "sd")
        self.requests[rid] = RequestState(
            rid, list(prompt), sampling, spec, stops, target_slot, draft_slot, stream,
            started_at=time.perf_counter(), adaptive=adaptive)

    def step(self) -> list[Emission]:
        """One step for every running request; finished requests leave the batch.

        A step that raises is retried once per request, each alone: a request whose own step
        fails leaves with finish_reason "error"; the others go on. Only when every request fails
        alone does the error propagate (the engines, not a request, are at fault).
        """
        reqs = list(self.requests.values())
        if not reqs:
            return []
        try:
            return self._step(reqs)
        except Exception as e:
            logger.warning("a step of %d requests failed (%r); retrying each alone", len(reqs), e)
        out, failed = [], []
        for r in reqs:
            try:
                out += self._step([r])
            except Exception as e:
                logger.error("request %s failed its own step: %r", r.rid, e)
                failed.append((r, e))
        if len(failed) == len(reqs):
            raise failed[-1][1]
        return out + [self.abort(r.rid, "internal error during a step") for r, _ in failed]

    def _step(self, reqs: list[RequestState]) -> list[Emission]:
        rooms = [self._room(r) for r in reqs]
        if self.control_all or any(r.adaptive for r in reqs):
            gained, timing = self._controlled_step(reqs, rooms)
        else:
            gained, timing = speculative_step(reqs, self.drafter, self.verifier, rooms)
        self.timing.add(timing, len(reqs))
        return [self._emit(r, tokens) for r, tokens in zip(reqs, gained)]

    def abort(self, rid: str, message: str) -> Emission:
        """End a request that cannot go on: its slots are freed, it finishes with "error"."""
        r = self.requests[rid]
        try:
            self._finish(r, "error")
        finally:
            self.requests.pop(rid, None)
        return Emission(rid, [], "error", r.stats, error=message)

    def _controlled_step(self, reqs: list[RequestState], rooms: list[int]):
        """The step under the load controller's cap, then what it measured fed back to it."""
        ctl = self.controller
        solo = sum(r.spec.mode != "ar" for r in reqs) == 1  # AdaEDL's stop pays where one request drafts
        for r in reqs:
            r.early_stop = solo or not r.adaptive
        ctl.decide([Candidate(r.rid, min(r.spec.max_draft, room) if r.spec.mode != "ar" else 0, r.adaedl,
                              r.spec.mode == "pearl") for r, room in zip(reqs, rooms)])
        before = []
        for r in reqs:
            r.draft_cap = ctl.length(r.rid) if r.spec.mode != "ar" and (self.control_all or r.adaptive) else None
            before.append((r.stats.drafted, r.stats.checked, r.stats.accepted, r.window < r.spec.max_draft, len(r.pending)))
        joined = sum(r.stats.steps == 0 for r in reqs)  # their prompts are fed in this step
        gained, t = speculative_step(reqs, self.drafter, self.verifier, rooms)
        rounds = [Round(r.rid, r.stats.checked - checked, r.stats.accepted - accepted, r.stats.drafted - drafted,
                        capped, r.adaedl)
                  for r, (drafted, checked, accepted, capped, _) in zip(reqs, before)]
        # Rows the verify scored: SD its chunk + 1, PEARL its pending tokens + 1, AR 1.
        scored = [x.judged + 1 if r.spec.mode == "sd" else pending + 1 for x, r, (*_, pending) in zip(rounds, reqs, before)]
        rows = sum(scored)
        concurrent = t.total < t.draft + t.verify  # drafting ran beside the verify
        ctl.observe(StepObservation(
            batch=len(reqs), verified_tokens=rows, drafting=sum(x.drafted > 0 for x in rounds),
            positions=max(x.drafted for x in rounds), draft_s=t.draft,
            rest_s=t.total - (t.wait if concurrent else t.draft),
            concurrent=concurrent, emitted=sum(len(g) for g in gained), step_s=t.total, joined=joined,
            forward_rows=self.verifier.engine.forward_rows(len(reqs), max(scored))), rounds)
        return gained, t

    def cancel(self, rid: str) -> Emission | None:
        r = self.requests.get(rid)
        if r is None:
            return None
        self._finish(r, "cancelled")
        return Emission(rid, [], "cancelled", r.stats)

    def close(self) -> None:
        """Release the drafter and the target's peers (threads, other processes)."""
        self.drafter.close()
        self.verifier.engine.close()

    def _room(self, r: RequestState) -> int:
        """Most draft tokens worth proposing: the token budget and the context both bound it."""
        budget = r.sampling.max_tokens - len(r.verified) - 1
        context = self.max_context - len(r.seq) - 1
        return max(0, min(budget, context))

    def _emit(self, r: RequestState, tokens: list[int]) -> Emission:
        """Trim at a stop token / the budget / the context and finish the request if done."""
        before = len(r.verified) - len(tokens)
        new = r.verified[before:]
        reason = None
        for i, t in enumerate(new):
            if t in r.stop_ids:
                new, reason = new[: i + 1], "stop"
                break
        limit = min(r.sampling.max_tokens, self.max_context - len(r.prompt))
        if before + len(new) >= limit:
            new, reason = new[: limit - before], reason or "length"
        r.verified[before:] = new
        now = time.perf_counter()
        if new and r.stats.time_to_first_token_s is None:
            r.stats.time_to_first_token_s = now - r.started_at
        r.stats.generated = len(r.verified)
        r.stats.elapsed_s = now - r.started_at
        if reason:
            self._finish(r, reason)
        return Emission(r.rid, new, reason, r.stats)

    def _finish(self, r: RequestState, reason: str) -> None:
        r.finish_reason = reason
        r.clear_pending()
        self.verifier.engine.release(r.target_slot)
        self.drafter.finish(r.rid, r.draft_slot)
        self.controller.finish(r.rid)
        del self.requests[r.rid]


class TimingStats:
    """Running sums of step timings, reported as mean milliseconds per step."""

    def __init__(self) -> None:
        self.steps, self.requests = 0, 0
        self.sums = StepTiming()
        # the lane loop's time around steps (tandem/actors/lane_core.py), in seconds:
        self.gap = 0.0  # between the end of one step and the start of the next, requests running
        self.deliver = 0.0  # after a step: its emissions to their sinks and the request channel
        self.idle, self.idle_spans = 0.0, 0  # no request running: from the last step to the next
        # The slowest step, its index and batch: a mean hides whether a cost is every step's or
        # one stall's (a graph capture, a compile, a collector pause).
        self.slowest, self.slowest_at, self.slowest_batch = StepTiming(), -1, 0
        self.started = time.time()  # names this window (a reader of the means can tell a reset)

    def add(self, t: StepTiming, batch_size: int) -> None:
        if t.total > self.slowest.total:
            self.slowest, self.slowest_at, self.slowest_batch = t, self.steps, batch_size
        self.steps += 1
        self.requests += batch_size
        for k, v in t.__dict__.items():
            setattr(self.sums, k, getattr(self.sums, k) + v)

    def as_dict(self) -> dict:
        n = max(self.steps, 1)
        out = {f"{k}_ms": 1000 * v / n for k, v in self.sums.__dict__.items()}
        slowest = {"step": self.slowest_at, "batch": self.slowest_batch,
                   **{f"{k}_ms": 1000 * v for k, v in self.slowest.__dict__.items()}}
        return {"steps": self.steps, "mean_batch": self.requests / n, **out, "gap_ms": 1000 * self.gap / n,
                "deliver_ms": 1000 * self.deliver / n, "idle_s": self.idle,
                "idle_ms_per_span": 1000 * self.idle / max(self.idle_spans, 1),
                "slowest": slowest, "started": self.started}
