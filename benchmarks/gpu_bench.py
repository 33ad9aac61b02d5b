"""Every decoding mode on one pair in one process, against Hugging Face generate (docs/design.md §4, §5).

    python benchmarks/gpu_bench.py --target /tmp/bench/target --draft /tmp/bench/draft \\
        --device cuda --dtype bfloat16 --deadline-s 300
    python benchmarks/gpu_bench.py --device cpu --dtype float32 --prompts 2 --max-tokens 16 \\
        --concurrency 1,2                                            # the shipped tiny pair

Sections, in priority order:
  calibration       median engine.forward ms at batch 1: target / draft decode, target verify of
                    k+1 = 4, 6, 9, 17 tokens; c = target / draft sets the PEARL window γ
  latency_t0 / _t1  batch 1, held-out code prompts one after another: HF generate, HF assisted
                    generation, tandem AR, SD k = 3, 5, 8, 16, SD+AdaEDL, PEARL (+AdaEDL)
  concurrency       n prompts as one continuous batch: AR, best SD, SD+AdaEDL, PEARL+AdaEDL
  natural_language  instruction prompts at T=0 (the pair was trained on code only)

At T=0 every tandem row is compared with tandem AR token for token (lossless check). In bf16
on a GPU, other batch and query shapes can flip near-tie argmaxes, so a mismatch is reported
loudly, not fatal. The JSON (--out) is rewritten after every row, so a kill loses only the row
in flight; --deadline-s skips rows and sections that would not fit. The table prints last.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import inspect
import json
import math
import os
import platform
import shlex
import statistics
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # run as a script from a checkout that is not pip-installed
    sys.path.insert(0, str(REPO))

import torch

from tandem.actors.drafter import LocalDrafter
from tandem.actors.offline import run_batch
from tandem.engine.pair import load_pair, load_tokenizer
from tandem.kernels.warmup import freeze_heap, warm_kernels
from tandem.params import SamplingParams, SpecParams
from tandem.spec.batch import SpecBatch
from tandem.spec.load_control import LoadController
from tandem.zoo import heldout_prompts

NL_PROMPTS = [
    "Write a Python function that checks whether a string is a palindrome.",
    "Write a Python function that returns the n-th Fibonacci number without recursion.",
    "Explain the difference between a list and a tuple in Python.",
    "Write a Python class that implements a stack with push, pop and peek methods.",
    "Write a Python function that reads a CSV file and returns its rows as dictionaries.",
    "Write a Python function that merges two sorted lists into one sorted list.",
    "Describe what a context manager is and give a short example.",
    "Write a Python function that counts how often each word occurs in a text file.",
    "Write a Python function that removes duplicates from a list but keeps the order.",
    "Explain how a hash table handles collisions.",
    "Write a Python function that converts a Roman numeral to an integer.",
    "Write a Python function that checks an email address with a regular expression.",
]
VERIFY_LENS = (4, 6, 9, 17)  # k+1 for k = 3, 5, 8, 16
SECTIONS = ("calibration", "latency", "concurrency", "natural_language", "lossless_fp32")
AR = "tandem ar"
AUTO = "auto (default)"  # the lane chooses each step's draft length per request, AdaEDL inside


class OutOfTime(Exception):
    pass


@dataclass
class Budget:
    """The overall --deadline-s, counted from the start of the script."""

    deadline_s: float | None
    start: float = field(default_factory=time.perf_counter)

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def left(self) -> float:
        return float("inf") if not self.deadline_s else self.deadline_s - self.elapsed()

    def check(self) -> None:
        if self.left() <= 0:
            raise OutOfTime(f"deadline of {self.deadline_s:g} s reached")


class Report:
    """The JSON being built; rewritten after every row so that a kill loses only the row in flight."""

    def __init__(self, path: Path, budget: Budget) -> None:
        self.path, self.budget = path, budget
        self.data: dict = {"meta": {}, "skipped": [], "warnings": []}

    def rows(self, section: str) -> list[dict]:
        return self.data.setdefault(section, {"rows": []})["rows"]

    def add_row(self, section: str, row: dict) -> None:
        self.rows(section).append(row)
        self.save()
        print(f"[{self.budget.elapsed():6.1f}s] {section:<16} {row_line(row)}", flush=True)

    def skip(self, what: str, why: str) -> None:
        self.data["skipped"].append(f"{what}: {why}")
        self.save()
        print(f"[{self.budget.elapsed():6.1f}s] SKIPPED {what}: {why}", flush=True)

    def warn(self, msg: str) -> None:
        self.data["warnings"].append(msg)
        self.save()
        print(f"\n{'!' * 100}\nWARNING: {msg}\n{'!' * 100}\n", flush=True)

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=1, default=str))
        os.replace(tmp, self.path)  # never leave a half-written file behind


@dataclass(frozen=True)
class Row:
    name: str
    spec: SpecParams | None = None  # None: Hugging Face generate
    overlap: bool = False  # PEARL: drafter in a background thread / on its own GPU
    assisted: bool = False  # HF: assistant_model=the draft
    paper_adaedl: bool = False  # AdaEDL's own stop rule (λ, --adaedl-lambda/alpha), not the cost-aware one
    load_control: bool = False  # the lane's load controller caps draft lengths (tandem/spec/load_control.py)

    @property
    def is_hf(self) -> bool:
        return self.spec is None


@dataclass
class Bench:
    args: argparse.Namespace
    pair: object  # tandem.engine.pair.ModelPair
    code: list[list[int]]  # held-out code prompts (token ids), at least max(concurrency)
    nl: list[list[int]]
    report: Report
    budget: Budget
    gamma: int = 4  # PEARL window, set from c by the calibration
    features: dict = field(default_factory=dict)

    def sync(self) -> None:
        for dev in {self.pair.target.device, self.pair.draft.device}:
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)


# --------------------------------------------------------------------------- loading


def supported_kwargs(fn, wanted: dict) -> tuple[dict, list[str]]:
    """The kwargs fn accepts, and the names it does not (an older engine)."""
    params = inspect.signature(fn).parameters
    ok = {k: v for k, v in wanted.items() if k in params}
    return ok, [k for k in wanted if k not in params]


def load(args, report: Report, budget: Budget) -> Bench:
    tokenizer = load_tokenizer(args.target)
    encode = lambda texts: [tokenizer.encode(t, add_special_tokens=False) for t in texts]
    pool = max(args.prompts, max(args.concurrency))
    code_ids = encode(heldout_prompts(pool, seed=1))
    code = [code_ids[i % len(code_ids)] for i in range(pool)]  # repeats only if the split runs short
    nl = encode(NL_PROMPTS[: args.nl_prompts])
    # Room for the longest prompt, the output and a full k=16 draft; smaller context, fewer graphs.
    max_context = max(len(p) for p in code + nl) + args.max_tokens + 40
    wanted = {"engine": "native", "max_slots": max(args.concurrency), "max_context": max_context,
              "cuda_graphs": None, "draft_device": args.draft_device}
    kwargs, missing = supported_kwargs(load_pair, wanted)
    if args.draft_device and "draft_device" in missing:
        report.warn(f"load_pair does not take draft_device: the draft stays on {args.device}")
    print(f"loading {args.target} + {args.draft} on {args.device} ({args.dtype}), max_context {max_context}", flush=True)
    pair = load_pair(args.target, args.draft, device=args.device, dtype=args.dtype, **kwargs)
    b = Bench(args, pair, code, nl, report, budget)
    b.features = {"load_pair_ignored": missing, "threaded_drafter": threaded_drafter_cls() is not None,
                  "target_graphs": graphs_of(pair.target) is not None, "draft_graphs": graphs_of(pair.draft) is not None}
    return b


def graphs_of(engine):
    return getattr(engine, "graphs", None)


def graph_keys(b: Bench) -> set[str]:
    """The CUDA graphs both engines hold now, named by engine and bucket (none off CUDA)."""
    runners = [(name, graphs_of(e)) for name, e in (("target", b.pair.target), ("draft", b.pair.draft))]
    return {f"{name} {key}" for name, r in runners if r is not None and r.capture for key in r.graphs}


def threaded_drafter_cls():
    import tandem.actors.drafter

    return getattr(tandem.actors.drafter, "ThreadedDrafter", None)


def warm_graphs(b: Bench, batch_sizes: list[int], draft_steps=range(1, 17), sampled=(False, True)) -> float:
    """Capture the CUDA graphs of these batch sizes now, so no timed row pays for a capture:
    target forwards (decode and verify shapes), prompts (tandem/engine/graphs.py's PREFILL_QUERY
    buckets, for both engines), draft forwards (prefill tails) and the draft's multi-step
    windows (tandem/engine/draft_steps.py) of every length a row can ask for."""
    from tandem.engine.graphs import PREFILL_BATCH

    start = time.perf_counter()
    for name, engine in (("target", b.pair.target), ("draft", b.pair.draft)):
        if graphs_of(engine) is not None:
            engine.graphs.warmup(batch_sizes=[s for s in batch_sizes if s <= PREFILL_BATCH] or [1],
                                 query_lens=engine.graphs.prompt_buckets)
            n = engine.graphs.warmup(batch_sizes=batch_sizes, query_lens=[1, 2, 4, 8, 16, 32])
            if name == "draft":
                n = engine.graphs.warmup_drafts(batch_sizes, list(draft_steps), sampled=sampled)
            print(f"[{b.budget.elapsed():6.1f}s] {name}: {n} CUDA graphs captured (batch sizes {batch_sizes})", flush=True)
    b.sync()
    return time.perf_counter() - start


def meta(b: Bench, argv: list[str]) -> dict:
    import transformers

    count = lambda e: sum(p.numel() for p in e.model.parameters())
    return {
        "command": shlex.join(["python", "benchmarks/gpu_bench.py", *argv]),
        "args": vars(b.args),
        "devices": {"target": device_name(b.pair.target.device), "draft": device_name(b.pair.draft.device)},
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "python": platform.python_version()},
        "params": {"target": count(b.pair.target), "draft": count(b.pair.draft)},
        "features": b.features,
        "prompt_tokens": {"code_mean": statistics.mean(len(p) for p in b.code[: b.args.prompts]),
                          "nl_mean": statistics.mean(len(p) for p in b.nl)},
        "notes": [("the pair was trained on Python standard-library code only; natural_language rows are "
                   "out of distribution for both models"),
                  "tokens/s counts generated tokens over wall time; batch-1 rows run prompts one after another",
                  "ignore_eos: every request generates max_tokens tokens (HF: eos_token_id=None)"],
    }


def device_name(dev: torch.device) -> str:
    if dev.type == "cuda":
        return f"{dev} {torch.cuda.get_device_name(dev)}"
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


# --------------------------------------------------------------------------- (a) calibration


@torch.inference_mode()
def forward_ms(b: Bench, engine, seq: list[int], n: int) -> float:
    """Median ms of engine.forward feeding the last n tokens of seq (same positions every time)."""
    slot = engine.allocate()
    try:
        times = []
        for _ in range(b.args.calibration_iters + 5):  # forward() rolls the slot back to len(seq) - n each call
            b.sync()
            t0 = time.perf_counter()
            engine.forward([slot], [seq], [n])
            b.sync()
            times.append(time.perf_counter() - t0)
        return 1000 * statistics.median(times[5:])
    finally:
        engine.release(slot)


def calibration(b: Bench) -> None:
    seq = b.code[0]
    target_ms = forward_ms(b, b.pair.target, seq, 1)
    draft_ms = forward_ms(b, b.pair.draft, seq, 1)
    verify = {n: forward_ms(b, b.pair.target, seq + seq[:n], n) for n in VERIFY_LENS}
    c = target_ms / draft_ms
    b.gamma = max(2, min(16, round(c)))
    sec = {"target_decode_ms": target_ms, "draft_decode_ms": draft_ms, "c": c, "gamma": b.gamma,
           "target_verify_ms": {str(n): v for n, v in verify.items()}, "position": len(seq)}
    b.report.data["calibration"] = sec
    b.report.save()
    vs = ", ".join(f"{n}: {v:.2f}" for n, v in verify.items())
    print(f"[{b.budget.elapsed():6.1f}s] calibration: target {target_ms:.2f} ms, draft {draft_ms:.2f} ms, "
          f"c = {c:.2f} -> PEARL γ = {b.gamma}; verify ms by query length {{{vs}}}", flush=True)


# --------------------------------------------------------------------------- running rows


def samplings_for(b: Bench, n: int, temperature: float) -> list[SamplingParams]:
    return [SamplingParams(b.args.max_tokens, temperature, seed=i, ignore_eos=True) for i in range(n)]


def summarize(stats: list, seconds: float) -> dict:
    gen, steps, checked = sum(s.generated for s in stats), sum(s.steps for s in stats), sum(s.checked for s in stats)
    ttft = [s.time_to_first_token_s for s in stats if s.time_to_first_token_s is not None]
    return {"tokens": gen, "seconds": seconds, "tokens_per_s": gen / seconds, "ms_per_token": 1000 * seconds / gen,
            "mean_latency_s": statistics.mean(s.elapsed_s for s in stats),
            "mean_ttft_s": statistics.mean(ttft) if ttft else None,
            "acceptance": sum(s.accepted for s in stats) / checked if checked else 0.0,
            "tokens_per_step": gen / steps if steps else 0.0,
            "drafted_per_step": sum(s.drafted for s in stats) / steps if steps else 0.0}


def make_drafter(b: Bench, overlap: bool, paper_adaedl: bool = False):
    from tandem.spec.adaedl import AdaEDLConfig

    cls = threaded_drafter_cls() if overlap else None
    config = AdaEDLConfig(stop="paper", lambda0=b.args.adaedl_lambda, alpha=b.args.adaedl_alpha) if paper_adaedl \
        else AdaEDLConfig()
    # Every row's drafter learns into the pair's acceptance tables, as a server's lane would.
    return (cls or LocalDrafter)(b.pair.draft, config, acceptance=b.pair.acceptance)


def run_tandem(b: Bench, row: Row, prompts, samplings, group: int) -> tuple[dict, list[list[int]]]:
    """Warm up on one short batch, then run the prompts `group` at a time as one continuous batch."""
    drafter = make_drafter(b, row.overlap, row.paper_adaedl)
    controller = LoadController() if row.load_control else None  # learns in the warm-up, as a lane would
    try:
        warm = [dataclasses.replace(s, max_tokens=min(b.args.warmup_tokens, s.max_tokens)) for s in samplings[:group]]
        warm_batch = SpecBatch(b.pair.target, drafter, b.pair.stop_ids, controller)
        run_batch(warm_batch, prompts[:group], warm, row.spec)
        batch = SpecBatch(b.pair.target, drafter, b.pair.stop_ids, controller)
        batch.controller = warm_batch.controller  # auto rows: what the lane learned in the warm-up
        graphs_before = graph_keys(b)
        done, start = [], time.perf_counter()
        for i in range(0, len(prompts), group):
            b.budget.check()
            done += run_batch(batch, prompts[i : i + group], samplings[i : i + group], row.spec)
        seconds = time.perf_counter() - start
    finally:
        if hasattr(drafter, "close"):
            drafter.close()
    overlapped = row.overlap and type(drafter) is not LocalDrafter
    # Graphs captured inside the timed run (their capture time is in `seconds`): should be none.
    captured = sorted(graph_keys(b) - graphs_before)
    out = {**summarize([d.stats for d in done], seconds), "overlap": overlapped, "step_ms": batch.timing.as_dict(),
           "captures_in_timed_run": len(captured), "captured_in_timed_run": captured}
    if controller is not None or row.spec.mode == "auto":
        out["load_control"] = batch.controller.state()
    return out, [d.token_ids for d in done]


@contextlib.contextmanager
def no_eos(*models):
    """HF generate runs to max_new_tokens, as tandem's ignore_eos requests do."""
    saved = [m.generation_config.eos_token_id for m in models]
    for m in models:
        m.generation_config.eos_token_id = None
    try:
        yield
    finally:
        for m, eos in zip(models, saved):
            m.generation_config.eos_token_id = eos


