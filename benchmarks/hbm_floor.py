"""The physical yardstick for batch-1 decoding: how close is a step to reading the weights once?

    python benchmarks/hbm_floor.py --target /tmp/bench/target --device cuda --deadline 240
    python benchmarks/hbm_floor.py --device cpu --dtype float32 --skip-8b --copy-gb 0.05   # tiny target

1. Device-to-device copy bandwidth: a >= 1 GB tensor copied (--copy-gb), timed with CUDA events,
   median of >= 20 copies, counting bytes read + written.
2. For the checkpoint (--target) and an 8B-shaped Llama with random weights (hidden 4096, 32
   layers, 32 heads, 8 KV heads, intermediate 14336, vocab 128256, built on the device), batch-1
   greedy decode ms/token through tandem's engine (CUDA graphs) and through transformers'
   `generate`, against the floor = weight bytes / bandwidth.

Two floors: "all weights", and "minus the embedding table" (a token reads one row of the input
embedding, not the table). An untied model's lm_head is a separate matrix that is read in full,
so its per-token floor is the second; a tied model's lm_head *is* the table, so its floor is the
first. KV-cache reads (a few MB at these lengths) are left out. Weights are drawn from a small
normal, not zeros: all-zero operands can run measurably faster on some GPUs (data-dependent
power and clock), which would flatter the engine. Prints a table and writes JSON.
"""
from __future__ import annotations

import argparse
import gc
import json
import platform
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # run as a script from a checkout that is not pip-installed
    sys.path.insert(0, str(REPO))

import torch

from tandem.engine.llama import LlamaEngine
from tandem.engine.pair import DTYPES, load_hf_model

LLAMA_8B = {"hidden_size": 4096, "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
            "intermediate_size": 14336, "vocab_size": 128256}


class Timer:
    """Wall time of a block, synchronising the device first and last (CUDA events on a GPU)."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    def __call__(self, fn) -> float:  # seconds
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1000
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0


def copy_bandwidth(device: torch.device, gigabytes: float, iters: int) -> dict:
    """Bytes read + written per second of a device-to-device tensor copy (median of iters)."""
    n = int(gigabytes * 1e9) // 2
    src = torch.empty(n, dtype=torch.bfloat16, device=device).uniform_()
    dst = torch.empty_like(src)
    timer = Timer(device)
    for _ in range(3):
        dst.copy_(src)
    times = [timer(lambda: dst.copy_(src)) for _ in range(iters)]
    moved = 2 * src.numel() * src.element_size()
    return {"bytes_per_copy": moved, "median_s": statistics.median(times), "min_s": min(times),
            "bytes_per_s": moved / statistics.median(times), "iters": iters}


def weight_bytes(model) -> dict:
    total = sum(p.numel() * p.element_size() for p in model.parameters())  # tied weights counted once
    embed = model.get_input_embeddings().weight
    tied = model.get_output_embeddings().weight.data_ptr() == embed.data_ptr()
    return {"params": sum(p.numel() for p in model.parameters()), "weight_bytes": total,
            "embedding_bytes": embed.numel() * embed.element_size(), "tied_embeddings": tied}


def build_8b(device: torch.device, dtype: torch.dtype):
    """LlamaForCausalLM of Llama-3-8B's shape, random N(0, 0.02) weights, made on the device."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**LLAMA_8B, max_position_embeddings=2048, tie_word_embeddings=False,
                         bos_token_id=None, eos_token_id=None, pad_token_id=None)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # no full-size fp32 copy on the way
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(default)
    gen = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02, generator=gen)  # not zeros: see the module docstring
    return model.eval()


@torch.inference_mode()
def engine_decode(model, prompt: list[int], steps: int, device: torch.device) -> dict:
    """tandem's engine at batch 1: prefill, then `steps` decode steps fed back by argmax."""
    engine = LlamaEngine(model, max_slots=1, max_context=1024)
    if engine.graphs is not None:
        engine.graphs.warmup(batch_sizes=[1], query_lens=[1])
    times = []
    for timed in (False, True):  # the first pass warms everything the second one times
        slot = engine.allocate()
        seq = list(prompt)
        token = int(engine.forward([slot], [seq], [1]).argmax())
        for _ in range(steps if timed else 16):
            seq.append(token)
            t0 = time.perf_counter()
            token = int(engine.forward([slot], [seq], [1]).argmax())  # the argmax syncs the device
            if timed:
                times.append(time.perf_counter() - t0)
        engine.release(slot)
    del engine
    return {"ms_per_token": 1000 * statistics.median(times), "mean_ms_per_token": 1000 * statistics.mean(times),
            "steps": steps, "cuda_graphs": device.type == "cuda"}


