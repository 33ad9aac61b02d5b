"""Why does a step that admits a request take 10-50 ms? Times the target's forwards around a join.

    python benchmarks/random_pair.py --out /tmp/rand && python benchmarks/prefill_probe.py --target /tmp/rand/target

Times (CUDA-synchronized, ms): a prompt prefilled alone at several lengths (eager), the same
with CUDA graphs on, a decode step of a batch of 16 before and right after a join, and a
profile of one join step (top CUDA and CPU ops). Writes JSON to --out.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from tandem.engine.llama import LlamaEngine  # noqa: E402
from tandem.engine.pair import load_hf_model  # noqa: E402


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn) -> float:
    sync()
    t = time.perf_counter()
    fn()
    sync()
    return 1000 * (time.perf_counter() - t)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--target", required=True)
    ap.add_argument("--graphs", action="store_true")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--out", default="prefill_probe.json")
    a = ap.parse_args(argv)
    model = load_hf_model(a.target, a.device, a.dtype)
    eng = LlamaEngine(model, max_slots=32, max_context=512, cuda_graphs=a.graphs)
    out = {"graphs": a.graphs}
    slots = [eng.allocate() for _ in range(16)]
    seqs = [[1 + (7 * i + j) % 900 for j in range(100)] for i in range(16)]
    eng.forward(slots, seqs, [1] * 16)
    for _ in range(3):  # warm: decode steps
        seqs = [s + [5] for s in seqs]
        eng.forward(slots, seqs, [1] * 16)
    lengths = [150, 163, 171, 188, 200, 150, 163, 171, 188, 200]
    out["prefill_alone_ms"] = {}
    for i, n in enumerate(lengths):
        s = eng.allocate()
        out["prefill_alone_ms"].setdefault(n, []).append(timed(lambda: eng.forward([s], [[3 + j % 800 for j in range(n)]], [1])))
        eng.release(s)
    steps = []
    for i in range(12):
        seqs = [s + [9] for s in seqs]
        if i % 3 == 2:  # a join: one new prompt beside 15 decoding requests
            eng.release(slots[0])
            slots[0] = eng.allocate()
            seqs[0] = [4 + (i * 31 + j) % 700 for j in range(150 + 7 * i)]
            steps.append(("join", timed(lambda: eng.forward(slots, seqs, [1] * 16))))
        else:
            steps.append(("decode", timed(lambda: eng.forward(slots, seqs, [1] * 16))))
    out["steps_ms"] = steps
    from torch.profiler import ProfilerActivity, profile
    eng.release(slots[0])
    slots[0] = eng.allocate()
    seqs = [s + [9] for s in seqs]
    seqs[0] = [6 + j % 500 for j in range(177)]
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if a.device == "cuda" else [])
    with profile(activities=acts) as prof:
        out["profiled_join_ms"] = timed(lambda: eng.forward(slots, seqs, [1] * 16))
    table = prof.key_averages().table(sort_by="cuda_time_total" if a.device == "cuda" else "cpu_time_total", row_limit=15)
    cpu = prof.key_averages().table(sort_by="cpu_time_total", row_limit=15)
    print(json.dumps(out, indent=1))
    print(table)
    print(cpu)
    Path(a.out).write_text(json.dumps(out, indent=1) + "\n" + table + "\n" + cpu)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
