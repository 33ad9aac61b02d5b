"""The serving benchmark: what clients of a running server see, under open-loop load.

    python benchmarks/serve_bench.py --url 127.0.0.1:9000 --rates 1,2,4,8,inf --num-prompts 200
    python benchmarks/serve_bench.py --backend openai --url http://127.0.0.1:8000/v1 --model tandem-tiny \
        --rates 2,4 --num-prompts 100      # any OpenAI-compatible server (another engine too)
    python benchmarks/serve_bench.py --url 127.0.0.1:9000 --concurrency 16 --num-prompts 200

Requests arrive at random times, as a service sees them: a Poisson process at each `--rates`
value (requests per second; `--burstiness` < 1 makes arrivals burstier, a gamma process; `inf`
sends them all at once), or `--concurrency` clients each sending its next request when the last
ends. Prompts are the shipped set (`benchmarks/data/serve_prompts.json`: held-out standard
library code and English instructions, mixed by `--code-share`), output lengths drawn from a
log-normal around `--output-len`. Per request it records the time to the first token (TTFT),
the time per output token after it (TPOT), the gaps between streamed chunks (inter-token
latency, per token), the end-to-end latency, and whether it failed. Per rate: request
throughput, output tokens/s, mean / p50 / p90 / p99 of each latency, goodput (requests per second
meeting `--slo-ttft-ms` and `--slo-tpot-ms`) and, for tandem, the drafts' acceptance. Prints a
table, writes JSON, and with matplotlib plots latency and throughput against the request rate.
Needs only the SDK (`pip install tandem`) for tandem, plus httpx for `--backend openai`.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import math
import random
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PROMPTS = REPO / "benchmarks" / "data" / "serve_prompts.json"


@dataclass
class Outcome:
    """One request, as its client saw it (seconds)."""

    prompt_chars: int
    sent_at: float
    ttft: float | None = None
    e2e: float | None = None
    output_tokens: int = 0
    gaps: list[float] = field(default_factory=list)  # per token, between streamed chunks
    error: str = ""
    drafted: int = 0
    accepted: int = 0
    checked: int = 0

    @property
    def tpot(self) -> float | None:
        if self.e2e is None or self.ttft is None or self.output_tokens < 2:
            return None
        return (self.e2e - self.ttft) / (self.output_tokens - 1)


# -- workload -------------------------------------------------------------------------------------
def workload(args) -> list[tuple[str, int]]:
    """(prompt, max_tokens) per request, reproducible from --seed."""
    data = json.loads(Path(args.prompts).read_text())
    rng = random.Random(args.seed)
    out = []
    for _ in range(args.num_prompts):
        pool = data["code"] if rng.random() < args.code_share else data["instructions"]
        n = int(round(rng.lognormvariate(math.log(args.output_len), args.output_len_sigma)))
        out.append((rng.choice(pool), max(4, min(n, args.max_output_len))))
    return out


def arrivals(n: int, rate: float, burstiness: float, rng: random.Random) -> list[float]:
    """Send times from 0: a gamma process of mean rate `rate` (burstiness 1: Poisson)."""
    if math.isinf(rate):
        return [0.0] * n
    t, times = 0.0, []
    for _ in range(n):
        times.append(t)
        t += rng.gammavariate(burstiness, 1.0 / (rate * burstiness))
    return times


# -- clients ----------------------------------------------------------------------------------------
class TandemBackend:
    """tandem's gRPC SDK (AsyncTandemClient)."""

    def __init__(self, args) -> None:
        from tandem.client import AsyncTandemClient

        self.client = AsyncTandemClient(args.url, timeout=args.timeout, retries=0, api_key=args.api_key)
        self.kwargs = {"temperature": args.temperature, "ignore_eos": args.ignore_eos}
        if args.mode:
            self.kwargs["mode"] = args.mode
        if args.max_draft:
            self.kwargs["max_draft"] = args.max_draft

    async def run(self, prompt: str, max_tokens: int, out: Outcome) -> None:
        last = out.sent_at
        async for chunk in self.client.generate(prompt, max_tokens=max_tokens, **self.kwargs):
            now = time.perf_counter()
            n = len(chunk.token_ids)
            if n and out.ttft is None:
                out.ttft = now - out.sent_at
            elif n:
                out.gaps += [(now - last) / n] * n
            last = now if n else last
            out.output_tokens += n
            if chunk.finish_reason:
                s = chunk.stats
                out.drafted, out.accepted, out.checked = s.drafted, s.accepted, s.checked
        out.e2e = time.perf_counter() - out.sent_at

    async def close(self) -> None:
        await self.client.close()