@torch.inference_mode()
def run_hf(b: Bench, row: Row, prompts, samplings) -> tuple[dict, list[list[int]]]:
    model, draft = b.pair.target.model, b.pair.draft.model
    s0 = samplings[0]
    kw = {"do_sample": s0.temperature > 0, "eos_token_id": None, "pad_token_id": b.pair.tokenizer.pad_token_id or 0}
    if s0.temperature > 0:
        kw.update(temperature=s0.temperature, top_k=0, top_p=1.0)
    if row.assisted:
        kw["assistant_model"] = draft
    outs, latencies = [], []
    with no_eos(model, draft):
        ids = torch.tensor([prompts[0]], device=b.pair.target.device)
        model.generate(ids, max_new_tokens=b.args.warmup_tokens, **kw)  # warm up
        for p, s in zip(prompts, samplings):
            b.budget.check()
            ids = torch.tensor([p], device=b.pair.target.device)
            torch.manual_seed(s.seed or 0)
            b.sync()
            t0 = time.perf_counter()
            out = model.generate(ids, max_new_tokens=s.max_tokens, **kw)
            b.sync()
            latencies.append(time.perf_counter() - t0)
            outs.append(out[0, len(p) :].tolist())
    gen, seconds = sum(len(o) for o in outs), sum(latencies)
    return {"tokens": gen, "seconds": seconds, "tokens_per_s": gen / seconds, "ms_per_token": 1000 * seconds / gen,
            "mean_latency_s": statistics.mean(latencies)}, outs


