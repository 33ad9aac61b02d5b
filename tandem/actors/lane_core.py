"""A lane's step loop: a thread that admits, steps and streams a SpecBatch.

Requests arrive from any thread (the request channel's readers); the loop admits them between
steps while KV slots are free (continuous batching), runs one speculative step for everything
running, and hands each request's verified tokens to its sink. Cancelled or finished requests
leave the batch and free their slots at once.
"""
from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from tandem.errors import LaneFull, LaneUnavailable, TandemError
from tandem.params import SamplingParams, SpecParams
from tandem.spec.batch import SpecBatch
from tandem.spec.messages import Emission

Sink = Callable[[Emission], None]
logger = logging.getLogger(__name__)
MAX_FAILED_STEPS = 3  # steps in a row that fail every request: the lane, not a request, is broken


def checked_request(prompt: list[int], sampling: SamplingParams, spec: SpecParams, vocab_size: int,
                    max_context: int) -> tuple[SamplingParams, SpecParams]:
    """The request's parameters as the lane runs them; bad input raises TandemError naming it."""
    sampling, spec = sampling.validate(vocab_size), spec.validate()
    if not prompt:
        raise TandemError("prompt is empty: give at least one token")
    if len(prompt) >= max_context:
        raise TandemError(f"prompt of {len(prompt)} tokens does not fit the context of {max_context} tokens")
    return sampling, spec


def check_room(rid: str, held: dict, error: BaseException | None, max_batch_size: int, max_queued: int) -> None:
    """Raise where the lane cannot take request `rid` now: it failed, the id is running, or it is
    full (`held`: its running and queued requests by id). Called under the lane's lock."""
    if error is not None:
        raise LaneUnavailable(f"this lane failed ({type(error).__name__}) and is being replaced")
    if rid in held:
        raise TandemError(f"request id {rid!r} is already running")
    if len(held) >= max_batch_size + max_queued:
        raise LaneFull(f"lane is full: it holds {len(held)} requests, its limit (max_batch_size "
                       f"{max_batch_size} running + max_queued {max_queued} waiting); retry later")


@dataclass
class _Pending:
    rid: str
    prompt: list[int]
    sampling: SamplingParams
    spec: SpecParams
    sink: Sink
    deadline: float


