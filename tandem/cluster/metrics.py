"""A lane's metrics for the Ray dashboard / Prometheus (ray.util.metrics; Ray prefixes `ray_`).

Per finished request, tagged by lane and mode (as vLLM counts its speculative decoding):
  tandem_requests_total{finish_reason}   requests that ended (stop, length, cancelled)
  tandem_generated_tokens_total          tokens emitted
  tandem_draft_tokens_total              tokens the drafter proposed
  tandem_checked_tokens_total            draft tokens the verifier judged
  tandem_accepted_tokens_total           draft tokens accepted (acceptance = accepted / checked)
  tandem_time_to_first_token_seconds     histogram
  tandem_time_per_output_token_seconds   histogram: (end - first token) / (tokens - 1) of each request
  tandem_inter_token_latency_seconds     histogram: the gap between the steps that gave a request tokens, per token
Every `interval_s`, per lane:
  tandem_lane_running / tandem_lane_queued / tandem_lane_free_slots   gauges
  tandem_lane_step_ms{part=total|draft|verify|wait|exchange}         mean over the last interval
  tandem_lane_batch                                                  mean requests per step, same
  tandem_load_control_cap        the draft depth the lane's controller chose (-1: none)
  tandem_load_control_tokens_per_s{kind=predicted|measured}   the controller's model, and what it measured
"""
from __future__ import annotations

import logging
import threading
from collections import deque
from typing import Callable

from tandem.spec.messages import Emission, RequestStats

PARTS = ("total", "draft", "verify", "wait", "exchange")
TTFT_BOUNDARIES = [0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0]
TOKEN_BOUNDARIES = [0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5]


class LaneMetrics:
    def __init__(self, lane_id: str, load: Callable[[], dict], interval_s: float = 1.0) -> None:
        from ray.util.metrics import Counter, Gauge, Histogram

        self.lane_id, self._load, self.interval_s = lane_id, load, interval_s
        per_request = ("lane", "mode")
        self.requests = Counter("tandem_requests", "requests that ended", tag_keys=per_request + ("finish_reason",))
        self.generated = Counter("tandem_generated_tokens", "tokens emitted", tag_keys=per_request)
        self.drafted = Counter("tandem_draft_tokens", "tokens the drafter proposed", tag_keys=per_request)
        self.checked = Counter("tandem_checked_tokens", "draft tokens the verifier judged", tag_keys=per_request)
        self.accepted = Counter("tandem_accepted_tokens", "draft tokens the verifier accepted", tag_keys=per_request)
        self.ttft = Histogram("tandem_time_to_first_token_seconds", "time to the first verified token",
                              boundaries=TTFT_BOUNDARIES, tag_keys=per_request)
        self.tpot = Histogram("tandem_time_per_output_token_seconds", "a request's time per token after its first",
                              boundaries=TOKEN_BOUNDARIES, tag_keys=per_request)
        self.itl = Histogram("tandem_inter_token_latency_seconds", "gap between a request's tokens, per token",
                             boundaries=TOKEN_BOUNDARIES, tag_keys=per_request)
        self.control_rate = Gauge("tandem_load_control_tokens_per_s", "the controller's predicted and measured "
                                  "tokens/s at its chosen depth", tag_keys=("lane", "kind"))
        self.running = Gauge("tandem_lane_running", "requests in the lane's batch", tag_keys=("lane",))
        self.queued = Gauge("tandem_lane_queued", "requests waiting for a slot", tag_keys=("lane",))
        self.free_slots = Gauge("tandem_lane_free_slots", "KV slots free", tag_keys=("lane",))
        self.step_ms = Gauge("tandem_lane_step_ms", "mean ms per step over the last interval", tag_keys=("lane", "part"))
        self.batch = Gauge("tandem_lane_batch", "mean requests per step over the last interval", tag_keys=("lane",))
        self.cap = Gauge("tandem_load_control_cap", "the load controller's draft-length cap (-1: none)", tag_keys=("lane",))
        self._last = (None, 0, 0.0, {p: 0.0 for p in PARTS})  # window, steps, requests x steps, ms x steps
        self._ended: deque[tuple[str, Emission, list[float]]] = deque()  # recorded on this thread, not the step loop's
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"lane-metrics-{lane_id}", daemon=True)
        self._thread.start()

    def ended(self, mode: str, final: Emission, gaps: list[float]) -> None:
        """A request ended (its last emission, its inter-token gaps per token); recorded at the
        next tick, on this object's thread, so the step loop that calls this pays a deque append."""
        self._ended.append((mode, final, gaps))

    def record_ended(self) -> None:
        while self._ended:
            mode, final, gaps = self._ended.popleft()
            for gap in gaps:
                self.streamed(mode, gap)
            self.request_finished(mode, final.finish_reason, final.stats)

    def request_finished(self, mode: str, finish_reason: str, stats: RequestStats | None) -> None:
        tags = {"lane": self.lane_id, "mode": mode}
        self.requests.inc(1, tags={**tags, "finish_reason": finish_reason})
        if stats is None:
            return
        for counter, value in ((self.generated, stats.generated), (self.drafted, stats.drafted),
                               (self.checked, stats.checked), (self.accepted, stats.accepted)):
            if value:
                counter.inc(value, tags=tags)
        if stats.time_to_first_token_s is not None:
            self.ttft.observe(stats.time_to_first_token_s, tags=tags)
            if stats.generated > 1:
                tpot = (stats.elapsed_s - stats.time_to_first_token_s) / (stats.generated - 1)
                self.tpot.observe(max(0.0, tpot), tags=tags)

    def streamed(self, mode: str, seconds_per_token: float) -> None:
        """A step's tokens for one request came this long per token after its previous ones."""
        self.itl.observe(seconds_per_token, tags={"lane": self.lane_id, "mode": mode})

    def publish(self, load: dict) -> None:
        """The gauges from one load() of the lane; step means over the steps since the last call."""
        tags = {"lane": self.lane_id}
        self.running.set(load["running"], tags=tags)
        self.queued.set(load["queued"], tags=tags)
        self.free_slots.set(load["free_slots"], tags=tags)
        t = load["step_timing"]
        steps, batch_sum = t["steps"], t["mean_batch"] * t["steps"]
        sums = {p: t[f"{p}_ms"] * steps for p in PARTS}
        window, last_steps, last_batch, last_sums = self._last
        if t["started"] != window:  # a new timing window (benchmarks reset it): count from its start
            last_steps, last_batch, last_sums = 0, 0.0, {p: 0.0 for p in PARTS}
        if steps > last_steps:
            n = steps - last_steps
            for p in PARTS:
                self.step_ms.set((sums[p] - last_sums[p]) / n, tags={**tags, "part": p})
            self.batch.set((batch_sum - last_batch) / n, tags=tags)
        self._last = (t["started"], steps, batch_sum, sums)
        control = load.get("load_control")
        if control is not None:
            self.cap.set(-1 if control["cap"] is None else control["cap"], tags=tags)
            for kind in ("predicted", "measured"):
                value = control.get(f"{kind}_tokens_per_s" if kind == "predicted" else "measured_tokens_per_s_now")
                if value is not None:
                    self.control_rate.set(value, tags={**tags, "kind": kind})

    def _run(self) -> None:
        warned = False
        while not self._stop.wait(self.interval_s):
            try:
                self.record_ended()
                self.publish(self._load())
            except Exception:  # metrics must never take the lane down: say so once, retry next tick
                if not warned:
                    logging.getLogger(__name__).exception("lane %s: publishing metrics failed", self.lane_id)
                    warned = True

    def stop(self) -> None:
        self._stop.set()