@torch.inference_mode()
def hf_decode(model, prompt: list[int], steps: int, device: torch.device) -> dict:
    """transformers' greedy generate: (time of steps+1 new tokens - time of 1) / steps."""
    ids = torch.tensor([prompt], device=device)
    kw = {"do_sample": False, "eos_token_id": None, "pad_token_id": 0}
    saved = model.generation_config.eos_token_id
    model.generation_config.eos_token_id = None  # run to max_new_tokens
    timer = Timer(device)
    try:
        model.generate(ids, max_new_tokens=8, **kw)  # warm up
        first = statistics.median(timer(lambda: model.generate(ids, max_new_tokens=1, **kw)) for _ in range(3))
        total = timer(lambda: model.generate(ids, max_new_tokens=steps + 1, **kw))
    finally:
        model.generation_config.eos_token_id = saved
    return {"ms_per_token": 1000 * (total - first) / steps, "prefill_and_first_ms": 1000 * first, "steps": steps}


def measure(name: str, model, args, bandwidth: float, device: torch.device) -> dict:
    sizes = weight_bytes(model)
    vocab = model.config.vocab_size
    prompt = torch.randint(1, vocab, (args.prompt_len,), generator=torch.Generator().manual_seed(0)).tolist()
    minus = sizes["weight_bytes"] - sizes["embedding_bytes"]
    floor_all = 1000 * sizes["weight_bytes"] / bandwidth
    floor_minus = 1000 * minus / bandwidth
    floor = floor_all if sizes["tied_embeddings"] else floor_minus
    row = {"name": name, **sizes, "floor_all_weights_ms": floor_all, "floor_minus_embedding_ms": floor_minus,
           "floor_ms": floor}
    print(f"[{name}] {sizes['params'] / 1e6:.1f} M params, {sizes['weight_bytes'] / 1e9:.2f} GB; floor {floor:.3f} ms/token",
          flush=True)
    row["hf_generate"] = hf_decode(model, prompt, args.steps, device)  # first: the engine fuses the weights
    print(f"[{name}] transformers generate {row['hf_generate']['ms_per_token']:.2f} ms/token", flush=True)
    row["tandem"] = engine_decode(model, prompt, args.steps, device)
    print(f"[{name}] tandem engine {row['tandem']['ms_per_token']:.2f} ms/token", flush=True)
    for k in ("tandem", "hf_generate"):
        row[k]["fraction_of_floor"] = floor / row[k]["ms_per_token"]  # 1.0 = reading weights at copy speed
    return row


def parse_args(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target", default="tandem:tiny/target", help="checkpoint folder")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPES))
    ap.add_argument("--skip-8b", action="store_true", help="no 8B-shaped random model")
    ap.add_argument("--copy-gb", type=float, default=1.0, help="size of the copied tensor")
    ap.add_argument("--iters", type=int, default=20, help="timed copies (median)")
    ap.add_argument("--steps", type=int, default=128, help="decode steps timed")
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--deadline", type=float, default=None, help="seconds; later parts are skipped")
    ap.add_argument("--out", default=str(REPO / "benchmarks/results/hbm_floor.json"))
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    start, device = time.perf_counter(), torch.device(args.device)
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    out = Path(args.out)
    report = {"device": device_name(device), "dtype": args.dtype, "args": vars(args), "skipped": [],
              "versions": {"torch": torch.__version__, "transformers": transformers.__version__}, "models": []}
    report["bandwidth"] = copy_bandwidth(device, args.copy_gb, args.iters)
    bw = report["bandwidth"]["bytes_per_s"]
    print(f"copy bandwidth {bw / 1e12:.3f} TB/s (read + write, {args.copy_gb:g} GB tensor)", flush=True)
    save(out, report)
    builders = [("checkpoint " + Path(args.target).name, lambda: load_hf_model(args.target, args.device, args.dtype))]
    if not args.skip_8b:
        builders.append(("llama-8b-shape (random)", lambda: build_8b(device, DTYPES[args.dtype])))
    for name, build in builders:
        if args.deadline and time.perf_counter() - start > args.deadline:
            report["skipped"].append(name)
            print(f"SKIPPED {name}: deadline of {args.deadline:g} s reached", flush=True)
            continue
        model = build()
        report["models"].append(measure(name, model, args, bw, device))
        save(out, report)
        del model
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    save(out, report)
    print_table(report)
    print(f"wrote {out} in {time.perf_counter() - start:.0f} s", flush=True)
    return 0


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def save(path: Path, report: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=1))


def print_table(report: dict) -> None:
    bw = report["bandwidth"]["bytes_per_s"]
    print(f"\n{report['device']}: copy {bw / 1e12:.3f} TB/s")
    print(f"{'model':<28} {'GB':>6} {'floor all':>9} {'floor -emb':>10} {'tandem':>8} {'% floor':>7} "
          f"{'HF gen':>8} {'% floor':>7}   (ms/token, batch 1)")
    for m in report["models"]:
        t, h = m["tandem"], m["hf_generate"]
        print(f"{m['name']:<28} {m['weight_bytes'] / 1e9:6.2f} {m['floor_all_weights_ms']:9.3f} "
              f"{m['floor_minus_embedding_ms']:10.3f} {t['ms_per_token']:8.3f} {t['fraction_of_floor']:7.1%} "
              f"{h['ms_per_token']:8.3f} {h['fraction_of_floor']:7.1%}")


if __name__ == "__main__":
    sys.exit(main())
