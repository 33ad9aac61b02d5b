"""The load controller (`mode: auto`) against a simulated lane: no GPU, no model, seconds to run.

    python benchmarks/controller_sim.py                       # every cell and the mixed ramp
    python benchmarks/controller_sim.py --costs h200_t1_joins --seeds 3 --out /tmp/sim.json

A lane's step is replaced by a model of it: step costs as fitted to one H200's measured steps
(`benchmarks/results/gpu_bench_auto2_h200_2026-12-04.json`, milliseconds; drafting costs a part
per step, the drafter's catch-up forward, and a part per position, both growing with the
drafting batch; verifying costs by rows; the `_joins` cost sets add an eager prompt prefill to
every step that admits requests), and per-token acceptance drawn per request and per token (so
some requests, and some stretches of one, deserve longer drafts than others). AdaEDL is the
drafter's own (tandem/spec/adaedl.py: the piece rule, the acceptance table, the cost ratio
measured as the drafter measures it), seeing each token's acceptance through noise as an
entropy. The real `LoadController` runs against it exactly as `SpecBatch` drives it, and so do
the static settings (AR, SD k=3/5/8, SD + AdaEDL). The simulated clock gives tokens/s; the
ratios auto / best static are what `adaptive_bench.py` measures on the GPU, here without the
GPU's noise, so a change to the controller can be judged before a GPU run
(tests/test_bench_scripts.py runs it small). The simulation decides nothing on its own: the GPU
run is the judge.
"""
from __future__ import annotations

import argparse
import json
import math
import random
import sys
import dataclasses
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tandem.engine.draft_steps import LONG_PIECE, PIECE  # noqa: E402
from tandem.engine.graphs import BATCH_BUCKETS, QUERY_BUCKETS  # noqa: E402
from tandem.spec.adaedl import AcceptanceTable, AdaEDLConfig, AdaEDLState, CostRatio  # noqa: E402
from tandem.spec.load_control import Candidate, LoadControlConfig, LoadController, Round, StepObservation  # noqa: E402


@dataclass(frozen=True)
class Costs:
    """A step's milliseconds: verify + other (judging, bookkeeping) + drafting (SD: in series)."""

    verify0: float
    verify_row: float
    other_req: float
    other_row: float
    draft0: float  # per step that drafts
    draft_req: float  # per step, per drafting request
    pos0: float  # per position
    pos_req: float  # per position, per drafting request
    noise: float = 0.03  # relative spread of each step's time (lognormal)
    join_verify: float = 0.0  # a step where requests join: their prompts' prefill in the verify forward
    join_draft: float = 0.0  # and in the drafter's
    # CUDA graphs: the verify computes its bucket's rectangle, verify_computed per row of it
    graphs: bool = False
    verify_req: float = 0.0
    verify_computed: float = 0.0

    def computed_rows(self, batch: int, query: int) -> int:
        """The rows a verify forward computes (what the engine's forward_rows says)."""
        b = next((b for b in BATCH_BUCKETS if b >= batch), None)
        q = next((q for q in QUERY_BUCKETS if q >= query), None)
        return b * q if self.graphs and b is not None and q is not None else batch * query

    def step(self, batch: int, rows: int, drafting: int, positions: int, rng: random.Random,
             joined: int = 0, query: int = 1) -> tuple[float, float]:
        """(drafting, the rest) in seconds; query: the longest verified row count of a request."""
        jitter = lambda: math.exp(rng.gauss(0.0, self.noise))  # noqa: E731
        verify = self.verify0 + self.verify_row * rows + self.verify_req * batch
        verify += self.verify_computed * self.computed_rows(batch, query)
        rest = (verify + self.other_req * batch + self.other_row * rows) * jitter()
        draft = 0.0
        if drafting and positions:
            draft = (self.draft0 + self.draft_req * drafting + positions * (self.pos0 + self.pos_req * drafting)) * jitter()
        if joined:
            rest, draft = rest + self.join_verify, draft + (self.join_draft if drafting else 0.0)
        return draft / 1000, rest / 1000


# Least-squares fits to the SD and AR rows of the H200 run named above, by temperature.
COSTS = {
    "h200_t0": Costs(verify0=1.74, verify_row=0.0121, other_req=0.0053, other_row=0.0016,
                     draft0=0.39, draft_req=0.021, pos0=0.214, pos_req=0.0031),
    "h200_t1": Costs(verify0=1.01, verify_row=0.0063, other_req=0.02, other_row=0.0073,
                     draft0=0.45, draft_req=0.065, pos0=0.232, pos_req=0.0072),
}
# Eager prefill of a 150-200-token prompt on the same H200: ~10-14 ms of host time for the target
# (benchmarks/results/prefill_probe_eager_h200_2026-12-04.txt), a few ms for the 4-layer draft.
# With prompt forwards of up to 8 requests in CUDA graphs (tandem/engine/graphs.py PREFILL_BATCH),
# a join step should cost about the prompts' device time instead: a prediction (~3 ms of target
# device time per 150-200 tokens, a few prompts a step at 64 requests), not yet a measurement.
for _name in list(COSTS):
    COSTS[_name + "_joins"] = dataclasses.replace(COSTS[_name], join_verify=12.0, join_draft=3.0)
    COSTS[_name + "_graphed_joins"] = dataclasses.replace(COSTS[_name], join_verify=4.0, join_draft=1.0)