class LaneCore:
    def __init__(self, batch: SpecBatch, max_queued: int, max_batch_size: int, request_timeout_s: float = 300.0,
                 flush: Callable[[], None] | None = None) -> None:
        self.batch = batch  # owned: closed (its drafter and peer processes released) when the loop stops
        self.flush = flush or (lambda: None)  # after each turn of the loop: sinks that gather may send now
        self.max_queued = max_queued
        self.max_batch_size = max_batch_size
        self.request_timeout_s = request_timeout_s
        self._lock = threading.Condition()
        self._waiting: deque[_Pending] = deque()
        self._sinks: dict[str, Sink] = {}
        self._deadlines: dict[str, float] = {}
        self._cancel: set[str] = set()
        self._stopped = False
        self.error: BaseException | None = None
        self.steps = 0
        self._thread = threading.Thread(target=self._run, name="lane-step-loop", daemon=True)
        self._thread.start()

    # -- called from other threads -------------------------------------------------------------
    def submit(self, rid: str, prompt: list[int], sampling: SamplingParams, spec: SpecParams, sink: Sink) -> None:
        """Queue a request; bad input and a full lane raise here, before anything is held."""
        sampling, spec = checked_request(prompt, sampling, spec, self.batch.vocab_size, self.batch.max_context)
        with self._lock:
            check_room(rid, self._sinks, self.error, self.max_batch_size, self.max_queued)  # _sinks: running + queued
            self._sinks[rid] = sink
            self._waiting.append(_Pending(rid, prompt, sampling, spec, sink, time.monotonic() + self.request_timeout_s))
            self._lock.notify()

    def cancel(self, rid: str) -> bool:
        with self._lock:
            if rid not in self._sinks:
                return False
            self._cancel.add(rid)
            self._lock.notify()
            return True

    def load(self) -> dict:
        with self._lock:
            return {"running": len(self.batch), "queued": len(self._waiting), "steps": self.steps,
                    "free_slots": self.batch.free_slots, "healthy": self.error is None,
                    "step_timing": self.batch.timing.as_dict(), "drafters": self.batch.drafter.status(),
                    "load_control": self.batch.controller.state()}

    def reset_timing(self) -> None:
        from tandem.spec.batch import TimingStats

        self.batch.timing = TimingStats()

    def stop(self) -> None:
        with self._lock:
            self._stopped = True
            self._lock.notify()
        self._thread.join(timeout=10)

    # -- the loop ------------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            last = None  # end of the previous step while requests were running
            emptied = None  # (end, timing) of the step that left the lane with no request
            failed_steps = 0  # in a row
            while self._admit_and_cancel():
                start = time.perf_counter()
                timing = self.batch.timing
                if last is not None and len(self.batch):
                    # Time the loop spent outside steps with work to do: admission, cancels,
                    # and waiting for the interpreter (the replica's event loop shares it).
                    timing.gap += start - last
                elif emptied is not None and emptied[1] is timing:  # no request since: the next one's way in
                    timing.idle, timing.idle_spans = timing.idle + start - emptied[0], timing.idle_spans + 1
                try:
                    emissions = self.batch.step()
                    failed_steps = 0
                except Exception as e:  # every request failed even alone: end them, keep the lane
                    failed_steps += 1
                    if failed_steps >= MAX_FAILED_STEPS:
                        raise
                    logger.exception("a step failed for all %d requests; ending them", len(self.batch))
                    emissions = [self.batch.abort(rid, f"step failed: {type(e).__name__}") for rid in list(self.batch.requests)]
                self.steps += 1
                stepped = time.perf_counter()
                for e in emissions:
                    self._deliver(e)
                self.flush()
                end = time.perf_counter()
                timing.deliver += end - stepped
                last, emptied = (end, None) if len(self.batch) else (None, (end, timing))
            self.batch.close()
        except BaseException as e:  # the engines are broken: fail every request, mark unhealthy
            logger.exception("lane step loop failed after %d steps; failing %d requests", self.steps, len(self._sinks))
            self.error = e
            self._fail_all(e)
            self.flush()
            raise

    def _admit_and_cancel(self) -> bool:
        """Between steps: apply cancels and timeouts, admit waiting requests. False: stop."""
        with self._lock:
            while not self._stopped and not len(self.batch) and not self._waiting and not self._cancel:
                self._lock.wait(timeout=1.0)
            if self._stopped:
                return False
            cancels, self._cancel = self._cancel, set()
            now = time.monotonic()
            expired = {rid for rid, t in self._deadlines.items() if t < now}
            if expired:
                logger.warning("cancelling %d requests past request_timeout_s=%s: %s", len(expired),
                               self.request_timeout_s, sorted(expired))
            cancels |= expired
            for p in [p for p in self._waiting if p.rid in cancels]:
                self._waiting.remove(p)
                self._deliver(Emission(p.rid, [], "cancelled"))
            for rid in cancels:
                e = self.batch.cancel(rid)
                if e is not None:
                    self._deliver(e)
            while self._waiting and self.batch.free_slots and len(self.batch) < self.max_batch_size:
                p = self._waiting.popleft()
                try:
                    self.batch.add(p.rid, p.prompt, p.sampling, p.spec)
                except Exception as e:  # this request alone cannot start
                    logger.warning("request %s refused at admission: %r", p.rid, e)
                    self._deliver(Emission(p.rid, [], "error", error=f"admission failed: {type(e).__name__}: {e}"))
                    continue
                self._deadlines[p.rid] = p.deadline
            return True

    def _deliver(self, e: Emission) -> None:
        with self._lock:  # re-entrant: also called with the lock held
            sink = self._sinks.get(e.rid)
            if e.finish_reason:
                self._sinks.pop(e.rid, None)
                self._deadlines.pop(e.rid, None)
        if sink is not None:
            sink(e)

    def _fail_all(self, err: BaseException) -> None:
        with self._lock:
            for rid, sink in list(self._sinks.items()):
                sink(Emission(rid, [], "error", error=f"lane failed: {type(err).__name__}", lane_failed=True))
            self._sinks.clear()
            self._waiting.clear()