class OpenAIBackend:
    """Any OpenAI-compatible HTTP server: /v1/completions, streamed (server-sent events)."""

    def __init__(self, args) -> None:
        import httpx

        headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
        self.http = httpx.AsyncClient(base_url=args.url.rstrip("/"), timeout=args.timeout, headers=headers,
                                      limits=httpx.Limits(max_connections=None, max_keepalive_connections=None))
        self.model, self.args = args.model, args

    async def run(self, prompt: str, max_tokens: int, out: Outcome) -> None:
        body = {"model": self.model, "prompt": prompt, "max_tokens": max_tokens, "stream": True,
                "temperature": self.args.temperature, "stream_options": {"include_usage": True}}
        if self.args.ignore_eos:
            body["ignore_eos"] = True
        last, seen_text = out.sent_at, 0
        async with self.http.stream("POST", "/completions", json=body) as r:
            if r.status_code != 200:
                raise RuntimeError(f"HTTP {r.status_code}: {(await r.aread())[:200]!r}")
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                event = json.loads(line[6:])
                if "error" in event:
                    raise RuntimeError(event["error"].get("message", "error event"))
                if event.get("usage"):
                    out.output_tokens = event["usage"]["completion_tokens"]
                for choice in event.get("choices", []):
                    if choice.get("text"):
                        now = time.perf_counter()
                        if out.ttft is None:
                            out.ttft = now - out.sent_at
                        else:
                            out.gaps.append(now - last)
                        last, seen_text = now, seen_text + 1
        out.e2e = time.perf_counter() - out.sent_at
        if not out.output_tokens:
            out.output_tokens = seen_text  # a server that sends no usage: count chunks

    async def close(self) -> None:
        await self.http.aclose()


# -- running ----------------------------------------------------------------------------------------
async def one_rate(backend, work: list[tuple[str, int]], rate: float | None, concurrency: int | None,
                   args, bar) -> tuple[list[Outcome], float]:
    rng = random.Random(args.seed + 1)
    outcomes: list[Outcome] = []
    start = time.perf_counter()

    async def send(prompt: str, max_tokens: int) -> None:
        out = Outcome(len(prompt), time.perf_counter())
        outcomes.append(out)
        try:
            await backend.run(prompt, max_tokens, out)
        except Exception as e:  # a failed request is a result, not a crash of the benchmark
            out.error = f"{type(e).__name__}: {str(e)[:160]}"
        bar.update(1)

    if concurrency:
        queue = list(work)

        async def client():
            while queue:
                await send(*queue.pop(0))
        await asyncio.gather(*(client() for _ in range(concurrency)))
    else:
        tasks = []
        for at, (prompt, max_tokens) in zip(arrivals(len(work), rate, args.burstiness, rng), work):
            delay = start + at - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(send(prompt, max_tokens)))
        await asyncio.gather(*tasks)
    return outcomes, time.perf_counter() - start


def summarize(outcomes: list[Outcome], seconds: float, args) -> dict:
    ok = [o for o in outcomes if not o.error and o.e2e is not None]

    def dist(values: list[float]) -> dict:
        if not values:
            return {}
        values = sorted(values)
        pick = lambda q: values[min(len(values) - 1, int(q * len(values)))]  # noqa: E731
        return {"mean_ms": 1000 * statistics.mean(values), "p50_ms": 1000 * pick(0.5),
                "p90_ms": 1000 * pick(0.9), "p99_ms": 1000 * pick(0.99)}

    good = [o for o in ok if o.ttft is not None and o.ttft * 1000 <= args.slo_ttft_ms
            and (o.tpot is None or o.tpot * 1000 <= args.slo_tpot_ms)]
    checked = sum(o.checked for o in ok)
    return {
        "requests": len(outcomes), "completed": len(ok), "failed": len(outcomes) - len(ok),
        "errors": sorted({o.error for o in outcomes if o.error})[:5],
        "duration_s": seconds, "request_throughput": len(ok) / seconds,
        "output_tokens_per_s": sum(o.output_tokens for o in ok) / seconds,
        "ttft": dist([o.ttft for o in ok if o.ttft is not None]),
        "tpot": dist([o.tpot for o in ok if o.tpot is not None]),
        "itl": dist([g for o in ok for g in o.gaps]),
        "e2e": dist([o.e2e for o in ok]),
        "goodput": len(good) / seconds, "slo": {"ttft_ms": args.slo_ttft_ms, "tpot_ms": args.slo_tpot_ms},
        "acceptance": sum(o.accepted for o in ok) / checked if checked else None,
    }