# Everything in CUDA graphs, verify priced by the rows its bucket computes: fits to the steps
# without joins of benchmarks/results/adaptive_bench_code_t0t1_h200_2026-12-04d.json (AR and SD
# k=3/5/8 at 1-64 requests; T=0 from the verify's device time and the host's, T=1 from the whole
# step less drafting, whose verify timer does not wait for the device).
COSTS["h200_t0_graphs"] = Costs(verify0=1.505, verify_row=0.0, other_req=0.0275, other_row=0.0,
                                draft0=0.338, draft_req=0.018, pos0=0.207, pos_req=0.0,
                                join_verify=4.0, join_draft=1.5, graphs=True, verify_req=0.0082,
                                verify_computed=0.00142)
COSTS["h200_t1_graphs"] = Costs(verify0=1.516, verify_row=0.00065, other_req=0.0, other_row=0.0,
                                draft0=0.373, draft_req=0.022, pos0=0.216, pos_req=0.0,
                                join_verify=4.0, join_draft=1.5, graphs=True, verify_req=0.0147,
                                verify_computed=0.00315)


@dataclass(frozen=True)
class Workload:
    """Requests' per-token acceptance: a request's mean from Beta(mean, spread), each token's from
    Beta around it with `concentration` (low: easy and hard stretches alternate)."""

    mean: float
    spread: float = 0.08
    concentration: float = 3.0
    sense: float = 0.15  # noise in the drafter's view of a token's acceptance (AdaEDL's entropy signal)

    def request_alpha(self, rng: random.Random) -> float:
        return min(0.97, max(0.2, rng.gauss(self.mean, self.spread)))


WORKLOADS = {"code_t0": Workload(0.88), "code_t1": Workload(0.8), "text_t1": Workload(0.6, spread=0.12)}


@dataclass(frozen=True)
class Setting:
    name: str
    max_draft: int  # 0: AR
    adaedl: bool = False
    auto: bool = False


SETTINGS = [Setting("ar", 0), Setting("sd k=3", 3), Setting("sd k=5", 5), Setting("sd k=7", 7), Setting("sd k=8", 8),
            Setting("sd+adaedl (cap 16)", 16, adaedl=True), Setting("auto (default)", 16, adaedl=True, auto=True),
]


@dataclass
class _Req:
    rid: str
    alpha: float
    work: Workload
    left: int
    pending: list = field(default_factory=list)  # the next tokens' acceptance (drawn once, kept if not drafted)

    def token(self, i: int, rng: random.Random) -> float:
        while len(self.pending) <= i:
            a, c = self.alpha * self.work.concentration, (1 - self.alpha) * self.work.concentration
            self.pending.append(rng.betavariate(max(a, 1e-3), max(c, 1e-3)))
        return self.pending[i]