def agreement(outs: list[list[int]], ref: list[list[int]]) -> dict:
    """Share of outputs equal to the reference, and the mean common prefix relative to its length."""
    def prefix(a, r):
        n = next((i for i, (x, y) in enumerate(zip(a, r)) if x != y), min(len(a), len(r)))
        return n / max(1, len(r))

    ref = ref[: len(outs)]  # HF rows may run fewer prompts (--hf-prompts)
    return {"exact_fraction": sum(a == r for a, r in zip(outs, ref)) / len(ref),
            "mean_prefix_fraction": statistics.mean(prefix(a, r) for a, r in zip(outs, ref))}


def divergence_margins(b: Bench, prompts, outs: list[list[int]], ref: list[list[int]], limit: int = 4) -> list[dict]:
    """Where a T=0 row first left tandem AR's tokens: the target's two top logits after the common
    prefix, scored in one forward. A bf16 near-tie is a gap of a few bf16 steps at the logit's
    magnitude with the two tokens the top two; a bug shows as a large gap or another token.
    The step is that of the weights' dtype (bf16: 8 significant bits, fp32: 24)."""
    eng, found = b.pair.target, []
    model = getattr(eng, "model", None)
    dtype = next(model.parameters()).dtype if model is not None else torch.bfloat16
    bits = {torch.float32: 24, torch.float16: 11}.get(dtype, 8)
    for p, a, r in zip(prompts, outs, ref):
        j = next((i for i, (x, y) in enumerate(zip(a, r)) if x != y), None)
        if j is None:
            continue
        slot = eng.allocate()
        try:
            with torch.inference_mode():
                logits = eng.forward([slot], [list(p) + r[:j]], [1])[-1].float()
        finally:
            eng.release(slot)
        (v1, v2), (t1, t2) = (x.tolist() for x in torch.topk(logits, 2))
        step = 2.0 ** (math.floor(math.log2(abs(v1))) - (bits - 1)) if v1 else 0.0
        found.append({"position": j, "gap": v1 - v2, "dtype_step": step, "top2": [t1, t2],
                      "tokens_are_top2": {a[j], r[j]} == {t1, t2}})
        if len(found) == limit:
            break
    return found


