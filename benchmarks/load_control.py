"""The load controller against static draft lengths, across concurrency, in one run.

    python benchmarks/load_control.py                                   # tiny pair, CPU
    python benchmarks/load_control.py --target T --draft D --device cuda --dtype bfloat16 --concurrency 1,4,16,64

For each n, one batch of n held-out code prompts (T=0, every request max_tokens): tandem AR,
static SD, SD + AdaEDL, and the SD rows again with the lane's load controller
(tandem/spec/load_control.py) capping their windows. Greedy outputs are checked against AR on the
way (lossless: the run fails loudly if one differs). Reports tokens/s, the ratio to AR at the
same n, and the cap the controller held at the end. Prints a table, writes JSON and a PNG.
"""
from __future__ import annotations

import argparse
import json
import platform
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
from tandem.params import SamplingParams, SpecParams
from tandem.spec.batch import SpecBatch
from tandem.spec.load_control import LoadController
from tandem.zoo import heldout_prompts

ROWS = [  # (name, spec, load control)
    ("ar", SpecParams("ar"), False),
    ("sd k=8", SpecParams("sd", 8, adaedl=False), False),
    ("sd k=8 + load control", SpecParams("sd", 8, adaedl=False), True),
    ("sd+adaedl (cap 16)", SpecParams("sd", 16, adaedl=True), False),
    ("sd+adaedl (cap 16) + load control", SpecParams("sd", 16, adaedl=True), True),
]


def run_row(pair, prompts, spec: SpecParams, control: bool, max_tokens: int, warm_tokens: int) -> dict:
    """Warm on the same batch (the controller learns there, as a lane's would over its life), then time it."""
    controller = LoadController() if control else None
    batch = SpecBatch(pair.target, LocalDrafter(pair.draft, None, acceptance=pair.acceptance), pair.stop_ids, controller)
    run_batch(batch, prompts, SamplingParams(warm_tokens, 0.0, ignore_eos=True), spec)
    start = time.perf_counter()
    done = run_batch(batch, prompts, SamplingParams(max_tokens, 0.0, ignore_eos=True), spec)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    tokens = sum(len(d.token_ids) for d in done)
    checked = sum(d.stats.checked for d in done)
    return {"outputs": [d.token_ids for d in done], "tokens_per_s": tokens / seconds, "seconds": seconds,
            "acceptance": sum(d.stats.accepted for d in done) / checked if checked else 0.0,
            "drafted_per_step": sum(d.stats.drafted for d in done) / max(1, sum(d.stats.steps for d in done)),
            "load_control": controller.state() if controller is not None else None}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target", default="tandem:tiny/target")
    ap.add_argument("--draft", default="tandem:tiny/draft")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--concurrency", default="1,4,16,32")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--warm-tokens", type=int, default=24)
    ap.add_argument("--out", default=str(REPO / "benchmarks/results/load_control_cpu.json"))
    args = ap.parse_args(argv)
    ns = [int(n) for n in args.concurrency.split(",")]
    pair = load_pair(args.target, args.draft, device=args.device, dtype=args.dtype, max_slots=max(ns))
    texts = heldout_prompts(max(ns), seed=1)
    prompts = [pair.tokenizer.encode(t, add_special_tokens=False)[-96:] for t in texts]  # the last 96 tokens
    rows = []
    print(f"{'n':>3} {'row':<34} {'tok/s':>9} {'vs AR':>6} {'accept':>6} {'drafted/step':>12} {'cap':>4}", flush=True)
    for n in ns:
        ar_outputs, ar_tps = None, None
        for name, spec, control in ROWS:
            r = run_row(pair, prompts[:n], spec, control, args.max_tokens, args.warm_tokens)
            outputs = r.pop("outputs")
            ar_outputs, ar_tps = ar_outputs or outputs, ar_tps or r["tokens_per_s"]
            if outputs != ar_outputs:
                raise SystemExit(f"LOSSLESS VIOLATION: {name} at n={n} differs from AR")
            r.update(concurrency=n, row=name, speedup_vs_ar=r["tokens_per_s"] / ar_tps)
            rows.append(r)
            cap = r["load_control"]["cap"] if r["load_control"] else "-"
            print(f"{n:>3} {name:<34} {r['tokens_per_s']:>9.1f} {r['speedup_vs_ar']:>6.2f} {r['acceptance']:>6.2f} "
                  f"{r['drafted_per_step']:>12.2f} {str(cap):>4}", flush=True)
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else \
        f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"device": device, "args": vars(args), "rows": rows}, indent=1))
    print(f"device: {device}; wrote {out}")
    plot(rows, device, out.with_suffix(".png"))
    return 0


def plot(rows: list[dict], device: str, path: Path) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot (pip install -e '.[bench]')")
        return
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for name, _, control in ROWS[1:]:
        pts = [(r["concurrency"], r["speedup_vs_ar"]) for r in rows if r["row"] == name]
        ax.plot(*zip(*pts), marker="o", linestyle="-" if control else "--", label=name)
    ax.axhline(1.0, color="grey", linewidth=1, label="AR")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("concurrent requests (one batch)")
    ax.set_ylabel("tokens/s vs AR at the same n")
    ax.set_title(f"load control vs static draft lengths, T=0 ({device})", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


if __name__ == "__main__":
    sys.exit(main())