class _Drafter:
    """AdaEDL as `tandem/actors/drafter.py` runs it (propose_fused): pieces of PIECE positions
    (LONG_PIECE first for requests whose chunks run long), the cost rule deciding at each piece's
    end from a shared AcceptanceTable and c from `CostRatio`, measured as the drafter
    measures it. The drafter sees a token's acceptance p through its entropy: the AdaEDL bound
    1 - sqrt(gamma * H) is p plus noise."""

    def __init__(self) -> None:
        self.config = AdaEDLConfig()
        self.table = AcceptanceTable(self.config.gamma)
        self.states: dict[str, AdaEDLState] = {}
        self.cost = CostRatio()

    def entropy(self, p: float, sense: float, rng: random.Random) -> float:
        bound = min(1.0, max(0.0, p + rng.gauss(0.0, sense)))
        return (1.0 - bound) ** 2 / self.config.gamma

    def propose(self, running: list[_Req], windows: list[int], adaedl: bool, rng: random.Random):
        """Each request's drafted tokens' entropies, and the positions the device drafted."""
        c = self.cost.value
        states = [self.states.setdefault(r.rid, AdaEDLState(self.config)) for r in running]
        for st in states:
            st.begin_round(self.table, c)
        ents: list[list[float]] = [[] for _ in running]
        active = [i for i, w in enumerate(windows) if w > 0]
        positions = 0
        while active:
            steps = {i: min(windows[i] - len(ents[i]), PIECE if ents[i] else self._piece(states[i], windows[i], adaedl))
                     for i in active}
            positions += max(steps.values())
            going = []
            for i in active:
                r, st = running[i], states[i]
                hs = [self.entropy(r.token(len(ents[i]) + j, rng), r.work.sense, rng) for j in range(steps[i])]
                if adaedl and not st.by_piece:  # c not measured yet: the paper's rule, token by token
                    for h in hs:
                        if st.stop_before(h):
                            break
                        ents[i].append(h)
                    else:
                        if len(ents[i]) < windows[i]:
                            going.append(i)
                    continue
                ents[i] += hs
                room = windows[i] - len(ents[i])
                if room > 0 and (not adaedl or st.draft_on(hs, min(room, PIECE))):
                    going.append(i)
            active = going
        return ents, positions

    @staticmethod
    def _piece(state: AdaEDLState, window: int, adaedl: bool) -> int:
        if not adaedl:
            return window
        return LONG_PIECE if state.mean_length > PIECE else PIECE

    def update(self, running: list[_Req], ents: list[list[float]], accepted: list[int], windows: list[int],
               draft_s: float, rest_s: float, positions: int, prefilled: bool = False) -> None:
        self.cost.step(rest_s)
        if positions:
            self.cost.draft(positions, draft_s, prefilled)
        for r, e, a, w in zip(running, ents, accepted, windows):
            if e:
                self.states[r.rid].update(len(e), a, w, e)


def simulate(setting: Setting, costs: Costs, jobs: list[tuple[Workload, int]], inflight: list[int],
             seed: int = 0, controller: LoadController | None = None) -> dict:
    """Run `jobs` ((workload, tokens) each), at most inflight[i] at a time while job i waits to start.
    Returns tokens/s on the simulated clock and what the steps did."""
    rng = random.Random(seed)
    ctl = controller if controller is not None else (LoadController(forward_rows=costs.computed_rows) if setting.auto else None)
    drafter = _Drafter()
    waiting = list(enumerate(jobs))
    running: list[_Req] = []
    clock = tokens = steps = drafted_total = 0.0
    while waiting or running:
        joined = 0
        while waiting and len(running) < inflight[min(waiting[0][0], len(inflight) - 1)]:
            joined += 1
            i, (work, n) = waiting.pop(0)
            running.append(_Req(f"r{i}", work.request_alpha(random.Random(seed * 100003 + i)), work, n))
        rooms = [max(0, r.left - 1) for r in running]
        uncapped = [min(setting.max_draft, room) for room in rooms]
        windows = list(uncapped)
        # auto: AdaEDL stops a draft only where one request drafts (tandem/spec/request.py says why)
        adaedl = setting.adaedl and (not setting.auto or len(running) == 1)
        if ctl is not None:
            ctl.decide([Candidate(r.rid, w, adaedl, False) for r, w in zip(running, windows)])
            windows = [w if ctl.length(r.rid) is None else min(w, ctl.length(r.rid)) for r, w in zip(running, windows)]
        ents, positions = drafter.propose(running, windows, adaedl, rng)
        rounds, rows, emitted, accepted_all = [], 0, 0, []
        for r, w, u, e in zip(running, windows, uncapped, ents):
            drafted = len(e)
            accepted = 0
            while accepted < drafted and rng.random() < r.token(accepted, rng):
                accepted += 1
            gained = min(accepted + 1, r.left)
            del r.pending[: accepted + 1]
            r.left -= gained
            emitted += gained
            rows += drafted + 1
            drafted_total += drafted
            accepted_all.append(accepted)
            rounds.append(Round(r.rid, drafted, accepted, drafted, w < u, adaedl))
        drafting = sum(x.drafted > 0 for x in rounds)
        query = max(x.drafted for x in rounds) + 1
        draft_s, rest_s = costs.step(len(running), rows, drafting, positions, rng, joined, query)
        drafter.update(running, ents, accepted_all, windows, draft_s, rest_s, positions, joined > 0)
        clock += draft_s + rest_s
        tokens += emitted
        steps += 1
        if ctl is not None:
            ctl.observe(StepObservation(len(running), rows, drafting, positions, draft_s, rest_s,
                                        emitted=emitted, step_s=draft_s + rest_s, joined=joined,
                                        forward_rows=costs.computed_rows(len(running), query)), rounds)
        for r in [r for r in running if r.left <= 0]:
            running.remove(r)
            if ctl is not None:
                ctl.finish(r.rid)
    return {"tokens": int(tokens), "seconds": clock, "tokens_per_s": tokens / clock, "steps": int(steps),
            "drafted_per_step": drafted_total / steps}


