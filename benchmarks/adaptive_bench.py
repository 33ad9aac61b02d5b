"""Does adaptive speculation (`auto`) beat every fixed setting? Cells long enough to tell.

    python benchmarks/adaptive_bench.py --target /tmp/bench/target --draft /tmp/bench/draft     # GPU
    python benchmarks/adaptive_bench.py --device cpu --dtype float32 --requests 4 --max-tokens 12 \
        --concurrency 1,2 --mixed-scale 0.1                                                   # smoke run

Each cell (domain x temperature x concurrency) runs `--requests` requests, at least `--per-slot` x n (held-out code, or
English instructions: `benchmarks/data/serve_prompts.json`) of `--max-tokens`/2 to `--max-tokens` tokens, n at a time
(continuous batching: a finished request's place goes to the next), once per setting: AR, SD
k=3/5/7/8 (7: the longest draft whose verify fits the CUDA graphs' query bucket of 8), PEARL
γ=4/6 and auto. Then a **mixed** run: requests of every temperature and domain together while
the load ramps 1 → 4 → 16 → 64 → 16 → 4 → 1 requests in flight, once per setting, where no fixed
length can be right for every request. Per row: tokens/s, over the whole row and in its steady
part (the steps that ran n requests while more waited: what a lane at that load serves; a cell's
ratios compare these), TTFT, step time p50 / p99
/ max, inter-token latency p50 / p99 (per token, between a request's emissions), and whether any
step took over 3x the row's median (a stall). The goals (the default vs the best fixed setting of
each cell and of the mixed run, vs AR) are computed side by side in this run. Prints a table,
writes JSON (rewritten after every row) and a plot of the ratios.
"""
from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))

import gpu_bench as gb  # noqa: E402  (shared: loading, graphs, the report, the heap freeze)
import torch  # noqa: E402

from tandem.kernels.warmup import freeze_heap, record_compiles, warm_kernels  # noqa: E402
from tandem.params import SamplingParams, SpecParams  # noqa: E402
from tandem.spec.batch import SpecBatch  # noqa: E402
from tandem.spec.load_control import LoadController  # noqa: E402

AUTO, AR = "auto (default)", "tandem ar"
SETTINGS = [(AR, SpecParams("ar"), False), ("sd k=3", SpecParams("sd", 3, adaedl=False), False),
            ("sd k=5", SpecParams("sd", 5, adaedl=False), False), ("sd k=7", SpecParams("sd", 7, adaedl=False), False),
            ("sd k=8", SpecParams("sd", 8, adaedl=False), False),
            ("pearl γ=4", SpecParams("pearl", 4, adaedl=False), True),
            ("pearl γ=6", SpecParams("pearl", 6, adaedl=False), True),
            (AUTO, SpecParams("auto", 16, adaedl=True), False)]
RAMP = (1, 4, 16, 64, 16, 4, 1)


