"""AdaEDL's stop rules against static draft lengths, timed by a cost model (CPU, no GPU needed).

    python benchmarks/adaedl_model.py                      # tiny pair, costs measured on the H200
    python benchmarks/adaedl_model.py --fixed-ms 2.0 --position-ms 0.22 --program-ms 0.14

Runs each policy on the shipped tiny pair (8 held-out stdlib prompts x 96 tokens, batch 1, T=0
and T=1) and counts what a GPU would pay for: verifier steps, draft positions the device runs
(a fused window runs every position of its piece, whatever is kept), and draft programs. Time =
steps x fixed + positions x per-position + extra programs x per-program, with the defaults from
the H200 run in BENCHMARKS.md (step outside drafting 2.0 ms, 0.22 ms per draft position, 0.14 ms
per extra program). A model, for comparing policies before a GPU is at hand: the GPU tables
are the measurement. The cost rule runs twice: the second pass starts from the acceptance the
first one learned, as a server's lane keeps learning. Prints a table and writes JSON.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch

import tandem.actors.drafter as drafter_module
from tandem.actors.offline import generate
from tandem.engine.pair import load_pair
from tandem.params import SamplingParams, SpecParams
from tandem.spec.adaedl import AdaEDLConfig
from tandem.zoo import heldout_prompts


class Counter:
    """Wraps the drafter's device-program call to count programs and the positions each runs."""

    def __init__(self) -> None:
        self.positions = self.programs = 0
        self._inner = drafter_module.draft_window
        drafter_module.draft_window = self

    def __call__(self, engine, slots, seqs, steps, *args, **kwargs):
        self.positions += max(steps)
        self.programs += 1
        return self._inner(engine, slots, seqs, steps, *args, **kwargs)

    def close(self) -> None:
        drafter_module.draft_window = self._inner


def run(pair, prompts, counter, args, name, spec, adaedl, temperature) -> dict:
    counter.positions = counter.programs = 0
    tokens = steps = 0
    for i, p in enumerate(prompts):
        done = generate(pair, [p], SamplingParams(args.max_tokens, temperature, seed=i, ignore_eos=True), spec, adaedl)[0]
        tokens += done.stats.generated
        steps += done.stats.steps
    extra_programs = max(0, counter.programs - steps)
    ms = steps * args.fixed_ms + counter.positions * args.position_ms + extra_programs * args.program_ms
    return {"name": name, "temperature": temperature, "tokens_per_step": tokens / steps,
            "positions_per_step": counter.positions / steps, "programs_per_step": counter.programs / steps,
            "modelled_ms_per_token": ms / tokens}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target", default="tandem:tiny/target")
    ap.add_argument("--draft", default="tandem:tiny/draft")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=96)
    ap.add_argument("--fixed-ms", type=float, default=2.0, help="a verifier step outside drafting")
    ap.add_argument("--position-ms", type=float, default=0.22, help="one draft position")
    ap.add_argument("--program-ms", type=float, default=0.14, help="one more draft program in a step")
    ap.add_argument("--cost-ratio", type=float, default=None, help="c for the cost rule (default fixed/position)")
    ap.add_argument("--out", default=str(REPO / "benchmarks/results/adaedl_model_cpu.json"))
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    c = args.cost_ratio or args.fixed_ms / args.position_ms
    pair = load_pair(args.target, args.draft, device="cpu", dtype="float32", max_slots=1)
    prompts = [pair.tokenizer.encode(p, add_special_tokens=False) for p in heldout_prompts(args.prompts)]
    counter = Counter()
    try:
        rows = run_all(pair, prompts, counter, args, c)
    finally:
        counter.close()
    Path(args.out).write_text(json.dumps({"args": vars(args), "cost_ratio": c, "rows": rows}, indent=1))
    print(f"wrote {args.out}")
    return 0


def run_all(pair, prompts, counter, args, c: float) -> list[dict]:
    policies = [(f"sd k={k}", SpecParams("sd", k, adaedl=False), None) for k in (3, 5, 8, 16)]
    policies += [("adaedl paper rule (cap 16)", SpecParams("sd", 16, adaedl=True), AdaEDLConfig(stop="paper"))]
    policies += [(f"adaedl cost rule c={c:.1f} (cap 16), pass {n}", SpecParams("sd", 16, adaedl=True),
                  AdaEDLConfig(cost_ratio=c)) for n in (1, 2)]
    rows = []
    print(f"{'T':<3} {'policy':<38} {'tok/step':>8} {'pos/step':>8} {'prog/step':>9} {'ms/token':>8} {'vs AR':>6}")
    for temperature in (0.0, 1.0):
        ar = run(pair, prompts, counter, args, "ar", SpecParams("ar"), None, temperature)
        for name, spec, adaedl in policies:
            r = run(pair, prompts, counter, args, name, spec, adaedl, temperature)
            r["vs_ar"] = ar["modelled_ms_per_token"] / r["modelled_ms_per_token"]
            rows.append(r)
            print(f"{temperature:<3g} {name:<38} {r['tokens_per_step']:8.2f} {r['positions_per_step']:8.2f} "
                  f"{r['programs_per_step']:9.2f} {r['modelled_ms_per_token']:8.3f} {r['vs_ar']:6.2f}", flush=True)
    return rows


if __name__ == "__main__":
    sys.exit(main())
