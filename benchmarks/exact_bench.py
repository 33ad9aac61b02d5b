"""What exact mode costs, and whether greedy output then stops depending on mode and batch.

    python benchmarks/exact_bench.py --target /tmp/bench/target --draft /tmp/bench/draft     # GPU, bf16
    python benchmarks/exact_bench.py --device cpu --dtype float32 --prompts 4 --max-tokens 8 \
        --concurrency 1,2                                                                     # smoke run

One pair, targets built from the same weights: the default engine and exact mode
(tandem/kernels/exact.py) with each `--exact-rows` block size. For each, AR and SD k=5 (greedy) at each concurrency (n=1: the
prompts one after another; n>1: n at a time, a continuous batch), tokens/s over wall time. Then,
per target, how many prompts' greedy outputs equal AR's at batch 1 (the reference) in every
other row: exact mode's goal is all of them. Prints a table and writes JSON.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))

import gpu_bench as gb  # noqa: E402  (shared: loading, graphs, the report, the heap freeze)

from tandem.actors.offline import generate  # noqa: E402
from tandem.engine.llama import LlamaEngine  # noqa: E402
from tandem.engine.pair import ModelPair  # noqa: E402
from tandem.kernels.warmup import freeze_heap, warm_kernels  # noqa: E402
from tandem.params import SamplingParams, SpecParams  # noqa: E402

MODES = {"ar": SpecParams("ar"), "sd k=5": SpecParams("sd", 5, adaedl=False)}


def run_row(b: gb.Bench, pair: ModelPair, spec: SpecParams, prompts: list[list[int]], n: int) -> tuple[float, list]:
    """Tokens/s and the outputs of the prompts, n at a time."""
    greedy = SamplingParams(max_tokens=b.args.max_tokens, temperature=0.0)
    outputs = []
    b.sync()
    start = time.perf_counter()
    for i in range(0, len(prompts), n):
        outputs += [c.token_ids for c in generate(pair, prompts[i : i + n], greedy, spec)]
    b.sync()
    seconds = time.perf_counter() - start
    return sum(map(len, outputs)) / seconds, outputs


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--target", default="tandem:tiny/target")
    ap.add_argument("--draft", default="tandem:tiny/draft")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--prompts", type=int, default=64, help="held-out code prompts (n=1 rows run the first 16)")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--concurrency", default="1,64")
    ap.add_argument("--exact-rows", default="64,128", help="exact targets to build: rows per matmul block of each")
    ap.add_argument("--tiles", action=argparse.BooleanOptionalAction, default=None,
                    help="also an exact target whose matmuls are one fixed-tile Triton launch each (exact-tiles; "
                    "default: on CUDA)")
    ap.add_argument("--deadline-s", type=float, default=None)
    ap.add_argument("--out", default=str(REPO / "benchmarks/results/exact_bench.json"))
    args = ap.parse_args(argv)
    if args.tiles and args.device != "cuda":
        ap.error("--tiles needs --device cuda: off CUDA the fixed-tile matmul falls back to the row blocks")
    concurrency = [int(x) for x in args.concurrency.split(",")]
    budget = gb.Budget(args.deadline_s)
    report = gb.Report(Path(args.out), budget)
    gb._quiet_transformers()
    gargs = argparse.Namespace(target=args.target, draft=args.draft, device=args.device, dtype=args.dtype,
                               prompts=args.prompts, concurrency=concurrency, max_tokens=args.max_tokens,
                               nl_prompts=1, draft_device=None)
    b = gb.load(gargs, report, budget)
    default = b.pair
    pairs = {"default": default}
    sizes = [s for s in (1, 2, 4, 8, 16, 32, 64, 128) if s <= max(concurrency)]  # a batch shrinks as it ends
    for rows in [int(x) for x in args.exact_rows.split(",")]:  # the same weights, fused again
        target = LlamaEngine(default.target.model, max_slots=default.target.max_slots,
                             max_context=default.target.max_context, exact=True, exact_rows=rows)
        pairs[f"exact{rows}"] = ModelPair(default.tokenizer, target, default.draft)
    if args.tiles if args.tiles is not None else default.target.device.type == "cuda":
        target = LlamaEngine(default.target.model, max_slots=default.target.max_slots,
                             max_context=default.target.max_context, exact=True, exact_tiles=True)
        pairs["exact-tiles"] = ModelPair(default.tokenizer, target, default.draft)
    report.data["meta"] = {"command": " ".join(["python", "benchmarks/exact_bench.py", *(argv or sys.argv[1:])]),
                           "device": gb.device_name(default.target.device), "dtype": args.dtype,
                           "graph_warmup_s": sum(gb.warm_graphs(dataclasses.replace(b, pair=p), sizes,
                                                                draft_steps=range(1, 6), sampled=(False,))
                                                 for p in pairs.values())}
    warm_kernels(default.target.vocab_size, default.target.device)
    freeze_heap()
    prompts = b.code[: args.prompts]
    rows = report.rows("rows")
    skipped, took = report.data.setdefault("skipped", []), 0.0
    for name, pair in pairs.items():
        # a target runs whole (its rows compare with its own AR) or not at all; the default always
        if took and budget.left() < took:
            skipped.append(name)
            print(f"skipping {name}: {budget.left():.0f} s left, a target took {took:.0f} s", flush=True)
            continue
        start = budget.elapsed()
        outputs = {}
        for mode, spec in MODES.items():
            for n in concurrency:
                batch = prompts[:16] if n == 1 else prompts
                rate, outputs[(mode, n)] = run_row(b, pair, spec, batch, n)
                rows.append({"name": f"{name} {mode}", "target": name, "mode": mode, "concurrency": n,
                             "prompts": len(batch), "tokens_per_s": rate})
                report.save()
                print(f"[{budget.elapsed():6.1f}s] {name:<11} {mode:<7} n={n:<3} {rate:9.1f} tok/s", flush=True)
        reference = outputs[("ar", 1)]
        for row in rows[-len(outputs):]:
            out = outputs[(row["mode"], row["concurrency"])]
            row["identical_to_ar_batch_1"] = sum(a == b_ for a, b_ in zip(out, reference))
            row["compared"] = min(len(out), len(reference))
        report.save()
        took = budget.elapsed() - start
    report.save()
    by = {(r["target"], r["mode"], r["concurrency"]): r for r in rows}
    print(f"\n{'target':<11} {'mode':<8} {'n':>4} {'tok/s':>9} {'vs default':>11} {'identical to AR at n=1':>23}")
    for name in [n for n in pairs if n not in skipped]:
        for mode in MODES:
            for n in concurrency:
                r, d = by[(name, mode, n)], by[("default", mode, n)]
                print(f"{name:<11} {mode:<8} {n:>4} {r['tokens_per_s']:>9.0f} {r['tokens_per_s'] / d['tokens_per_s']:>11.2f} "
                      f"{r['identical_to_ar_batch_1']:>17}/{r['compared']}")
    print(f"wrote {args.out} in {budget.elapsed():.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
