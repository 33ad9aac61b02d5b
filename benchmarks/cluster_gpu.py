"""The cluster path on GPUs: start Ray + Serve, stream through gRPC, check greedy equality with
the target alone, and read each mode's step-time breakdown (draft / verify / wait / exchange).

    python benchmarks/cluster_gpu.py --tp 1 --verifier-gpus 1 --drafter-gpus 1      # (a)
    python benchmarks/cluster_gpu.py --tp 2 --verifier-gpus 0.75 --drafter-gpus 0.25  # (b)

(b) puts the two verifier ranks on different GPUs (0.75 + 0.75 cannot share one) and the drafter
beside one of them. Each mode also runs in-process first (same pair, prompts, batching; PEARL
with the overlapping drafter), so the table shows what the cluster path (Serve, gRPC, lanes,
the remote drafter) costs: the `ratio` column is cluster / in-process tokens/s.

    python benchmarks/cluster_gpu.py --target runs/bench/target --draft runs/bench/draft \
        --dtype bfloat16 --verifier-gpus 0.5 --drafter-gpus 0.5 --modes ar,sd,pearl+adaedl  # one GPU
    python benchmarks/cluster_gpu.py --device cpu --verifier-gpus 0.5 --drafter-gpus 0.5 --modes ar  # no GPU
    python benchmarks/cluster_gpu.py ... --verifier-gpus 1 --colocate-drafter   # one GPU, drafter in the replica
    python benchmarks/cluster_gpu.py ... --tp 2 --verifier-gpus 1 --drafter-gpus 1 --num-drafters 2   # four GPUs

On CPU the in-process runs use the torch threads Ray gives the lane replica (floor of
--verifier-cpus, at least 1), so both paths compute alike. `frames` counts the frames the lane
sent on its token channel (one per step with tokens) and `tok/frame` the tokens each carried.
Prints a table and writes JSON.
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import ray
import torch
from ray import serve

from tandem.zoo import heldout_prompts

REPO = Path(__file__).resolve().parent.parent
SHORT_PROMPTS = ["def _parse_header(line):\n", "import os\n\n\ndef walk(root):\n", "class Queue:\n    def put(self, item):\n",
           "    for key, value in sorted(items):\n", "def main(argv=None):\n    parser = argparse.ArgumentParser(",
           "if __name__ == '__main__':\n", "    return {k: v for k, v in", "class Error(Exception):\n"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def parse_mode(text: str) -> tuple[str, bool]:
    """'pearl+adaedl' -> ('pearl', True); 'sd' -> ('sd', False)."""
    mode, _, extra = text.partition("+")
    return mode, extra == "adaedl"


def in_process(args) -> tuple[list[list[int]], list[dict]]:
    """AR's greedy tokens (the reference), and each mode run in one process on the same prompts."""
    from tandem.actors.offline import generate
    from tandem.engine.pair import load_pair
    from tandem.kernels.warmup import freeze_heap
    from tandem.params import SamplingParams, SpecParams

    if args.device == "cpu":  # what Ray sets OMP_NUM_THREADS to in the replica (ray._private.utils)
        torch.set_num_threads(max(1, math.floor(args.verifier_cpus)))
    pair = load_pair(args.target, args.draft, device=args.device, dtype=args.dtype, max_slots=len(args.texts))
    runners = {draft: r for draft, r in ((False, getattr(pair.target, "graphs", None)), (True, getattr(pair.draft, "graphs", None)))
               if r is not None and r.capture}
    if args.graphs_at_start:  # what the lane captures before it serves (lane_roles._capture_graphs)
        for draft, r in runners.items():
            r.capture_at_start(args.max_draft, draft)
    freeze_heap()  # as the lane does before it serves (tandem/actors/lane_roles.py)
    prompts = [pair.tokenizer.encode(p, add_special_tokens=False) for p in args.texts]
    # Prompt i samples with seed i on both paths (T > 0), so the two may be compared token by token.
    sampling = [SamplingParams(args.max_tokens, args.temperature, seed=i, ignore_eos=True) for i in range(len(prompts))]
    ref = [d.token_ids for d in generate(pair, prompts, sampling, SpecParams("ar"))]
    rows = []
    for text in args.modes.split(","):
        mode, adaedl = parse_mode(text)
        spec = SpecParams(mode, args.max_draft, adaedl=adaedl)
        for conc in args.concurrency:
            n = prompt_count(conc)
            for i in range(0, n, conc):  # warm: every graph these batches need is captured
                generate(pair, prompts[i : i + conc], sampling[i : i + conc], spec, overlap=mode == "pearl")
            _sync()
            before = sum(len(r.graphs) for r in runners.values())
            start, outputs, ttfts = time.perf_counter(), [], []
            for i in range(0, n, conc):  # the same batches the cluster sees
                done = generate(pair, prompts[i : i + conc], sampling[i : i + conc], spec, overlap=mode == "pearl")
                outputs += [d.token_ids for d in done]
                ttfts += [d.stats.time_to_first_token_s for d in done]  # from the request's admission
            _sync()
            tokens = sum(len(o) for o in outputs)
            # AdaEDL's λ and acceptance table learn on, so a timed run can ask for a shape its warm-up
            # did not; a graph captured here is in the timing (none with --graphs-at-start).
            rows.append({"mode": text, "concurrency": conc, "tokens_per_s": tokens / (time.perf_counter() - start),
                         "ttft_ms_p50": 1000 * statistics.median(ttfts),
                         "captures_in_timed_run": sum(len(r.graphs) for r in runners.values()) - before})
            print("in-process", json.dumps(rows[-1]), flush=True)
            rows[-1]["outputs"] = outputs
    del pair
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return ref, rows