def estimate_s(rows: list[dict], row: Row) -> float:
    """What a row will likely take: the section's AR row of the same engine, if any."""
    ref = "hf generate" if row.is_hf else AR
    return next((r["seconds"] for r in rows if r.get("name") == ref and "seconds" in r), 0.0)


def run_rows(b: Bench, section: str, rows: list[Row], prompts, temperature: float, group: int = 1,
             extra: dict | None = None) -> None:
    """Run each row on the same prompts; compare T=0 outputs with tandem AR's (and HF AR's)."""
    outputs: dict[str, list[list[int]]] = {}
    done_rows: list[dict] = []
    samplings = samplings_for(b, len(prompts), temperature)
    for row in rows:
        what = f"{section} {row.name}" + (f" (n={group})" if group > 1 else "")
        if b.budget.left() < estimate_s(done_rows, row):
            b.report.skip(what, f"{b.budget.left():.0f} s left, it would take ~{estimate_s(done_rows, row):.0f} s")
            continue
        try:
            if row.is_hf:
                n = b.args.hf_prompts or len(prompts)
                result, outs = run_hf(b, row, prompts[:n], samplings[:n])
            else:
                result, outs = run_tandem(b, row, prompts, samplings, group)
        except OutOfTime as e:
            b.report.skip(what, f"{e} mid-row")
            continue
        except Exception as e:  # noqa: BLE001 -- one broken row must not cost the rest of a one-shot GPU run
            traceback.print_exc()
            b.report.add_row(section, {"name": row.name, "temperature": temperature, "error": f"{type(e).__name__}: {e}"})
            continue
        outputs[row.name] = outs
        rec = {"name": row.name, "engine": "hf" if row.is_hf else "tandem", "temperature": temperature,
               "prompts": len(outs), **(extra or {}), **spec_fields(row), **result}
        ar = next((r for r in done_rows if r["name"] == AR), None)
        rec["speedup_vs_ar"] = rec["tokens_per_s"] / ar["tokens_per_s"] if ar else None
        if temperature == 0:
            add_agreement(b, rec, outputs, prompts)
        done_rows.append(rec)
        b.report.add_row(section, rec)