async def run_all(args) -> dict:
    from tqdm import tqdm

    backend = TandemBackend(args) if args.backend == "tandem" else OpenAIBackend(args)
    work = workload(args)
    points = [("concurrency", c) for c in args.concurrency] or [("rate", r) for r in args.rates]
    results = []
    try:
        if args.warmup:
            await one_rate(backend, work[: args.warmup], math.inf, None, args, _Null())
        for kind, value in points:
            with tqdm(total=len(work), desc=f"{kind} {value:g}", unit="req", leave=False) as bar:
                outcomes, seconds = await one_rate(backend, work, value if kind == "rate" else None,
                                                   value if kind == "concurrency" else None, args, bar)
            results.append({kind: value, **summarize(outcomes, seconds, args)})
            print_row(results[-1], kind)
    finally:
        await backend.close()
    return {"args": {k: (v if not isinstance(v, float) or math.isfinite(v) else "inf") for k, v in vars(args).items()},
            "points": results}


class _Null:
    def update(self, n: int) -> None:
        pass


def print_row(r: dict, kind: str) -> None:
    value = r[kind]
    g = lambda d, k: f"{d.get(k, float('nan')):8.1f}"  # noqa: E731
    print(f"{kind} {value:>6g}  req/s {r['request_throughput']:6.2f}  tok/s {r['output_tokens_per_s']:8.1f}  "
          f"TTFT p50/p99 {g(r['ttft'], 'p50_ms')}/{g(r['ttft'], 'p99_ms')} ms  TPOT p50/p99 "
          f"{g(r['tpot'], 'p50_ms')}/{g(r['tpot'], 'p99_ms')} ms  ITL p99 {g(r['itl'], 'p99_ms')} ms  "
          f"goodput {r['goodput']:5.2f}/s  failed {r['failed']}"
          + (f"  acceptance {r['acceptance']:.2f}" if r["acceptance"] is not None else ""), flush=True)


def plot(result: dict, out: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    pts = [p for p in result["points"] if "rate" in p and p["rate"] != "inf" and math.isfinite(p["rate"])]
    if not pts:
        return None
    x = [p["rate"] for p in pts]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for metric, ax in zip(("ttft", "tpot"), axes):
        for q in ("p50_ms", "p99_ms"):
            ax.plot(x, [p[metric].get(q, float("nan")) for p in pts], marker="o", label=q.split("_")[0])
        ax.set(xlabel="request rate (req/s)", ylabel=f"{metric.upper()} (ms)", title=metric.upper())
        ax.legend()
    axes[2].plot(x, [p["output_tokens_per_s"] for p in pts], marker="o", label="output tokens/s")
    axes[2].set(xlabel="request rate (req/s)", ylabel="tokens/s", title="throughput")
    fig.suptitle(f"{result['args']['backend']} @ {result['args']['url']}")
    path = out.with_suffix(".png")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return path


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--backend", choices=("tandem", "openai"), default="tandem")
    ap.add_argument("--url", default="127.0.0.1:9000", help="tandem: host:port of gRPC; openai: base URL with /v1")
    ap.add_argument("--model", default="tandem-tiny", help="openai backend: the model name to send")
    ap.add_argument("--api-key", default=None, help="tandem: default $TANDEM_API_KEY")
    ap.add_argument("--rates", default="1,2,4,inf", help="request rates (req/s) to run, comma-separated; inf: all at once")
    ap.add_argument("--burstiness", type=float, default=1.0, help="gamma shape of the arrivals (1: Poisson)")
    ap.add_argument("--concurrency", default="", help="instead of rates: closed-loop client counts, comma-separated")
    ap.add_argument("--num-prompts", type=int, default=100, help="requests per rate")
    ap.add_argument("--prompts", default=str(PROMPTS))
    ap.add_argument("--code-share", type=float, default=0.5, help="share of code prompts (the rest: instructions)")
    ap.add_argument("--output-len", type=int, default=128, help="median max_tokens")
    ap.add_argument("--output-len-sigma", type=float, default=0.5, help="log-normal spread of max_tokens")
    ap.add_argument("--max-output-len", type=int, default=512)
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--mode", default=None, help="tandem: a decoding mode for every request (default: the server's)")
    ap.add_argument("--max-draft", type=int, default=0,
                    help="tandem: every request's draft length (auto: the longest); 0: the server's")
    ap.add_argument("--ignore-eos", action=argparse.BooleanOptionalAction, default=True,
                    help="generate max_tokens tokens (so lengths follow the distribution)")
    ap.add_argument("--slo-ttft-ms", type=float, default=500.0)
    ap.add_argument("--slo-tpot-ms", type=float, default=20.0)
    ap.add_argument("--warmup", type=int, default=4, help="requests sent before the first measured rate")
    ap.add_argument("--timeout", type=float, default=300.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(REPO / "benchmarks/results/serve_bench.json"))
    args = ap.parse_args(argv)
    args.rates = [float(r) for r in args.rates.split(",") if r]
    args.concurrency = [int(c) for c in args.concurrency.split(",") if c]
    result = asyncio.run(run_all(args))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    picture = plot(result, out)
    print(f"wrote {out}" + (f" and {picture}" if picture else ""), flush=True)
    return result


if __name__ == "__main__":
    main()
    sys.exit(0)
