"""Where a step's time goes, and whether what a process does at start changes it.

    python benchmarks/step_profile.py --target /tmp/bench/target --draft /tmp/bench/draft   # GPU, bf16
    python benchmarks/step_profile.py --device cpu --dtype float32 --max-tokens 8           # smoke run

A process that serves does several things before its first step: it compiles Triton's kernels
for every specialization (tandem/kernels/warmup.py), captures hundreds to thousands of CUDA
graphs, holds more KV slots and freezes its start-up heap. Any of them can change what a step
costs afterwards. This script times the same rows in one process after each of those in turn
(cumulative phases), so the step that changes them names itself:

  few_slots    the pair loaded with --few-slots KV slots (cluster_gpu's in-process run had 8),
               one untimed run of each row (lazy graphs, lazy Triton); then it is dropped
  fresh        the pair loaded with --max-slots slots (gpu_bench's: its largest concurrency)
  kernels      + warm_kernels (every rejection-sampler / softmax-entropy specialization)
  graphs       + every CUDA graph a lane captures at start (GraphRunner.capture_at_start)
  gc_frozen    + gc.freeze(): the collector stops walking the start-up objects (vLLM does this
               after capturing its graphs)

Rows: AR at T=0 and T=1, SD k=5 at T=1, batch 1. Each row reports ms per step split as the
step function reports it (draft / verify / the rest: judging, applying, bookkeeping), and for
AR at T=1 a torch.profiler table of the ops that took the most host and device time. Prints a
table and writes JSON.
"""
from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # run as a script from a checkout that is not pip-installed
    sys.path.insert(0, str(REPO))

from tandem.actors.drafter import LocalDrafter
from tandem.actors.offline import run_batch
from tandem.engine.pair import load_pair
from tandem.kernels.warmup import warm_kernels
from tandem.params import SamplingParams, SpecParams
from tandem.spec.batch import SpecBatch
from tandem.zoo import heldout_prompts

PHASES = ("few_slots", "fresh", "kernels", "graphs", "gc_frozen")
ROWS = (("ar", 0, 0.0), ("ar", 0, 1.0), ("sd", 5, 1.0))  # (mode, max_draft, temperature)


def run_row(pair, prompts, mode: str, max_draft: int, temperature: float, max_tokens: int) -> dict:
    """The prompts one after another at batch 1 on one SpecBatch; its step timing and tokens/s."""
    batch = SpecBatch(pair.target, LocalDrafter(pair.draft, None, acceptance=pair.acceptance), pair.stop_ids)
    spec = SpecParams(mode, max_draft, adaedl=False)
    tokens, start = 0, time.perf_counter()
    for i, p in enumerate(prompts):
        done = run_batch(batch, [p], [SamplingParams(max_tokens, temperature, seed=i, ignore_eos=True)], spec)
        tokens += sum(len(d.token_ids) for d in done)
    _sync()
    t = batch.timing.as_dict()
    rest = t["total_ms"] - t["draft_ms"] - t["verify_ms"] - t["wait_ms"]
    return {"tokens_per_s": tokens / (time.perf_counter() - start), "step_ms": t["total_ms"],
            "draft_ms": t["draft_ms"], "verify_ms": t["verify_ms"], "rest_ms": rest, "steps": t["steps"]}