def spec_fields(row: Row) -> dict:
    if row.is_hf:
        return {"mode": "hf assisted" if row.assisted else "hf ar"}
    return {"mode": row.spec.mode, "max_draft": row.spec.max_draft, "adaedl": row.spec.adaedl, "load_control": row.load_control}


def add_agreement(b: Bench, rec: dict, outputs: dict, prompts) -> None:
    """T=0: tandem rows must equal tandem AR (lossless); HF rows are compared with it too.
    Where a tandem row differs, the target's logit gap at each first difference tells a bf16
    near-tie from a bug (divergence_margins)."""
    ar, outs = outputs.get(AR), outputs[rec["name"]]
    if ar is None:
        return
    if rec["engine"] == "tandem":
        rec["lossless"] = agreement(outs, ar)
        if rec["lossless"]["exact_fraction"] < 1.0:
            margins = rec["lossless"]["divergences"] = divergence_margins(b, prompts, outs, ar)
            ties = sum(m["tokens_are_top2"] and m["gap"] <= 4 * m["dtype_step"] for m in margins)
            where = f"n={rec['concurrency']}, " if "concurrency" in rec else ""
            why = (f"at {ties} of {len(margins)} first differences the two tokens are the target's top two "
                   f"within 4 steps of its dtype (largest gap {max(m['gap'] for m in margins):.3g}): near-ties"
                   f"{'' if ties == len(margins) else ', or a bug'}") if margins else "only lengths differ"
            b.report.warn(f"{rec['name']} ({where}T=0) differs from tandem AR on "
                          f"{1 - rec['lossless']['exact_fraction']:.0%} of prompts (mean common prefix "
                          f"{rec['lossless']['mean_prefix_fraction']:.1%}); {why}")
        return
    rec["agreement_with_tandem_ar"] = agreement(outs, ar)
    if "hf generate" in outputs and rec["name"] != "hf generate":
        rec["agreement_with_hf_ar"] = agreement(outs, outputs["hf generate"])
    if any(len(o) != len(r) for o, r in zip(outs, ar)):
        rec["note"] = "HF stopped before max_new_tokens on some prompts"


# --------------------------------------------------------------------------- sections


def latency_rows(b: Bench, temperature: float) -> list[Row]:
    g, cap = b.gamma, min(16, 2 * b.gamma)
    rows = [Row(AR, SpecParams("ar")), Row("hf generate"), Row(AUTO, SpecParams("auto", 16, adaedl=True))]
    rows += [Row(f"sd k={k}", SpecParams("sd", k, adaedl=False)) for k in b.args.sd_ks]
    rows += [Row("sd+adaedl (cap 16)", SpecParams("sd", 16, adaedl=True)),
             Row("sd+adaedl paper rule (cap 16)", SpecParams("sd", 16, adaedl=True), paper_adaedl=True),
             Row(f"pearl γ={g}", SpecParams("pearl", g, adaedl=False), overlap=True),
             Row(f"pearl+adaedl (cap {cap})", SpecParams("pearl", cap, adaedl=True), overlap=True),
             Row(f"pearl γ={g} no overlap", SpecParams("pearl", g, adaedl=False)),
             Row(f"pearl+adaedl (cap {cap}) no overlap", SpecParams("pearl", cap, adaedl=True))]
    rows.append(Row("hf assisted", assisted=True))
    return [r for r in rows if not (r.is_hf and b.args.skip_hf)]


def latency(b: Bench, temperature: float) -> None:
    section = f"latency_t{temperature:g}"
    b.report.rows(section)
    run_rows(b, section, latency_rows(b, temperature), b.code[: b.args.prompts], temperature)


def best(b: Bench, mode: str, fallback: Row) -> Row:
    """The fastest T=0 batch-1 row of a mode (static SD: no AdaEDL; PEARL: with or without overlap)."""
    rows = [r for r in b.report.rows("latency_t0") if r.get("mode") == mode and "tokens_per_s" in r
            and (mode != "sd" or not r["adaedl"]) and "paper" not in r["name"]]
    if not rows:
        return fallback
    r = max(rows, key=lambda r: r["tokens_per_s"])
    return Row(r["name"], SpecParams(mode, r["max_draft"], adaedl=r["adaedl"]), overlap=r["overlap"])