def prompt_count(concurrency: int) -> int:
    """Prompts a row runs: 16, or four per stream when there are more than four streams, so that a row
    lasts seconds, not one batch (a row of one batch of 8 x 128 tokens lasted 0.17 s on one H200)."""
    return max(16, 4 * concurrency)


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def best_mode(path: str, temperature: float) -> tuple[str, int]:
    """('ar,<mode>[+adaedl]', max_draft) of the fastest tandem row of gpu_bench's batch-1 latency
    section at this temperature (latency_t0 or latency_t1)."""
    rows = [r for r in json.loads(Path(path).read_text())[f"latency_t{temperature:g}"]["rows"]
            if r.get("engine") == "tandem" and r.get("mode") != "ar" and "tokens_per_s" in r]
    top = max(rows, key=lambda r: r["tokens_per_s"])
    return f"ar,{top['mode']}{'+adaedl' if top['adaedl'] else ''}", top["max_draft"]


def run_mode(client, lane, text: str, concurrency: int, args) -> dict:
    from tandem.client import _collect  # the chunks as TandemClient.complete puts them together

    mode, adaedl = parse_mode(text)

    def one(i):
        """The request's whole output, and its time to first token as the client sees it."""
        start, first = time.perf_counter(), None
        chunks = []
        for chunk in client.generate(args.texts[i], max_tokens=args.max_tokens, mode=mode, max_draft=args.max_draft,
                                     adaedl=adaedl, ignore_eos=True, temperature=args.temperature, seed=i):
            if first is None and chunk.token_ids:
                first = time.perf_counter() - start
            chunks.append(chunk)
        return _collect(chunks, None), first

    n = prompt_count(concurrency)
    with ThreadPoolExecutor(concurrency) as pool:  # warm: the graphs of this mode's shapes
        list(pool.map(one, range(n)))
    lane.reset_timing.remote().result()
    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        outs, ttfts = zip(*pool.map(one, range(n)))
    elapsed = time.perf_counter() - start
    load = lane.load.remote().result()
    tokens = sum(len(o.token_ids) for o in outs)
    timing = load["step_timing"]
    return {"mode": text, "concurrency": concurrency, "tokens_per_s": tokens / elapsed, "outputs": [o.token_ids for o in outs],
            "ttft_ms_p50": 1000 * statistics.median(ttfts),
            "acceptance": sum(o.stats.accepted for o in outs) / max(1, sum(o.stats.checked for o in outs)),
            "wall_s": elapsed,
            "in_steps_s": timing["steps"] * (timing["total_ms"] + timing["gap_ms"] + timing.get("deliver_ms", 0.0)) / 1000,
            "stream_frames": load["streamed"]["frames"], "tokens_per_frame": load["streamed"]["tokens"] / max(1, load["streamed"]["frames"]),
            "lane_torch_threads": load["torch_threads"], **timing}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target", default="tandem:tiny/target")
    ap.add_argument("--draft", default="tandem:tiny/draft")
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--verifier-gpus", type=float, default=1)
    ap.add_argument("--drafter-gpus", type=float, default=1)
    ap.add_argument("--verifier-cpus", type=float, default=1.0)
    ap.add_argument("--graphs-at-start", action="store_true", help="lane.cuda_graphs_at_start: every CUDA graph "
                    "captured before the lane serves (and before the in-process runs)")
    ap.add_argument("--num-drafters", type=int, default=1, help="lane.num_drafters: drafter processes, "
                    "each with --drafter-gpus")
    ap.add_argument("--colocate-drafter", action="store_true", help="lane.colocate_drafter: the drafter in the "
                    "lane replica, on its GPU (--drafter-gpus is then ignored)")
    ap.add_argument("--stream-batching-interval-ms", type=float, help="lane.stream_batching_interval_ms (default: LaneConfig's)")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--device", default="cuda", help="cpu: a dry run with fake GPUs")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--temperature", type=float, default=0.0, help="> 0: prompt i samples with seed i on both paths")
    ap.add_argument("--max-draft", type=int, default=4)
    ap.add_argument("--modes", default="ar,sd,pearl", help="comma-separated; '+adaedl' turns AdaEDL on")
    ap.add_argument("--prompts", choices=["heldout", "short"], default="heldout",
                    help="heldout: gpu_bench's batch-1 held-out code prompts (the same 8, tandem.zoo.heldout_prompts); "
                    "short: 8 one-line openings")
    ap.add_argument("--heldout-pool", type=int, default=64, help="gpu_bench's prompt pool: heldout_prompts(pool, "
                    "seed=1)[:8] are its batch-1 prompts")
    ap.add_argument("--concurrency", default="1,8", help="comma-separated streams; a row runs max(8, streams) "
                    "held-out prompts, all of them at once from that many client threads")
    ap.add_argument("--out", default="cluster_gpu.json")
    ap.add_argument("--best-from", help="a gpu_bench.json: run AR and its fastest batch-1 tandem mode at --temperature")
    ap.add_argument("--core-process", action=argparse.BooleanOptionalAction, default=False,
                    help="the lane's step loop in a process of its own (lane.core_process)")
    args = ap.parse_args()
    if args.colocate_drafter and args.num_drafters > 1:
        ap.error("--colocate-drafter runs one drafter in the lane replica: leave --num-drafters at 1")
    try:
        args.concurrency = [int(c) for c in args.concurrency.split(",")]
    except ValueError:
        ap.error(f"--concurrency takes comma-separated whole numbers, got {args.concurrency!r}")
    if min(args.concurrency) < 1:
        ap.error(f"--concurrency: every number of streams must be at least 1, got {args.concurrency}")
    most = prompt_count(max(args.concurrency))
    if args.prompts == "short" and most > len(SHORT_PROMPTS):
        ap.error(f"--prompts short has {len(SHORT_PROMPTS)} prompts: --concurrency at most that")
    args.texts = heldout_prompts(max(args.heldout_pool, most), seed=1)[:most] if args.prompts == "heldout" else SHORT_PROMPTS
    if args.best_from:
        args.modes, args.max_draft = best_mode(args.best_from, args.temperature)
        print(f"modes {args.modes}, max_draft {args.max_draft} (from {args.best_from})", flush=True)
    ref, local = in_process(args)
    grpc_port = free_port()
    ray.init(num_cpus=12, num_gpus=torch.cuda.device_count() or 2, include_dashboard=False)
    serve.start(http_options={"host": "127.0.0.1", "port": free_port()})
    from tandem.client import TandemClient
    from tandem.cluster.app import build_app

    lane_cfg = {"tensor_parallel_size": args.tp, "device": args.device, "verifier_gpus": args.verifier_gpus,
                "max_batch_size": max(args.concurrency), "verifier_cpus": args.verifier_cpus,
                "cuda_graphs_at_start": args.graphs_at_start}
    lane_cfg.update({"colocate_drafter": True} if args.colocate_drafter else
                    {"drafter_gpus": args.drafter_gpus, "num_drafters": args.num_drafters})
    if args.stream_batching_interval_ms is not None:
        lane_cfg["stream_batching_interval_ms"] = args.stream_batching_interval_ms
    lane_cfg["core_process"] = args.core_process
    t0 = time.perf_counter()
    serve.run(build_app({"model": {"target": args.target, "draft": args.draft, "dtype": args.dtype}, "lane": lane_cfg,
                        "speculation": {"max_draft": args.max_draft}, "grpc": {"port": grpc_port}}),
              name="tandem", route_prefix="/")
    print(f"cluster up in {time.perf_counter() - t0:.1f} s", flush=True)
    lane = serve.get_deployment_handle("Lane", app_name="tandem")
    client = TandemClient(f"127.0.0.1:{grpc_port}")
    rows = []
    for text in args.modes.split(","):
        for conc in args.concurrency:
            r = run_mode(client, lane, text, conc, args)
            outputs = r.pop("outputs")
            # ref: AR, all prompts as one batch; sampled modes follow the target's distribution, not its tokens
            r["greedy_equal_to_ar"] = outputs == ref[: len(outputs)] if args.temperature == 0 else None
            same = next(x for x in local if x["mode"] == text and x["concurrency"] == conc)
            # In bf16 the batch a request shares changes its GEMM shapes, so the cluster's output is
            # compared with the in-process run of the same mode and batches, too (at batch 1 the
            # shapes are the same on both paths).
            r["equal_to_in_process"] = outputs == same["outputs"]
            r["in_process_tokens_per_s"] = same["tokens_per_s"]
            r["in_process_ttft_ms_p50"] = same["ttft_ms_p50"]
            r["in_process_captures_in_timed_run"] = same["captures_in_timed_run"]
            r["cluster_vs_in_process"] = r["tokens_per_s"] / same["tokens_per_s"]
            rows.append(r)
            print(json.dumps(r), flush=True)
    print(f"\n{'mode':<13} {'conc':>4} {'=AR':>5} {'=local':>6} {'tok/s':>8} {'local':>8} {'cap':>3} {'ratio':>5} {'ttft':>6} {'local':>6} {'accept':>6} {'step':>7} {'draft':>7} "
          f"{'verify':>7} {'wait':>7} {'exch':>7} {'gap':>7} {'deliv':>7} {'idle':>7} {'frames':>6} {'tok/frame':>9} {'wall_s':>6} {'steps_s':>7}  "
          f"(ms; ttft: p50, the client's first chunk / in process from admission; cap: graphs the in-process run captured while timed; gap: the lane loop between steps; deliv: after a step, its tokens to the channel; idle: no request running, per span; "
          f"steps_s: time in steps, gaps and deliveries)")
    for r in rows:
        print(f"{r['mode']:<13} {r['concurrency']:>4} {str(r['greedy_equal_to_ar']):>5} {str(r['equal_to_in_process']):>6} {r['tokens_per_s']:>8.1f} "
              f"{r['in_process_tokens_per_s']:>8.1f} {r['in_process_captures_in_timed_run']:>3} {r['cluster_vs_in_process']:>5.2f} {r['ttft_ms_p50']:>6.1f} {r['in_process_ttft_ms_p50']:>6.1f} {r['acceptance']:>6.2f} "
              f"{r['total_ms']:>7.2f} {r['draft_ms']:>7.2f} {r['verify_ms']:>7.2f} {r['wait_ms']:>7.2f} {r['exchange_ms']:>7.2f} {r.get('gap_ms', 0.0):>7.2f} {r.get('deliver_ms', 0.0):>7.2f} {r.get('idle_ms_per_span', 0.0):>7.2f} "
              f"{r['stream_frames']:>6} {r['tokens_per_frame']:>9.2f} {r['wall_s']:>6.2f} {r['in_steps_s']:>7.2f}")
    device = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    Path(args.out).write_text(json.dumps({"device": device, "gpus": torch.cuda.device_count(),
                                          "args": vars(args), "rows": rows}, indent=1))
    serve.shutdown()
    ray.shutdown()


if __name__ == "__main__":
    main()
