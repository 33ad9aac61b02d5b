"""Engine step times on the GPU: eager vs CUDA graphs, decode and verify shapes, draft vs target.

    python benchmarks/engine_gpu.py                       # bench-preset shapes, random weights
    python benchmarks/engine_gpu.py --target T --draft D  # a trained pair

Random weights are fine for timing (the work does not depend on the values; they are not
zeros). Reports the median of many CUDA-event-timed forwards per shape, the draft/target ratio
c, and how much the step logic adds on top of the raw engine (AR through SpecBatch vs a bare
engine loop). Prints a table and writes JSON.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # run as a script from a checkout that is not pip-installed
    sys.path.insert(0, str(REPO))

from tandem.actors.offline import generate
from tandem.engine.llama import LlamaEngine
from tandem.engine.pair import ModelPair
from tandem.params import SamplingParams, SpecParams


def bench_models(args):
    from tandem import zoo

    if args.target:
        from tandem.engine.pair import load_hf_model

        return load_hf_model(args.target, "cuda", "bfloat16"), load_hf_model(args.draft, "cuda", "bfloat16")
    preset = zoo.presets()["bench"]
    models = []
    for i, shape in enumerate((preset.target, preset.draft)):
        torch.manual_seed(i)
        with torch.device("cuda"):
            models.append(zoo.build_model(shape, preset, seed=i).to(torch.bfloat16).eval())
    return models


def time_forward(engine, query: int, context: int, reps: int) -> float:
    """Median ms of one forward feeding `query` tokens after `context` cached ones, batch 1."""
    slot = engine.allocate()
    seq = [int(x) for x in torch.randint(1, engine.vocab_size, (context + query,))]
    engine.forward([slot], [seq[:context]], [1])
    times = []
    for _ in range(reps):
        engine.forward([slot], [seq[:context]], [1])  # roll back to the context (cheap: 1 token)
        torch.cuda.synchronize()
        start = time.perf_counter()
        engine.forward([slot], [seq], [query])
        torch.cuda.synchronize()
        times.append(1000 * (time.perf_counter() - start))
    engine.release(slot)
    return statistics.median(times)


def bare_decode(engine, prompt: list[int], n: int) -> float:
    """ms per token of a bare greedy loop on the engine (no step logic)."""
    slot = engine.allocate()
    seq = list(prompt)
    logits = engine.forward([slot], [seq], [1])
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(n):
        seq.append(int(logits[-1].argmax()))
        logits = engine.forward([slot], [seq], [1])
    torch.cuda.synchronize()
    engine.release(slot)
    return 1000 * (time.perf_counter() - start) / n


def split_forward(engine, context: int, reps: int) -> dict:
    """One decode forward cut in two: the host's part (the call returns once the graph is
    launched) and the device's (CUDA events around back-to-back replays of the same graph)."""
    slot = engine.allocate()
    seq = [int(x) for x in torch.randint(1, engine.vocab_size, (context + 1,))]
    engine.forward([slot], [seq], [1])
    host = []
    for _ in range(reps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        engine.forward([slot], [seq], [1])  # feeds the last token again (same shape)
        host.append(time.perf_counter() - t0)
    torch.cuda.synchronize()
    graph = next(g for k, g in engine.graphs.graphs.items() if getattr(k, "query", 0) == 1 and k.span >= context + 1)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        graph.replay()
    end.record()
    end.synchronize()
    engine.release(slot)
    return {"host_ms": 1000 * statistics.median(host), "device_ms": start.elapsed_time(end) / reps}


def draft_windows(draft_engine, reps: int) -> list[dict]:
    """A k-token greedy draft at batch 1: fused (one program) vs the token-by-token loop."""
    from tandem.actors.drafter import LocalDrafter
    from tandem.spec.messages import DraftItem

    rows = []
    prompt = [int(x) for x in torch.randint(1, draft_engine.vocab_size, (100,))]
    for fused in (True, False):
        d = LocalDrafter(draft_engine, fused=fused)
        slot = d.start("r", 0)
        for k in (1, 4, 8, 16):
            item = DraftItem("r", slot, prompt, k, SamplingParams(64), adaedl=False)
            d.propose([item])  # capture / warm
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(reps):
                d.propose([item])
            torch.cuda.synchronize()
            rows.append({"fused": fused, "k": k, "ms": 1000 * (time.perf_counter() - t0) / reps})
            print(f"draft fused={fused!s:5} k={k:2} {rows[-1]['ms']:7.3f} ms", flush=True)
        d.finish("r", slot)
    return rows


def cpu_profile(pair, spec, overlap: bool, tokens: int) -> str:
    """Host-side cost by op for one generate call (what Python and dispatch spend per step)."""
    from torch.profiler import ProfilerActivity, profile

    prompt = [int(x) for x in torch.randint(1, pair.target.vocab_size, (64,))]
    generate(pair, [prompt], SamplingParams(16, ignore_eos=True), spec, overlap=overlap)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        generate(pair, [prompt], SamplingParams(tokens, ignore_eos=True), spec, overlap=overlap)
        torch.cuda.synchronize()
    table = prof.key_averages()
    return table.table(sort_by="self_cpu_time_total", row_limit=22) + "\n" + \
        table.table(sort_by="self_device_time_total", row_limit=22)


class _NoTokenizer:
    eos_token_id = None


def step_logic(pair, prompt, bare: float) -> dict:
    """AR / SD / PEARL through SpecBatch at batch 1: ms per step and where it goes."""
    from tandem.actors.drafter import LocalDrafter, ThreadedDrafter
    from tandem.actors.offline import run_batch
    from tandem.spec.batch import SpecBatch

    out, tokens = {}, {}
    for label, spec, overlap in (("ar", SpecParams("ar"), False), ("sd k=4", SpecParams("sd", 4, adaedl=False), False),
                                 ("sd k=8", SpecParams("sd", 8, adaedl=False), False),
                                 ("pearl γ=4 no overlap", SpecParams("pearl", 4, adaedl=False), False),
                                 ("pearl γ=4", SpecParams("pearl", 4, adaedl=False), True),
                                 ("pearl γ=8", SpecParams("pearl", 8, adaedl=False), True)):
        drafter = (ThreadedDrafter if overlap else LocalDrafter)(pair.draft)
        run_batch(SpecBatch(pair.target, drafter, set()), [prompt], SamplingParams(16, ignore_eos=True), spec)
        batch = SpecBatch(pair.target, drafter, set())
        torch.cuda.synchronize()
        start = time.perf_counter()
        done = run_batch(batch, [prompt], SamplingParams(128, ignore_eos=True), spec)[0]
        ms = 1000 * (time.perf_counter() - start)
        if overlap:
            drafter.close()
        tokens[label] = done.token_ids
        # bf16: other query shapes may flip near-ties against AR; overlapped and sequential PEARL
        # run the same shapes, so they must agree exactly (tests/test_fast_path.py).
        sequential = tokens.get("pearl γ=4 no overlap") if overlap and "γ=4" in label else None
        out[label] = {"ms_per_step": ms / done.stats.steps, "steps": done.stats.steps,
                      "ms_per_token": ms / len(done.token_ids), "timing": batch.timing.as_dict(),
                      "same_as_ar": done.token_ids == tokens["ar"],
                      "same_as_sequential": None if sequential is None else done.token_ids == sequential}
        t = out[label]["timing"]
        print(f"{label:10}: {ms / done.stats.steps:.3f} ms/step, {ms / len(done.token_ids):.3f} ms/token "
              f"(bare AR {bare:.3f}); draft {t['draft_ms']:.2f} verify {t['verify_ms']:.2f} "
              f"wait {t['wait_ms']:.2f} exchange {t['exchange_ms']:.2f}; = AR {out[label]['same_as_ar']}, "
              f"= sequential {out[label]['same_as_sequential']}", flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target")
    ap.add_argument("--draft")
    ap.add_argument("--context", type=int, default=256)
    ap.add_argument("--reps", type=int, default=50)
    ap.add_argument("--profile", action="store_true", help="print the host-side ops of AR and SD steps")
    ap.add_argument("--out", default=str(REPO / "benchmarks/results/engine_gpu.json"))
    args = ap.parse_args()
    target_model, draft_model = bench_models(args)
    rows = []
    for name, model in (("target", target_model), ("draft", draft_model)):
        params = sum(p.numel() for p in model.parameters())
        for graphs in (False, True):
            eng = LlamaEngine(model, max_slots=4, max_context=1024, cuda_graphs=graphs)
            if graphs:
                eng.graphs.warmup(batch_sizes=[1], query_lens=[1, 2, 4, 8, 16, 32])
            for q in (1, 4, 9, 17):
                ms = time_forward(eng, q, args.context, args.reps)
                rows.append({"model": name, "params": params, "graphs": graphs, "query": q, "ms": ms})
                print(f"{name:6} graphs={graphs!s:5} q={q:2} {ms:7.3f} ms", flush=True)
            del eng
    step = {(r["model"], r["graphs"], r["query"]): r["ms"] for r in rows}
    c = step[("target", True, 1)] / step[("draft", True, 1)]
    target = LlamaEngine(target_model, max_slots=4, max_context=1024)
    draft = LlamaEngine(draft_model, max_slots=4, max_context=1024)
    for eng in (target, draft):  # capture outside the timed loops
        eng.graphs.warmup(batch_sizes=[1], query_lens=[1, 2, 4, 8, 16])
    draft.graphs.warmup_drafts([1], list(range(1, 9)))
    split = {name: split_forward(eng, args.context, args.reps) for name, eng in (("target", target), ("draft", draft))}
    for name, v in split.items():
        print(f"{name} decode: host {v['host_ms']:.3f} ms to launch, device {v['device_ms']:.3f} ms", flush=True)
    windows = draft_windows(draft, 20)
    prompt = [int(x) for x in torch.randint(1, target.vocab_size, (64,))]
    bare = bare_decode(target, prompt, 128)
    pair = ModelPair(_NoTokenizer(), target, draft)
    overhead = step_logic(pair, prompt, bare)
    if args.profile:
        for label, spec, overlap in (("ar", SpecParams("ar"), False), ("sd k=4", SpecParams("sd", 4, adaedl=False), False)):
            print(f"--- host-side ops, {label}, 32 tokens", flush=True)
            print(cpu_profile(pair, spec, overlap, 32), flush=True)
    result = {"device": torch.cuda.get_device_name(), "rows": rows, "c": c, "bare_ar_ms_per_token": bare,
              "forward_split": split, "draft_windows": windows, "step_logic": overhead}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"\n{'model':6} {'q':>3} {'eager ms':>9} {'graphs ms':>10}")
    for name in ("target", "draft"):
        for q in (1, 4, 9, 17):
            print(f"{name:6} {q:>3} {step[(name, False, q)]:>9.3f} {step[(name, True, q)]:>10.3f}")
    print(f"c = target/draft decode step (graphs) = {c:.2f}; bare AR loop {bare:.3f} ms/token; "
          f"AR through the step logic {overhead['ar']['ms_per_step']:.3f} ms/step")


if __name__ == "__main__":
    main()