def concurrency(b: Bench) -> None:
    cap = min(16, 2 * b.gamma)
    sd = best(b, "sd", Row("sd k=5", SpecParams("sd", 5, adaedl=False)))
    pearl = best(b, "pearl", Row(f"pearl+adaedl (cap {cap})", SpecParams("pearl", cap, adaedl=True), overlap=True))
    rows = [Row(AR, SpecParams("ar")), Row(AUTO, SpecParams("auto", 16, adaedl=True)), sd,
            Row("sd k=3", SpecParams("sd", 3, adaedl=False)), Row("sd k=8", SpecParams("sd", 8, adaedl=False)),
            Row("sd+adaedl (cap 16)", SpecParams("sd", 16, adaedl=True)), pearl]
    rows = list({r.name: r for r in rows}.values())  # the best SD may be one of the fixed k rows
    # Every window length these rows ask for, the shorter tails at a request's end included (else
    # the timed rows pay for capturing the tails).
    steps = range(1, max(16, sd.spec.max_draft, pearl.spec.max_draft) + 1)
    temperatures = [float(t) for t in b.args.concurrency_temperatures.split(",")]
    # Every batch bucket up to the largest n: requests of one batch finish at different steps, so
    # a batch of 64 runs at 32, 16, ... rows at its end (a capture inside a timed row is recorded
    # in `captured_in_timed_run`).
    from tandem.engine.graphs import BATCH_BUCKETS

    runner = graphs_of(b.pair.target)
    buckets = runner.batch_buckets if runner is not None else BATCH_BUCKETS  # the engine's own (its top one may be odd)
    sizes = [s for s in buckets if 1 < s <= max(b.args.concurrency)]
    seconds = warm_graphs(b, sizes, steps, sampled=tuple({t > 0 for t in temperatures}))
    freeze_heap()  # the graphs' Python side too: no collection walks it inside a timed row
    b.report.data.setdefault("concurrency", {"rows": []})["graph_warmup_s"] = seconds
    for t in temperatures:
        for n in b.args.concurrency:
            if b.budget.left() <= 0:
                b.report.skip(f"concurrency n={n} T={t:g}", "deadline reached")
                continue
            run_rows(b, "concurrency", rows, b.code[:n], t, group=n, extra={"concurrency": n})


@torch.inference_mode()
def lossless_fp32(b: Bench) -> None:
    """The pair in fp32 on the same device: every tandem mode's greedy tokens against tandem AR.

    In bf16 a verify forward (k+1 query rows) and a decode forward (1 row) take different GEMM
    kernels, so near-tied argmaxes can flip between them and outputs drift apart; fp32 leaves
    rounding differences ~1e-6, far under the gap between the two best logits. Equality here
    says a bf16 difference is numerics, not the algorithm.
    """
    args = b.args
    n = min(args.lossless_prompts, len(b.code))
    fp32 = load_pair(args.target, args.draft, device=args.device, dtype="float32", engine="native",
                     max_slots=max(4, n), max_context=max(len(p) for p in b.code[:n]) + args.lossless_tokens + 40,
                     draft_device=args.draft_device)
    saved = b.pair
    b.pair = fp32
    try:
        g = b.gamma
        rows = [Row(AR, SpecParams("ar")), Row("sd k=5", SpecParams("sd", 5, adaedl=False)),
                Row("sd+adaedl (cap 16)", SpecParams("sd", 16, adaedl=True)),
                Row(f"pearl γ={g}", SpecParams("pearl", g, adaedl=False), overlap=True),
                Row(f"pearl+adaedl (cap {min(16, 2 * g)})", SpecParams("pearl", min(16, 2 * g), adaedl=True), overlap=True)]
        saved_tokens, args.max_tokens = args.max_tokens, args.lossless_tokens
        try:
            b.report.rows("lossless_fp32")
            for group in (1, n):
                run_rows(b, "lossless_fp32", rows, b.code[:n], 0.0, group=group, extra={"concurrency": group})
        finally:
            args.max_tokens = saved_tokens
    finally:
        b.pair = saved
        del fp32
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def natural_language(b: Bench) -> None:
    g = b.gamma
    rows = [Row(AR, SpecParams("ar")), best(b, "sd", Row("sd k=5", SpecParams("sd", 5, adaedl=False))),
            best(b, "pearl", Row(f"pearl γ={g}", SpecParams("pearl", g, adaedl=False), overlap=True))]
    b.report.rows("natural_language")
    run_rows(b, "natural_language", rows, b.nl, 0.0)


# --------------------------------------------------------------------------- main


