"""Side-by-side decoding modes on one pair, one device, one run: AR vs SD vs PEARL vs AdaEDL.

    python benchmarks/modes.py                                  # tiny pair on CPU
    python benchmarks/modes.py --target T --draft D --device cuda --dtype bfloat16

Batch 1, prompts run one after another (latency); held-out stdlib code prompts (tandem.zoo's
held-out split). Prints a table and writes JSON (--out). Greedy outputs of every mode are
checked against AR on the way (lossless), and the run fails loudly if they differ.
"""
from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch
from tqdm import tqdm

from tandem.actors.offline import generate
from tandem.engine.pair import load_pair
from tandem.params import SamplingParams, SpecParams
from tandem.zoo import heldout_prompts

REPO = Path(__file__).resolve().parent.parent
CONFIGS = [
    ("ar", SpecParams("ar")),
    ("sd k=3", SpecParams("sd", 3, adaedl=False)),
    ("sd k=5", SpecParams("sd", 5, adaedl=False)),
    ("sd k=8", SpecParams("sd", 8, adaedl=False)),
    ("sd k=16", SpecParams("sd", 16, adaedl=False)),
    ("sd adaedl (cap 16)", SpecParams("sd", 16, adaedl=True)),
    ("pearl γ=4", SpecParams("pearl", 4, adaedl=False)),
    ("pearl γ=8", SpecParams("pearl", 8, adaedl=False)),
    ("pearl+adaedl (cap 8)", SpecParams("pearl", 8, adaedl=True)),
]


def run_config(pair, prompts, spec, sampling) -> dict:
    outs, stats, start = [], [], time.perf_counter()
    for p in prompts:
        done = generate(pair, [p], sampling, spec)[0]
        outs.append(done.token_ids)
        stats.append(done.stats)
    elapsed = time.perf_counter() - start
    gen = sum(s.generated for s in stats)
    checked = sum(s.checked for s in stats)
    return {"outputs": outs, "tokens": gen, "seconds": elapsed, "tokens_per_s": gen / elapsed,
            "acceptance": sum(s.accepted for s in stats) / checked if checked else 0.0,
            "tokens_per_step": gen / sum(s.steps for s in stats)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target", default="tandem:tiny/target")
    ap.add_argument("--draft", default="tandem:tiny/draft")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=96)
    ap.add_argument("--temperatures", default="0,1")
    ap.add_argument("--out", default=str(REPO / "benchmarks/results/modes_cpu.json"))
    args = ap.parse_args()
    pair = load_pair(args.target, args.draft, device=args.device, dtype=args.dtype, max_slots=1)
    prompts = [pair.tokenizer.encode(p, add_special_tokens=False) for p in heldout_prompts(args.prompts, seed=1)]
    rows = []
    for temp in [float(t) for t in args.temperatures.split(",")]:
        sampling = SamplingParams(args.max_tokens, temp, seed=0, ignore_eos=True)
        ar = None
        for name, spec in tqdm(CONFIGS, desc=f"T={temp}"):
            r = run_config(pair, prompts, spec, sampling)
            ar = ar or r
            if temp == 0 and r["outputs"] != ar["outputs"]:
                raise SystemExit(f"LOSSLESS VIOLATION: {name} differs from AR at T=0")
            rows.append({"temperature": temp, "mode": name, **{k: v for k, v in r.items() if k != "outputs"},
                         "speedup_vs_ar": r["tokens_per_s"] / ar["tokens_per_s"]})
    print_table(rows)
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"device": device, "args": vars(args), "rows": rows}, indent=1))
    print(f"device: {device}; wrote {args.out}")


def print_table(rows) -> None:
    print(f"\n{'T':>3} {'mode':<22} {'accept':>7} {'tok/step':>9} {'tok/s':>8} {'vs AR':>6}")
    for r in rows:
        print(f"{r['temperature']:>3g} {r['mode']:<22} {r['acceptance']:>7.2f} {r['tokens_per_step']:>9.2f} "
              f"{r['tokens_per_s']:>8.1f} {r['speedup_vs_ar']:>6.2f}")


if __name__ == "__main__":
    main()