class Runner:
    """Drives one pair: each setting keeps its drafter, auto its controller, for the whole run
    (as a lane that keeps serving does)."""

    def __init__(self, b: gb.Bench) -> None:
        self.b = b
        self.drafters = {name: gb.make_drafter(b, overlap) for name, _, overlap in SETTINGS}
        self.controller = LoadController()
        self.compiles = record_compiles()  # Triton kernels compiled since: a slow step's suspect

    def run(self, name: str, spec: SpecParams, jobs: list[tuple[list[int], SamplingParams]], inflight: list[int]) -> dict:
        """The jobs, at most inflight[i] at a time while job i waits to start; timed per step and emission."""
        b = self.b
        batch = SpecBatch(b.pair.target, self.drafters[name], b.pair.stop_ids, self.controller if name == AUTO else None,
                          control_all=False)
        starts, first, last, gaps, steps, tokens = {}, {}, {}, [], [], 0
        joined, caps, trajectory, step_caps = [], Counter(), [], []  # per step: a request joined; auto's cap
        compiled, captured = [], []  # per step: Triton compiles and CUDA graph captures in it
        split, fed = [], []  # per step: (drafting, verifying) seconds, from the batch's timing sums; joins
        totals = Counter()  # the finished requests' stats: what drafting gave (where tokens were lost)
        runners = [r for r in (gb.graphs_of(b.pair.target), gb.graphs_of(b.pair.draft)) if r is not None]
        held = lambda: sum(len(r.graphs) for r in runners)  # noqa: E731
        waiting = list(enumerate(jobs))
        # steady load: steps that ran the row's full n while more requests waited (the whole row
        # also holds the ramp-up and the drain, whose batches are smaller)
        steady_tokens, steady_s = 0, 0.0
        b.sync()
        t0 = time.perf_counter()
        mark = t0
        while waiting or len(batch):
            joins = 0
            while waiting and batch.free_slots and len(batch) < inflight[waiting[0][0]]:
                i, (prompt, sampling) = waiting.pop(0)
                batch.add(str(i), prompt, sampling, spec)
                starts[str(i)] = time.perf_counter()
                joins += 1
            before, graphs = len(self.compiles), held()
            sums = (batch.timing.sums.draft, batch.timing.sums.verify)
            size = len(batch)
            s = time.perf_counter()
            emissions = batch.step()
            now = time.perf_counter()
            steps.append(now - s)
            full = bool(waiting) and size >= inflight[waiting[0][0]]
            if full:
                steady_tokens += sum(len(e.token_ids) for e in emissions)
                steady_s += now - mark
            mark = now
            split.append((batch.timing.sums.draft - sums[0], batch.timing.sums.verify - sums[1], size))
            joined.append(joins > 0)
            fed.append(joins)
            compiled.append(self.compiles[before:])
            captured.append(held() - graphs)
            if name == AUTO:
                cap = "none" if self.controller.cap is None else str(self.controller.cap)
                step_caps.append(cap)
                caps[cap] += 1
                if trajectory and trajectory[-1][0] == cap:  # runs of steps at one cap, in order
                    trajectory[-1][1] += 1
                else:
                    trajectory.append([cap, 1])
            for e in emissions:
                if e.finish_reason is not None:
                    totals.update({k: getattr(e.stats, k) for k in ("steps", "drafted", "checked", "accepted", "generated")})
                n = len(e.token_ids)
                tokens += n
                if n and e.rid not in first:
                    first[e.rid] = now - starts[e.rid]
                elif n:
                    gaps += [(now - last[e.rid]) / n] * n
                if n:
                    last[e.rid] = now
        b.sync()
        seconds = time.perf_counter() - t0
        median = statistics.median(steps)
        slow = [(x > 3 * median, j) for x, j in list(zip(steps, joined))[len(steps) // 10:]]
        row = {"name": name, "tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds,
               "steady_tokens_per_s": steady_tokens / steady_s if steady_s else None, "steady_s": steady_s,
               "ttft_ms": _pcts(list(first.values())), "step_ms": _pcts(steps, with_max=True),
               "itl_ms": _pcts(gaps), "stalls": sum(x for x, _ in slow),
               "stalls_with_a_join": sum(x and j for x, j in slow), "steps": len(steps),
               "join_steps": sum(joined), "join_step_ms": _pcts([x for x, j in zip(steps, joined) if j]),
               "other_step_ms": _pcts([x for x, j in zip(steps, joined) if not j]),
               # where join steps and the others spend their time: drafting and verifying (mean ms)
               "split_ms": {kind: _split([x for x, j in zip(split, joined) if j == want])
                            for kind, want in (("join", True), ("other", False))},
               "compiles": [name for c in compiled for name in c], "captures": sum(captured),
               # per request and verify: tokens drafted, judged, accepted, emitted
               "per_verify": {k: totals[k] / max(totals["steps"], 1) for k in ("drafted", "checked", "accepted", "generated")},
               # the slowest steps and what they did: a join, Triton compiles, CUDA graph captures
               "slowest": [{"step": i, "ms": 1000 * steps[i], "joined": joined[i], "compiled": compiled[i],
                            "captured": captured[i]}
                           for i in sorted(range(len(steps)), key=steps.__getitem__)[-3:]]}
        if name == AUTO:  # what the controller chose and what it believed
            state = self.controller.state()
            # every step: ms, drafting ms, verifying ms, requests, prompts fed, cap
            row["trace"] = [[round(1000 * x, 3), round(1000 * d, 3), round(1000 * v, 3), n, j, c]
                            for x, (d, v, n), j, c in zip(steps, split, fed, step_caps)]
            row["controller"] = {"caps": dict(caps), "trajectory": trajectory, **{k: state.get(k) for k in (
                "rest_ms", "draft_position_ms", "draft_step_ms", "lane_acceptance", "measured_tokens_per_s")}}
        return row


def add(report: gb.Report, section: str, row: dict) -> None:
    """Keep a row (the JSON is rewritten at once) and print it."""
    report.rows(section).append(row)
    report.save()
    where = f"{row['domain']} T={row['temperature']:g} n={row['concurrency']}" if section == "cells" else "mixed"
    st, itl = row["step_ms"], row["itl_ms"]
    steady = row.get("steady_tokens_per_s")
    print(f"[{report.budget.elapsed():6.1f}s] {where:<18} {row['name']:<16} {row['tokens_per_s']:9.1f} tok/s "
          f"(steady {steady or 0:9.1f})  step p50/p99/max "
          f"{st.get('p50', 0):6.2f}/{st.get('p99', 0):6.2f}/{st.get('max', 0):7.2f} ms  ITL p50/p99 "
          f"{itl.get('p50', 0):6.2f}/{itl.get('p99', 0):6.2f} ms  stalls {row['stalls']}", flush=True)


def _split(steps: list[tuple[float, float, int]]) -> dict:
    """Mean drafting and verifying milliseconds and requests of these steps."""
    n = max(len(steps), 1)
    return {"draft": 1000 * sum(d for d, _, _ in steps) / n, "verify": 1000 * sum(v for _, v, _ in steps) / n,
            "requests": sum(r for _, _, r in steps) / n, "steps": len(steps)}


def _pcts(values: list[float], with_max: bool = False) -> dict:
    if not values:
        return {}
    v = sorted(values)
    pick = lambda q: 1000 * v[min(len(v) - 1, int(q * len(v)))]  # noqa: E731
    out = {"p50": pick(0.5), "p99": pick(0.99)}
    if with_max:
        out["max"] = 1000 * v[-1]
    return out


def cells(args, b: gb.Bench, runner: Runner, prompts: dict, report: gb.Report) -> None:
    rng = random.Random(args.seed)
    for domain in args.domains.split(","):
        pool = prompts[domain]
        for t in (float(x) for x in args.temperatures.split(",")):
            for n in args.concurrency:
                # n in flight for most of the row; lengths spread as a service's are (all equal,
                # requests that decode in lockstep would join in waves: one prefill step per wave)
                jobs = [(pool[rng.randrange(len(pool))],
                         SamplingParams(rng.randint(args.max_tokens // 2, args.max_tokens), t, seed=i, ignore_eos=True))
                        for i in range(max(args.requests, args.per_slot * n))]
                warm = [(p, SamplingParams(min(16, args.max_tokens), t, seed=i, ignore_eos=True)) for i, (p, _) in enumerate(jobs[:n])]
                for name, spec, _ in SETTINGS:
                    if b.budget.left() <= 0:
                        report.skip(f"{domain} T={t:g} n={n} {name}", "deadline reached")
                        continue
                    runner.run(name, spec, warm, [n] * len(warm))  # untimed: the setting's shapes, and auto learns
                    row = runner.run(name, spec, jobs, [n] * len(jobs))
                    add(report, "cells", {**row, "domain": domain, "temperature": t, "concurrency": n})


def mixed(args, b: gb.Bench, runner: Runner, prompts: dict, report: gb.Report) -> None:
    """Every setting over the same ramping mixed load."""
    rng = random.Random(args.seed + 7)
    jobs, inflight = [], []
    for n in RAMP:
        for _ in range(max(2, int(args.mixed_scale * 2 * n))):
            domain = rng.choice(("code", "nl"))
            t = rng.choice((0.0, 0.7, 1.0))
            jobs.append((rng.choice(prompts[domain]), SamplingParams(args.max_tokens, t, seed=len(jobs), ignore_eos=True)))
            inflight.append(n)
    for name, spec, _ in SETTINGS:
        if b.budget.left() <= 0:
            report.skip(f"mixed {name}", "deadline reached")
            continue
        add(report, "mixed", {**runner.run(name, spec, jobs, inflight), "requests": len(jobs)})


def goals(data: dict) -> dict:
    """auto against the best fixed setting and AR, per cell and in the mixed run."""
    by_cell, worst = {}, {}
    groups: dict = {}
    for r in data.get("cells", {}).get("rows", []):
        # a cell compares settings at its load: steady tokens/s where the row had a steady part
        groups.setdefault((r["domain"], r["temperature"], r["concurrency"]), {})[r["name"]] = (
            r.get("steady_tokens_per_s") or r["tokens_per_s"])
    for key, rates in groups.items():
        if AUTO not in rates or AR not in rates:
            continue
        fixed = {k: v for k, v in rates.items() if k != AUTO}
        best = max(fixed, key=fixed.get)
        cell = f"{key[0]} T={key[1]:g} n={key[2]}"
        by_cell[cell] = {"auto_vs_best": rates[AUTO] / fixed[best], "best": best, "auto_vs_ar": rates[AUTO] / rates[AR]}
        for k in ("auto_vs_best", "auto_vs_ar"):
            worst[k] = min(worst.get(k, float("inf")), by_cell[cell][k])
    mixed_rates = {r["name"]: r["tokens_per_s"] for r in data.get("mixed", {}).get("rows", [])}
    if AUTO in mixed_rates and len(mixed_rates) > 1:
        fixed = {k: v for k, v in mixed_rates.items() if k != AUTO}
        worst["mixed_auto_vs_best"] = mixed_rates[AUTO] / max(fixed.values())
    targets = {"auto_vs_best": 0.98, "auto_vs_ar": 1.0, "mixed_auto_vs_best": 1.10}
    return {"by_cell": by_cell, **{k: {"ratio": v, "goal": targets[k], "met": v >= targets[k]} for k, v in worst.items()}}


def plot(data: dict, out: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    cellsd = data["goals"]["by_cell"]
    if not cellsd:
        return
    names = list(cellsd)
    fig, ax = plt.subplots(figsize=(max(8, len(names) * 0.6), 4))
    ax.bar(range(len(names)), [cellsd[c]["auto_vs_best"] for c in names], label="auto / best fixed")
    ax.plot(range(len(names)), [cellsd[c]["auto_vs_ar"] for c in names], "ko", label="auto / AR")
    ax.axhline(0.98, color="r", linestyle="--", linewidth=1)
    ax.set_xticks(range(len(names)), names, rotation=70, fontsize=7)
    ax.set_ylabel("ratio")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=100)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--target", default="tandem:tiny/target")
    ap.add_argument("--draft", default="tandem:tiny/draft")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--requests", type=int, default=32, help="requests per cell, at least (each setting runs the same ones)")
    ap.add_argument("--per-slot", type=int, default=8, help="requests per cell, at least this many per request in flight")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--domains", default="code,nl")
    ap.add_argument("--temperatures", default="0,0.7,1")
    ap.add_argument("--concurrency", default="1,4,16,64", type=lambda s: [int(x) for x in s.split(",")])
    ap.add_argument("--sections", default="cells,mixed")
    ap.add_argument("--mixed-scale", type=float, default=1.0, help="requests per ramp phase: scale x 2n")
    ap.add_argument("--deadline-s", type=float, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(REPO / "benchmarks/results/adaptive_bench.json"))
    args = ap.parse_args(argv)
    budget = gb.Budget(args.deadline_s)
    report = gb.Report(Path(args.out), budget)
    gb._quiet_transformers()
    prompts_text = json.loads((REPO / "benchmarks/data/serve_prompts.json").read_text())
    gargs = argparse.Namespace(target=args.target, draft=args.draft, device=args.device, dtype=args.dtype,
                               prompts=1, concurrency=[max(max(args.concurrency), max(RAMP))], max_tokens=args.max_tokens,
                               nl_prompts=1, draft_device=None)
    b = gb.load(gargs, report, budget)
    tok = b.pair.tokenizer
    prompts = {"code": [tok.encode(p, add_special_tokens=False) for p in prompts_text["code"]],
               "nl": [tok.encode(p, add_special_tokens=False) for p in prompts_text["instructions"]]}
    longest = max(len(p) for ps in prompts.values() for p in ps)
    prompts = {k: [p for p in ps if len(p) + args.max_tokens + 40 <= b.pair.target.max_context] or ps
               for k, ps in prompts.items()}
    sizes = sorted({s for s in (1, 2, 4, 8, 16, 32, 64, 128) if s <= max(args.concurrency + list(RAMP))})
    report.data["meta"] = {"command": " ".join(["python", "benchmarks/adaptive_bench.py", *(argv or sys.argv[1:])]),
                           "device": gb.device_name(b.pair.target.device), "longest_prompt": longest,
                           "graph_warmup_s": gb.warm_graphs(b, sizes)}
    warm_kernels(b.pair.target.vocab_size, b.pair.target.device)
    report.data["meta"]["frozen_objects"] = freeze_heap()
    runner = Runner(b)
    for section in args.sections.split(","):
        {"cells": cells, "mixed": mixed}[section](args, b, runner, prompts, report)
    report.data["goals"] = goals(report.data)
    report.save()
    plot(report.data, Path(args.out))
    for cell, g in report.data["goals"]["by_cell"].items():
        print(f"cell {cell}: auto {g['auto_vs_best']:.2f}x the best fixed ({g['best']}), {g['auto_vs_ar']:.2f}x AR")
    for k, g in report.data["goals"].items():
        if k != "by_cell":
            print(f"goal {k}: {g['ratio']:.2f}x (goal {g['goal']}x, {'met' if g['met'] else 'missed'})")
    print(f"wrote {args.out} in {budget.elapsed():.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