def _run(setting: Setting, costs: str, jobs: list, inflight: list[int], seed: int, controllers: dict) -> dict:
    """One row; an auto setting keeps its controller across the run, as a serving lane (and
    adaptive_bench.py) does."""
    ctl = controllers.setdefault(setting.name, LoadController(forward_rows=COSTS[costs].computed_rows)) if setting.auto else None
    return simulate(setting, COSTS[costs], jobs, inflight, seed, controller=ctl)


def cells(costs: str, requests: int, tokens: int, concurrency: list[int], workloads: list[str], seed: int,
          controllers: dict) -> list[dict]:
    """Every setting in every (workload, concurrency) cell: tokens/s and auto / best static.
    A cell runs at least 4n requests, so that n are in flight for most of it, of tokens/2 to
    tokens tokens each."""
    out, rng = [], random.Random(seed)
    for wname in workloads:
        for n in concurrency:
            # lengths spread as a service's are (all equal, requests would join in waves)
            jobs = [(WORKLOADS[wname], rng.randint(tokens // 2, tokens)) for _ in range(max(requests, 4 * n))]
            rows = {s.name: _run(s, costs, jobs, [n], seed, controllers) for s in SETTINGS}
            out.append(_cell(f"{wname} n={n}", rows))
    return out


def mixed(costs: str, requests: int, tokens: int, ramp: tuple[int, ...], seed: int, controllers: dict) -> dict:
    """Every workload in one stream, the load ramping through `ramp`."""
    rng = random.Random(seed)
    names = sorted(WORKLOADS)
    jobs = [(WORKLOADS[rng.choice(names)], rng.randint(tokens // 4, tokens * 2)) for _ in range(requests)]
    per = max(1, requests // len(ramp))
    inflight = [ramp[min(i // per, len(ramp) - 1)] for i in range(requests)]
    rows = {s.name: _run(s, costs, jobs, inflight, seed, controllers) for s in SETTINGS}
    return _cell("mixed ramp " + "-".join(map(str, ramp)), rows)


def _cell(name: str, rows: dict) -> dict:
    auto = rows["auto (default)"]["tokens_per_s"]
    static = {k: v["tokens_per_s"] for k, v in rows.items() if not k.startswith("auto")}
    best = max(static, key=static.get)
    return {"cell": name, "rows": rows, "best_static": best, "auto_vs_best": auto / static[best],
            "auto_vs_ar": auto / static["ar"]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--costs", default="h200_t0", choices=sorted(COSTS))
    p.add_argument("--requests", type=int, default=128)
    p.add_argument("--tokens", type=int, default=128)
    p.add_argument("--concurrency", default="1,4,16,64")
    p.add_argument("--workloads", default=",".join(WORKLOADS))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--seeds", type=int, default=1, help="runs (seed, seed+1, ...) whose tokens/s are averaged")
    p.add_argument("--out", type=Path)
    a = p.parse_args(argv)
    runs = []
    for seed in range(a.seed, a.seed + a.seeds):
        controllers: dict[str, LoadController] = {}  # one per run, as a lane keeps its own
        run = cells(a.costs, a.requests, a.tokens, [int(x) for x in a.concurrency.split(",")],
                    a.workloads.split(","), seed, controllers)
        run.append(mixed(a.costs, a.requests * 2, a.tokens, (1, 4, 16, 64, 16, 4, 1), seed, controllers))
        runs.append(run)
    results = [_cell(c["cell"], {k: {**v, "tokens_per_s": sum(r[i]["rows"][k]["tokens_per_s"] for r in runs) / len(runs)}
                                 for k, v in c["rows"].items()}) for i, c in enumerate(runs[0])]
    names = [s.name for s in SETTINGS]
    print(f"simulated lane, costs {a.costs}: tokens/s (simulated clock, mean of {a.seeds} run(s))")
    print(f"{'cell':28s}" + "".join(f"{n[:14]:>15s}" for n in names) + f"{'auto/best':>11s}{'auto/ar':>9s}")
    for c in results:
        print(f"{c['cell']:28s}" + "".join(f"{c['rows'][n]['tokens_per_s']:15.0f}" for n in names)
              + f"{c['auto_vs_best']:11.2f}{c['auto_vs_ar']:9.2f}")
    worst = min(results, key=lambda c: c["auto_vs_best"])
    print(f"worst cell: {worst['cell']}: auto {worst['auto_vs_best']:.2f}x the best static ({worst['best_static']})")
    if a.out:
        a.out.write_text(json.dumps({"args": vars(a) | {"out": str(a.out)}, "costs": asdict(COSTS[a.costs]),
                                     "config": asdict(LoadControlConfig()), "cells": results}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