def profile_row(pair, prompts, max_tokens: int, top: int) -> list[dict]:
    """torch.profiler over AR at T=1: the ops with the most self host time, with their device time."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=activities) as prof:
        run_row(pair, prompts[:1], "ar", 0, 1.0, max_tokens)
    rows = []
    for e in sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)[:top]:
        device_us = getattr(e, "self_device_time_total", getattr(e, "self_cuda_time_total", 0.0))
        rows.append({"op": e.key, "calls": e.count, "self_host_us": e.self_cpu_time_total, "self_device_us": device_us})
    return rows


def enter(phase: str, pair, max_draft: int) -> str:
    """Do what this phase adds; say what it did."""
    if phase == "kernels":
        n = warm_kernels(pair.target.vocab_size, pair.target.device)
        return f"{n} Triton launches"
    if phase == "graphs":
        made = []
        for engine, draft in ((pair.target, False), (pair.draft, True)):
            runner = getattr(engine, "graphs", None)
            if runner is not None and runner.capture:
                made.append(runner.capture_at_start(max_draft, draft))
        return f"{made} graphs held (target, draft)" if made else "no CUDA graphs here"
    if phase in ("few_slots", "fresh"):
        return f"{pair.target.free_slots} KV slots"
    if phase == "gc_frozen":
        gc.collect()
        gc.freeze()
        return f"{gc.get_freeze_count()} objects frozen"


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target", default="tandem:tiny/target")
    ap.add_argument("--draft", default="tandem:tiny/draft")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--prompts", type=int, default=4, help="held-out code prompts (gpu_bench's first ones)")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--max-draft", type=int, default=16, help="the window capture_at_start covers")
    ap.add_argument("--top", type=int, default=15, help="profiler rows kept")
    ap.add_argument("--max-slots", type=int, default=64, help="KV slots of the pair the later phases use")
    ap.add_argument("--few-slots", type=int, default=8, help="KV slots of the first phase's pair")
    ap.add_argument("--phases", default=",".join(PHASES), help="the first n of " + ",".join(PHASES))
    ap.add_argument("--out", default="step_profile.json")
    args = ap.parse_args(argv)
    phases = PHASES[: len(args.phases.split(","))]
    if list(phases) != args.phases.split(","):
        ap.error(f"--phases: a prefix of {','.join(PHASES)} (they build on each other)")

    def load(slots: int):
        return load_pair(args.target, args.draft, device=args.device, dtype=args.dtype, max_slots=slots)

    pair = load(args.few_slots)
    prompts = [pair.tokenizer.encode(p, add_special_tokens=False) for p in heldout_prompts(64, seed=1)[: args.prompts]]
    result = {"device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu", "args": vars(args), "phases": []}
    print(f"{'phase':<10} {'row':<10} {'tok/s':>8} {'step':>7} {'draft':>7} {'verify':>7} {'rest':>7}  (ms per step)")
    for phase in phases:
        if phase == "fresh":  # the few-slot pair goes; the phases after this one build on this pair
            del pair
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            pair = load(args.max_slots)
        note = enter(phase, pair, args.max_draft)
        print(f"[{phase}: {note}]", flush=True)
        rows = []
        for mode, k, temp in ROWS:
            run_row(pair, prompts[:1], mode, k, temp, args.max_tokens)  # untimed: lazy graphs and kernels
            r = {"mode": mode, "max_draft": k, "temperature": temp, **run_row(pair, prompts, mode, k, temp, args.max_tokens)}
            rows.append(r)
            name = f"{mode}{f' k={k}' if k else ''} T={temp:g}"
            print(f"{phase:<10} {name:<10} {r['tokens_per_s']:>8.1f} {r['step_ms']:>7.3f} {r['draft_ms']:>7.3f} "
                  f"{r['verify_ms']:>7.3f} {r['rest_ms']:>7.3f}", flush=True)
        ops = profile_row(pair, prompts, args.max_tokens, args.top)
        result["phases"].append({"phase": phase, "did": note, "rows": rows, "ar_t1_top_ops": ops})
    print("\nAR T=1, the ops with the most self host time per phase (per step: calls, us host / device)")
    for ph in result["phases"]:
        steps = next(r["steps"] for r in ph["rows"] if r["mode"] == "ar" and r["temperature"] > 0) / max(1, args.prompts)
        cells = [f"{o['op'][:24]} {o['calls'] / steps:.1f}x {o['self_host_us'] / steps:.0f}/{o['self_device_us'] / steps:.0f}" for o in ph["ar_t1_top_ops"][:6]]
        print(f"{ph['phase']:<10} " + " | ".join(cells))
    gc.unfreeze()  # where main() runs inside a longer process (the tests)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