def parse_args(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target", default="tandem:tiny/target")
    ap.add_argument("--draft", default="tandem:tiny/draft")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--draft-device", default=None, help="e.g. cuda:1: the draft on a second GPU")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--prompts", type=int, default=8, help="code prompts for the batch-1 sections")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--temperatures", default="0,1")
    ap.add_argument("--concurrency", default="1,4,16,64", type=lambda s: [int(x) for x in s.split(",")])
    ap.add_argument("--concurrency-temperatures", default="0,1", help="temperatures of the concurrency sweep")
    ap.add_argument("--sd-ks", default="3,5,8,16", type=lambda s: [int(x) for x in s.split(",")],
                    help="static SD draft lengths of the batch-1 sections")
    ap.add_argument("--nl-prompts", type=int, default=len(NL_PROMPTS), help="natural-language prompts (at most 12)")
    ap.add_argument("--deadline-s", type=float, default=None, help="overall budget; later work is skipped")
    ap.add_argument("--warmup-tokens", type=int, default=16, help="tokens of the untimed run before each row")
    ap.add_argument("--adaedl-lambda", type=float, default=0.5, help="λ0 of the paper-rule AdaEDL row")
    ap.add_argument("--adaedl-alpha", type=float, default=0.9, help="α of the paper-rule AdaEDL row")
    ap.add_argument("--skip-hf", action="store_true", help="no Hugging Face generate rows")
    ap.add_argument("--hf-prompts", type=int, default=None, help="run HF rows on the first N prompts only")
    ap.add_argument("--calibration-iters", type=int, default=30, help="timed forwards per calibration median")
    ap.add_argument("--lossless-prompts", type=int, default=4, help="prompts of the fp32 equality section")
    ap.add_argument("--lossless-tokens", type=int, default=64, help="tokens per prompt in the fp32 section")
    ap.add_argument("--sections", default=",".join(SECTIONS), help=f"which to run, of {','.join(SECTIONS)}")
    ap.add_argument("--resume", action="store_true",
                    help="start from the rows already in --out (e.g. a first call's calibration and latency)")
    ap.add_argument("--out", default=str(REPO / "benchmarks/results/gpu_bench.json"))
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    budget = Budget(args.deadline_s)
    report = Report(Path(args.out), budget)
    if args.resume and report.path.is_file():
        report.data = json.loads(report.path.read_text())
        report.data["meta"].setdefault("calls", []).append(shlex.join(["python", "benchmarks/gpu_bench.py", *argv]))
    _quiet_transformers()
    b = load(args, report, budget)
    if not args.resume:
        report.data["meta"] = meta(b, argv)
    b.gamma = report.data.get("calibration", {}).get("gamma", b.gamma)
    report.data["meta"]["graph_warmup_s"] = warm_graphs(b, [1])
    start = time.perf_counter()  # Triton compiles here, not inside the first sampled row (tandem/kernels/warmup.py)
    warm_kernels(b.pair.target.vocab_size, b.pair.target.device)
    report.data["meta"]["kernel_warmup_s"] = time.perf_counter() - start
    report.data["meta"]["frozen_objects"] = freeze_heap()  # as a lane does before it serves
    report.save()
    print(f"[{budget.elapsed():6.1f}s] loaded; {report.data['meta']['params']} params, features {b.features}", flush=True)
    sections = [("calibration", lambda: calibration(b))]
    sections += [(f"latency_t{t:g}", lambda t=t: latency(b, t)) for t in map(float, args.temperatures.split(","))]
    sections += [("concurrency", lambda: concurrency(b)), ("natural_language", lambda: natural_language(b)),
                 ("lossless_fp32", lambda: lossless_fp32(b))]
    wanted = set(args.sections.split(","))
    unknown = wanted - set(SECTIONS)
    assert not unknown, f"unknown sections {sorted(unknown)}; choose from {SECTIONS}"
    for name, run in sections:
        if name.split("_t")[0] not in wanted and name not in wanted:
            continue
        if budget.left() <= 0:
            report.skip(name, f"deadline of {args.deadline_s:g} s reached")
            continue
        try:
            run()
        except Exception as e:  # noqa: BLE001 -- report and go on: the later sections are still worth having
            traceback.print_exc()
            report.data.setdefault("errors", []).append(f"{name}: {type(e).__name__}: {e}")
            report.save()
    report.data["meta"]["total_s"] = budget.elapsed()
    report.data["goals"] = goals(report.data)
    report.save()
    print_table(report.data)
    print(f"wrote {args.out} in {budget.elapsed():.0f} s", flush=True)
    return 0


def _quiet_transformers() -> None:
    """The reply shows only the tail of the output: keep it for the rows, not progress bars."""
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def row_line(r: dict) -> str:
    if "error" in r:
        return f"{r['name']:<26} ERROR {r['error']}"
    n = f"n={r['concurrency']:<3} " if "concurrency" in r else ""
    vs = f"{r['speedup_vs_ar']:5.2f}x" if r.get("speedup_vs_ar") else "     -"
    acc = f"{r['acceptance']:5.2f} {r['tokens_per_step']:5.2f}" if "acceptance" in r else "    -     -"
    same = r.get("lossless") or r.get("agreement_with_tandem_ar")
    same = f"{same['exact_fraction']:4.0%} {same['mean_prefix_fraction']:4.0%}" if same else "   -    -"
    st = r.get("step_ms")
    st = f"{st['draft_ms']:6.2f} {st['verify_ms']:6.2f} {st['wait_ms']:6.2f} {st['total_ms']:6.2f}" if st else ""
    cap = f"  ({r['captures_in_timed_run']} graphs captured in the timed run)" if r.get("captures_in_timed_run") else ""
    return f"T={r['temperature']:g} {n}{r['name']:<26} {r['tokens_per_s']:8.1f} {vs} {acc} {same} {st}{cap}{stall_note(r)}"


def stall_note(r: dict) -> str:
    """Names a step that took over a tenth of the row's step time by itself: a one-off stall
    (e.g. a garbage collection or a graph capture: hundreds of ms outside drafting and verifying)."""
    st = r.get("step_ms") or {}
    slow = st.get("slowest")
    if not slow or slow["total_ms"] <= 0.1 * st["steps"] * st["total_ms"]:
        return ""
    return (f"  (step {slow['step']} at batch {slow['batch']} took {slow['total_ms']:.0f} ms: draft {slow['draft_ms']:.0f}, "
            f"verify {slow['verify_ms']:.0f}, exchange {slow['exchange_ms']:.0f})")


GOALS = {  # the default's goals, measured side by side in this run: (what, target ratio)
    "auto_vs_best_static": ("the default (auto) vs the best static setting of each cell (worst cell)", 0.98),
    "auto_vs_ar": ("the default (auto) vs tandem AR (worst cell)", 1.0),
    "auto_vs_ar_n64_t0": ("the default (auto) vs tandem AR, 64 requests, T=0", 1.4),
    "auto_vs_best_static_k_t1": ("the default (auto) vs the best static k, batch 1, T=1", 1.05),
    "best_vs_hf_assisted_t0": ("tandem's best mode vs HF assisted generation, batch 1, T=0", 3.0),
}


def cells(data: dict) -> dict:
    """Every (section, concurrency, temperature) cell's tandem rows by name."""
    out: dict = {}
    for section in [k for k in data if k.startswith("latency_")] + ["concurrency"]:
        for r in data.get(section, {}).get("rows", []):
            if r.get("engine") == "tandem" and "tokens_per_s" in r:
                key = ("latency" if section != "concurrency" else "concurrency", r.get("concurrency", 1), r["temperature"])
                out.setdefault(key, {})[r["name"]] = r
    return out


def goals(data: dict) -> dict:
    """The goal ratios from the rows of each cell (side by side in this run); per cell in `by_cell`."""
    by_cell, worst = {}, {}
    for (section, n, t), rows in cells(data).items():
        auto, ar = rows.get(AUTO), rows.get(AR)
        static = [r for name, r in rows.items() if name != AUTO and "load control" not in name
                  and not r.get("adaedl") and r.get("mode") in ("ar", "sd", "pearl")]
        if auto is None or ar is None or not static:
            continue
        best = max(static, key=lambda r: r["tokens_per_s"])
        cell = f"{section} n={n} T={t:g}"
        by_cell[cell] = {"auto_vs_best_static": auto["tokens_per_s"] / best["tokens_per_s"], "best_static": best["name"],
                         "auto_vs_ar": auto["tokens_per_s"] / ar["tokens_per_s"]}
        for k in ("auto_vs_best_static", "auto_vs_ar"):
            worst[k] = min(worst.get(k, float("inf")), by_cell[cell][k])
        if section == "concurrency" and n == 64 and t == 0:
            worst["auto_vs_ar_n64_t0"] = by_cell[cell]["auto_vs_ar"]
        if n == 1 and t == 1 and section == "latency":
            ks = [r for r in static if r.get("mode") == "sd"]
            if ks:
                worst["auto_vs_best_static_k_t1"] = auto["tokens_per_s"] / max(r["tokens_per_s"] for r in ks)
    t0 = {r["name"]: r for r in data.get("latency_t0", {}).get("rows", []) if "tokens_per_s" in r}
    spec = [r["tokens_per_s"] for r in t0.values() if r.get("engine") == "tandem" and r.get("mode") != "ar"]
    if spec and "hf assisted" in t0:
        worst["best_vs_hf_assisted_t0"] = max(spec) / t0["hf assisted"]["tokens_per_s"]
    out = {k: {"what": GOALS[k][0], "goal": GOALS[k][1], "ratio": v, "met": v >= GOALS[k][1]} for k, v in worst.items()}
    return {**out, "by_cell": by_cell} if by_cell else out


def print_table(data: dict) -> None:
    print(f"\n{data['meta'].get('command', '')}")
    print(f"devices {data['meta'].get('devices')}  params {data['meta'].get('params')}")
    cal = data.get("calibration")
    if cal:
        print(f"calibration: target {cal['target_decode_ms']:.2f} ms, draft {cal['draft_decode_ms']:.2f} ms, "
              f"c {cal['c']:.2f}, verify {cal['target_verify_ms']}")
    print(f"{'section':<16} {'T':<4}{'row':<32} {'tok/s':>7} {'vs AR':>6} {'acc':>5} {'tok/st':>5} "
          f"{'same':>4} {'pref':>4} {'draft':>6} {'verify':>6} {'wait':>6} {'step':>6}  (same/pref: vs tandem AR; ms/step)")
    sections = [k for k in data if k.startswith("latency_")] + ["concurrency", "natural_language", "lossless_fp32"]
    for section in sections:
        for r in data.get(section, {}).get("rows", []):
            print(f"{section:<16} {row_line(r)}")
    for cell, g in data.get("goals", {}).get("by_cell", {}).items():
        print(f"cell {cell}: auto {g['auto_vs_best_static']:.2f}x the best static ({g['best_static']}), "
              f"{g['auto_vs_ar']:.2f}x AR")
    for name, g in data.get("goals", {}).items():
        if name != "by_cell":
            print(f"goal: {g['what']}: {g['ratio']:.2f}x (goal {g['goal']:g}x, {'met' if g['met'] else 'missed'})")
    for line in data["skipped"]:
        print(f"skipped: {line}")
    for line in data["warnings"]:
        print(f"WARNING: {line}")
    for line in data.get("errors", []):
        print(f"ERROR: {line}")


if __name__ == "__main__":
    sys.exit(main())
