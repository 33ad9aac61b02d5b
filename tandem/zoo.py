"""Build the project's own model pair: a small Llama target LM and a draft LM distilled from it.

Why this exists: speculative decoding needs a target model and a draft that agrees with it
often, and tandem's tests and benchmarks must not depend on a model hub. Every machine that
runs Python carries the same training text -- the standard library's source code -- so we
train on that, hold out a deterministic slice of files for evaluation, and save both models
in plain Hugging Face format (LlamaForCausalLM + a byte-level BPE tokenizer) so anything that
speaks `from_pretrained` can load them offline.

    python -m tandem.zoo --preset tiny --out tandem/models/tiny --device cuda --minutes 4
    python -m tandem.zoo --preset tiny --out /tmp/zoo --device cpu --steps 30

Pipeline: corpus -> tokenizer -> train target (next-token CE) -> distil draft (KL to the
target's distribution on the same windows) -> save in bf16 -> reload from disk in fp32 ->
evaluate (held-out CE, greedy agreement, generation-based acceptance) -> zoo_report.json.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import json
import math
import os
import platform
import random
import sys
import sysconfig
import time
import types
import zlib
from pathlib import Path
from typing import Callable, Iterator

import torch
import torch.nn.functional as F

EOS = "<|endoftext|>"
SPLITS = ("train", "heldout")


# --------------------------------------------------------------------------- presets


@dataclasses.dataclass(frozen=True)
class ModelShape:
    """Size of one Llama model; head_dim is hidden // heads."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads


@dataclasses.dataclass(frozen=True)
class Preset:
    """Everything that defines a model pair and how it is trained (besides seed and budget)."""

    name: str
    target: ModelShape
    draft: ModelShape
    vocab_size: int
    max_positions: int
    seq_len: int  # training window length in tokens
    batch_size: int  # windows per optimizer step
    target_lr: float
    draft_lr: float
    warmup_steps: int
    corpus_mb: float  # cap on training text, in MB of UTF-8
    eval_windows: int  # held-out windows of seq_len for CE and teacher-forced agreement
    # With --minutes the target never trains past this many passes over its training
    # tokens: the stdlib is small (9.5 MB on Ubuntu's python3.12, which ships without
    # test/), and the tiny target's held-out CE bottoms out near 6-8 epochs, then rises
    # (3.05 after 18 epochs, 4.8 after 53).
    max_epochs: float
    probe_every: int  # steps between held-out probes shown in the progress bar
    rope_theta: float = 10000.0


def presets() -> types.MappingProxyType:
    """The selectable presets, read-only (a function, so there is no mutable module state)."""
    table = {
        # For unit tests only: trains in seconds on a CPU, quality is meaningless.
        "micro": Preset(
            name="micro",
            target=ModelShape(hidden=32, layers=1, heads=2, kv_heads=2, intermediate=64),
            draft=ModelShape(hidden=16, layers=1, heads=1, kv_heads=1, intermediate=32),
            vocab_size=300, max_positions=128, seq_len=64, batch_size=8,
            target_lr=3e-3, draft_lr=3e-3, warmup_steps=2, corpus_mb=0.2, eval_windows=8,
            max_epochs=100.0, probe_every=0,
        ),
        # Shipped in the package (tandem/models/tiny): small enough for CPU tests, good enough to
        # produce Python-looking completions and a meaningful acceptance rate.
        "tiny": Preset(
            name="tiny",
            target=ModelShape(hidden=256, layers=4, heads=4, kv_heads=4, intermediate=768),
            draft=ModelShape(hidden=128, layers=2, heads=2, kv_heads=2, intermediate=384),
            vocab_size=4096, max_positions=1024, seq_len=256, batch_size=64,
            target_lr=2e-3, draft_lr=3e-3, warmup_steps=200, corpus_mb=64.0, eval_windows=128,
            max_epochs=6.0, probe_every=250,
        ),
        # For GPU benchmarks: a ~1.15B target and a ~65M draft. Weights are too big to ship.
        "bench": Preset(
            name="bench",
            target=ModelShape(hidden=2048, layers=24, heads=16, kv_heads=8, intermediate=5632),
            # Few wide layers: at batch 1 a CUDA-graphed step costs per layer, not per FLOP,
            # so 4 x 1024 drafts faster than 12 x 768 at a similar size (c = target/draft step).
            draft=ModelShape(hidden=1024, layers=4, heads=8, kv_heads=4, intermediate=3584),
            vocab_size=8192, max_positions=2048, seq_len=1024, batch_size=16,
            target_lr=3e-4, draft_lr=1e-3, warmup_steps=200, corpus_mb=64.0, eval_windows=64,
            max_epochs=4.0, probe_every=250,
        ),
    }
    return types.MappingProxyType(table)


# --------------------------------------------------------------------------- corpus


def stdlib_root() -> Path:
    """The standard library folder of the running interpreter (not a venv's site-packages)."""
    return Path(sysconfig.get_paths()["stdlib"])


def split_of(relpath: str) -> str:
    """Held-out iff crc32(relpath) % 10 == 0: stable across machines and Python versions."""
    return "heldout" if zlib.crc32(relpath.encode()) % 10 == 0 else "train"


def _stdlib_relpaths(root: Path) -> list[str]:
    """Sorted relpaths of *.py under root, not descending into third-party package folders."""
    skip = {"site-packages", "dist-packages", "__pycache__"}
    rels = []
    for folder, subdirs, files in os.walk(root):
        subdirs[:] = [d for d in subdirs if d not in skip]  # prune: site-packages can be huge
        rels += [Path(folder, f).relative_to(root).as_posix() for f in files if f.endswith(".py")]
    return sorted(rels)


def _read_split(split: str) -> Iterator[tuple[str, Path, str]]:
    """Yield (relpath, path, text) for the split's decodable files, sorted by relpath."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    root = stdlib_root()
    for rel in _stdlib_relpaths(root):
        if split_of(rel) != split:
            continue
        path = root / rel
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue  # a few test fixtures are deliberately not UTF-8
        yield rel, path, text


def corpus_files(split: str) -> list[Path]:
    """Paths of the split's stdlib *.py files, sorted by path relative to the stdlib."""
    return [path for _, path, _ in _read_split(split)]


def load_documents(split: str, max_mb: float) -> list[str]:
    """Texts of a split, capped at max_mb MB.

    Files are taken in crc32 order of their relpath rather than alphabetically, so a cap
    samples the whole library instead of only modules starting with 'a'..'c'; the order
    does not depend on the training seed, so capped eval sets stay comparable across runs.
    """
    files = sorted(_read_split(split), key=lambda item: zlib.crc32(b"order/" + item[0].encode()))
    budget = int(max_mb * 1e6)
    docs: list[str] = []
    for _, _, text in files:
        if budget <= 0:
            break
        docs.append(text[:budget])  # chars ~ bytes for source code; good enough for a cap
        budget -= len(docs[-1].encode())
    return docs


def heldout_prompts(n: int, seed: int = 0, min_lines: int = 6, max_lines: int = 12) -> list[str]:
    """n completion prompts: the first 6-12 lines of a def/class from held-out files.

    Prompts end at the end of a line *without* the trailing newline, so the model's first
    token is the usual merged newline+indent token, as in training.
    """
    candidates: list[list[str]] = []
    for _, _, text in _read_split("heldout"):
        lines = text.splitlines()
        for i, line in enumerate(lines):
            if line.lstrip().startswith(("def ", "class ", "async def ")) and len(line) < 200:
                if i + max_lines <= len(lines):
                    candidates.append(lines[i : i + max_lines])
    rng = random.Random(seed)
    prompts = []
    for block in rng.sample(candidates, min(n, len(candidates))):
        snippet = block[: rng.randint(min_lines, max_lines)]
        while len(snippet) > 1 and not snippet[-1].strip():
            snippet.pop()  # never end a prompt on blank lines
        prompts.append("\n".join(snippet)[:1000])
    return prompts


# --------------------------------------------------------------------------- tokenizer


def train_tokenizer(docs: list[str], vocab_size: int, max_positions: int):
    """Byte-level BPE (GPT-2 style) so every string round-trips exactly; EOS is id 0.

    Returns a transformers PreTrainedTokenizerFast (TokenizersBackend in transformers 5.x)
    that does not add BOS/EOS on encode: encode(text) == the plain BPE ids.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes: no UNK ever
        show_progress=False,
    )
    bpe.train_from_iterator(docs, trainer)
    # A small corpus can run out of merges before vocab_size; the model keeps vocab_size rows.
    if bpe.get_vocab_size() > vocab_size or bpe.token_to_id(EOS) != 0:
        raise RuntimeError(f"unexpected BPE vocab: size {bpe.get_vocab_size()}, eos id {bpe.token_to_id(EOS)}")
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe, bos_token=EOS, eos_token=EOS, pad_token=EOS,
        model_max_length=max_positions,
    )


def encode_stream(tokenizer, docs: list[str]) -> torch.Tensor:
    """Documents joined with EOS into one token stream: [N] int32 (int32 halves memory)."""
    backend = tokenizer.backend_tokenizer
    encodings = backend.encode_batch_fast(docs, add_special_tokens=False)
    eos = tokenizer.eos_token_id
    flat: list[int] = []
    for enc in encodings:
        flat.extend(enc.ids)
        flat.append(eos)
    return torch.tensor(flat, dtype=torch.int32)


@dataclasses.dataclass
class Data:
    tokenizer: object  # transformers PreTrainedTokenizerFast
    train_ids: torch.Tensor  # [N_train] int32
    heldout_ids: torch.Tensor  # [N_heldout] int32
    stats: dict


def prepare_data(preset: Preset) -> Data:
    """Read the corpus, train the tokenizer on the training split, tokenize both splits."""
    t0 = time.perf_counter()
    train_docs = load_documents("train", preset.corpus_mb)
    heldout_docs = load_documents("heldout", preset.corpus_mb)
    tokenizer = train_tokenizer(train_docs, preset.vocab_size, preset.max_positions)
    train_ids, heldout_ids = encode_stream(tokenizer, train_docs), encode_stream(tokenizer, heldout_docs)
    train_bytes = sum(len(d.encode()) for d in train_docs)
    stats = {
        "python": platform.python_version(),
        "stdlib": str(stdlib_root()),
        "train_files_total": len(corpus_files("train")),
        "heldout_files_total": len(corpus_files("heldout")),
        "train_docs_used": len(train_docs),
        "heldout_docs_used": len(heldout_docs),
        "train_bytes": train_bytes,
        "heldout_bytes": sum(len(d.encode()) for d in heldout_docs),
        "train_tokens": int(train_ids.numel()),
        "heldout_tokens": int(heldout_ids.numel()),
        "bytes_per_token": round(train_bytes / max(1, train_ids.numel()), 3),
        "tokenizer_vocab": len(tokenizer),
        "prep_seconds": round(time.perf_counter() - t0, 1),
    }
    return Data(tokenizer, train_ids, heldout_ids, stats)


# --------------------------------------------------------------------------- models


def build_model(shape: ModelShape, preset: Preset, seed: int):
    """A freshly initialised standard LlamaForCausalLM (no custom code, tied embeddings)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=preset.vocab_size,
        hidden_size=shape.hidden,
        intermediate_size=shape.intermediate,
        num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.kv_heads,
        head_dim=shape.head_dim,
        max_position_embeddings=preset.max_positions,
        # transformers 5.x keeps RoPE settings here (a bare rope_theta= is converted).
        rope_parameters={"rope_type": "default", "rope_theta": preset.rope_theta},
        tie_word_embeddings=True,
        bos_token_id=0, eos_token_id=0, pad_token_id=0,
    )
    torch.manual_seed(seed)  # weights depend only on the seed
    return LlamaForCausalLM(config)


def n_params(model: torch.nn.Module) -> int:
    """Unique parameters (tied embedding counted once)."""
    return sum(p.numel() for p in model.parameters())


# --------------------------------------------------------------------------- training


@dataclasses.dataclass(frozen=True)
class PhasePlan:
    """How one training phase runs; exactly one of steps / seconds is set."""

    lr: float
    warmup: int
    batch: int
    seq_len: int
    seed: int
    steps: int | None = None
    seconds: float | None = None
    max_steps: int | None = None  # cap applied when a time budget fixes the step count
    probe_every: int = 0


def autocast(device: torch.device):
    """bf16 autocast on CUDA (fast, no loss scaling needed); exact fp32 on CPU."""
    if device.type == "cuda":
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def sample_windows(ids: torch.Tensor, batch: int, seq_len: int, gen: torch.Generator) -> torch.Tensor:
    """Random windows from the token stream: ids [N] -> [B, T+1] int64 (inputs + shifted labels)."""
    starts = torch.randint(0, ids.numel() - seq_len - 1, (batch, 1), generator=gen, device=ids.device)
    idx = starts + torch.arange(seq_len + 1, device=ids.device)  # [B, T+1]
    return ids[idx].long()


def lr_at(step: int, warmup: int, total: int | None, peak: float, floor: float = 0.1) -> float:
    """Linear warmup, then cosine decay to floor*peak. total=None means 'not known yet'."""
    if step < warmup:
        return peak * (step + 1) / warmup
    if total is None:
        return peak
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return peak * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))


def make_optimizer(model: torch.nn.Module, lr: float, device: torch.device) -> torch.optim.AdamW:
    """AdamW; no weight decay on norms (1-D params), as usual for transformers."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), fused=device.type == "cuda")


def lm_loss(model, batch: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy on a [B, T+1] batch."""
    logits = model(input_ids=batch[:, :-1]).logits  # [B, T, V]
    return F.cross_entropy(logits.float().flatten(0, 1), batch[:, 1:].flatten())


def distill_loss(model, batch: torch.Tensor, teacher, ce_weight: float = 0.0) -> torch.Tensor:
    """KL(teacher || draft) per position, + ce_weight * CE on the real next tokens.

    Forward KL on the full distribution teaches the draft the teacher's argmax (what greedy
    speculative decoding accepts) far more directly than CE on corpus labels alone.
    """
    inputs = batch[:, :-1]  # [B, T]
    with torch.no_grad():
        t_logp = F.log_softmax(teacher(input_ids=inputs).logits.float(), dim=-1)  # [B, T, V]
    d_logits = model(input_ids=inputs).logits.float()  # [B, T, V]
    d_logp = F.log_softmax(d_logits, dim=-1)
    loss = F.kl_div(d_logp.flatten(0, 1), t_logp.flatten(0, 1), log_target=True, reduction="batchmean")
    if ce_weight:
        loss = loss + ce_weight * F.cross_entropy(d_logits.flatten(0, 1), batch[:, 1:].flatten())
    return loss


def train_step(model, opt, loss_fn: Callable, batch: torch.Tensor, lr: float, device) -> torch.Tensor:
    """One optimizer step with gradient clipping; returns the (un-synced) loss."""
    for group in opt.param_groups:
        group["lr"] = lr
    with autocast(device):
        loss = loss_fn(model, batch)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss.detach()


class _Meter:
    """Progress bar, throughput, and -- for time budgets -- the step count.

    With --minutes we time steps CALIB_FROM..CALIB_TO and then fix the total number of
    steps, so the cosine schedule is a function of the step alone and the run can be
    repeated with the same schedule via --steps/--draft-steps (the report has the counts).
    """

    CALIB_FROM, CALIB_TO, LOG_EVERY = 5, 30, 10

    def __init__(self, plan: PhasePlan, desc: str, device: torch.device):
        from tqdm.auto import tqdm

        self.plan, self.device = plan, device
        self.bar = tqdm(total=plan.steps, desc=desc, unit="step", dynamic_ncols=True)
        self.t_start = self.t_log = time.perf_counter()
        self.t_calib = 0.0
        self.step_log, self.losses = 0, []
        self.curve: list[dict] = []  # held-out probes: [{"step": s, metric: value, ...}]

    def _sync_now(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter()

    def update(self, step: int, total: int | None, loss: torch.Tensor, lr: float) -> int | None:
        """Called after each step; returns the (possibly newly fixed) total step count."""
        self.bar.update(1)
        if total is None and step == self.CALIB_FROM:
            self.t_calib = self._sync_now()
        if total is None and step == self.CALIB_TO:
            now = self._sync_now()
            per_step = (now - self.t_calib) / (self.CALIB_TO - self.CALIB_FROM)
            remaining = self.plan.seconds - (now - self.t_start)
            total = max(step + 1, step + int(remaining / per_step))
            total = min(total, max(step + 1, self.plan.max_steps or total))
            self.bar.total = total
        if step % self.LOG_EVERY == 0 or step == total:
            self.losses.append(loss.item())  # syncs; hence only every LOG_EVERY steps
            now = time.perf_counter()
            tok_s = (step - self.step_log) * self.plan.batch * self.plan.seq_len / (now - self.t_log)
            probe = {k: f"{v:.3f}" for k, v in self.curve[-1].items() if k != "step"} if self.curve else {}
            self.bar.set_postfix(loss=f"{self.losses[-1]:.3f}", tok_s=f"{tok_s:,.0f}", lr=f"{lr:.2e}", **probe)
            self.t_log, self.step_log = now, step
        return total

    def probe(self, step: int, probe: Callable, model) -> None:
        """Run a held-out probe and keep its result; its time is left out of tok/s."""
        t0 = time.perf_counter()
        self.curve.append({"step": step, **probe(model)})
        self.t_log += time.perf_counter() - t0

    def close(self, steps: int) -> dict:
        seconds = self._sync_now() - self.t_start
        self.bar.close()
        tokens = steps * self.plan.batch * self.plan.seq_len
        tail = self.losses[-5:] or [float("nan")]
        return {
            "steps": steps, "tokens": tokens, "seconds": round(seconds, 1),
            "tokens_per_s": round(tokens / seconds), "final_loss": round(sum(tail) / len(tail), 4),
            "lr": self.plan.lr, "warmup": self.plan.warmup, "batch": self.plan.batch,
            "seq_len": self.plan.seq_len, "seed": self.plan.seed, "heldout_curve": self.curve,
        }


def train_phase(model, loss_fn: Callable, ids: torch.Tensor, plan: PhasePlan, device, desc: str,
                probe: Callable | None = None) -> dict:
    """Train `model` on random windows of `ids` (already on `device`) for a step or time budget.

    probe(model) -> {name: float} is run on held-out data every plan.probe_every steps, so
    overfitting shows up in the progress bar and in the report's heldout_curve.
    """
    opt = make_optimizer(model, plan.lr, device)
    gen = torch.Generator(device=ids.device).manual_seed(plan.seed)
    meter = _Meter(plan, desc, device)
    model.train()
    step, total = 0, plan.steps
    while (total is None or step < total) and step < (plan.max_steps or math.inf):
        batch = sample_windows(ids, plan.batch, plan.seq_len, gen)  # [B, T+1]
        lr = lr_at(step, plan.warmup, total, plan.lr)
        loss = train_step(model, opt, loss_fn, batch, lr, device)
        step += 1
        if probe and plan.probe_every and (step % plan.probe_every == 0 or step == total):
            meter.probe(step, probe, model)
            model.train()
        total = meter.update(step, total, loss, lr)
    model.eval()
    return meter.close(step)


# --------------------------------------------------------------------------- save / reload


def save_pair(out: Path, target, draft, tokenizer) -> dict:
    """Save both models as bf16 safetensors (half the bytes of fp32) plus the tokenizer.

    Converts the models to bf16 in place (no fp32 copy of a 1B model is kept around);
    evaluation reloads them from disk anyway, which is what we want to measure.
    """
    sizes = {}
    for name, model in (("target", target), ("draft", draft)):
        folder = out / name
        model.to(torch.bfloat16).save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        sizes.update({f"{name}/{f.name}": f.stat().st_size for f in sorted(folder.iterdir())})
    return sizes


def reload_pair(out: Path, device: torch.device):
    """Load both models back exactly as a user would: plain Auto classes, fp32, offline."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    models = [
        AutoModelForCausalLM.from_pretrained(out / name, dtype=torch.float32).to(device).eval()
        for name in ("target", "draft")
    ]
    return models[0], models[1], AutoTokenizer.from_pretrained(out / "target")


# --------------------------------------------------------------------------- evaluation


def heldout_windows(ids: torch.Tensor, seq_len: int, n: int) -> torch.Tensor:
    """n evenly spaced, non-random windows of the held-out stream: [n, T+1] int64."""
    n = max(1, min(n, (ids.numel() - 1) // (seq_len + 1)))
    starts = torch.linspace(0, ids.numel() - seq_len - 1, n).long()  # [n]
    return ids[starts[:, None] + torch.arange(seq_len + 1)].long()  # [n, T+1]


@torch.inference_mode()
def heldout_ce(model, windows: torch.Tensor, device, chunk: int = 16) -> float:
    """Mean next-token cross-entropy of one model on [n, T+1] held-out windows."""
    total = count = 0.0
    for batch in windows.split(chunk):
        batch = batch.to(device)
        logits = model(input_ids=batch[:, :-1]).logits.flatten(0, 1)  # [b*T, V]
        total += F.cross_entropy(logits.float(), batch[:, 1:].flatten(), reduction="sum").item()
        count += batch[:, 1:].numel()
    return round(total / count, 4)


@torch.inference_mode()
def teacher_forced_metrics(target, draft, windows: torch.Tensor, device, chunk: int = 16) -> dict:
    """Held-out CE of both models and the fraction of positions where their argmaxes agree."""
    ce_t = ce_d = agree = count = 0.0
    for batch in windows.split(chunk):
        batch = batch.to(device)
        x, y = batch[:, :-1], batch[:, 1:].flatten()  # [b, T], [b*T]
        lt = target(input_ids=x).logits.flatten(0, 1)  # [b*T, V]
        ld = draft(input_ids=x).logits.flatten(0, 1)  # [b*T, V]
        ce_t += F.cross_entropy(lt, y, reduction="sum").item()
        ce_d += F.cross_entropy(ld, y, reduction="sum").item()
        agree += (lt.argmax(-1) == ld.argmax(-1)).sum().item()
        count += y.numel()
    return {
        "target_heldout_ce": round(ce_t / count, 4),
        "draft_heldout_ce": round(ce_d / count, 4),
        "teacher_forced_agreement": round(agree / count, 4),
        "eval_positions": int(count),
    }


@torch.inference_mode()
def greedy_generate(model, prompt: torch.Tensor, n_new: int) -> torch.Tensor:
    """Greedy continuation with a KV cache, not stopping at EOS: [1, P] -> [n_new] int64.

    Our own loop instead of generate() so that EOS handling and generation-config defaults
    cannot change what 'greedy' means between transformers versions.
    """
    out = model(input_ids=prompt, use_cache=True)
    tokens = []
    for _ in range(n_new):
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)  # [1, 1]
        tokens.append(nxt)
        out = model(input_ids=nxt, past_key_values=out.past_key_values, use_cache=True)
    return torch.cat(tokens, dim=1)[0]


def spec_tokens_per_call(matches: list[bool], k: int) -> float:
    """Tokens produced per target forward by greedy speculative decoding with k drafts.

    Along the target's greedy path, a round starting at position i accepts the run of
    draft matches (at most k) and then gets one token from the target itself.
    """
    i, rounds = 0, 0
    while i < len(matches):
        run = 0
        while run < k and i + run < len(matches) and matches[i + run]:
            run += 1
        i, rounds = i + run + 1, rounds + 1
    return len(matches) / max(1, rounds)


@torch.inference_mode()
def generation_metrics(target, draft, tokenizer, prompts: list[str], n_new: int, device) -> dict:
    """Draft acceptance on the target's own greedy generations from held-out prompts."""
    max_prompt = target.config.max_position_embeddings - n_new
    tokenizer.truncation_side = "left"  # keep the end of an over-long prompt: it is what gets continued
    matches: list[bool] = []
    samples = []
    for prompt in prompts:
        enc = tokenizer(prompt, return_tensors="pt", truncation=True, max_length=max_prompt)
        ids = enc.input_ids.to(device)  # [1, P]
        gen = greedy_generate(target, ids, n_new)  # [n_new]
        full = torch.cat([ids[0], gen])[None]  # [1, P + n_new]
        d_pred = draft(input_ids=full).logits[0, ids.shape[1] - 1 : -1].argmax(-1)  # [n_new]
        matches.extend((d_pred == gen).tolist())
        if len(samples) < 3:
            d_gen = greedy_generate(draft, ids, n_new)
            samples.append({"prompt": prompt, "target": tokenizer.decode(gen), "draft": tokenizer.decode(d_gen)})
    return {
        "generation_acceptance": round(sum(matches) / max(1, len(matches)), 4),
        "generation_positions": len(matches),
        "spec_tokens_per_target_call": {f"k={k}": round(spec_tokens_per_call(matches, k), 3) for k in (2, 4, 8)},
        "samples": samples,
    }


# --------------------------------------------------------------------------- command


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `tandem zoo` (also used by `python -m tandem.zoo`)."""
    parser.add_argument("--preset", choices=sorted(presets()), default="tiny")
    parser.add_argument("--out", type=Path, required=True, help="folder for target/, draft/, zoo_report.json")
    parser.add_argument("--device", default="auto", help="cuda, cpu, cuda:N or auto (default)")
    budget = parser.add_mutually_exclusive_group(required=True)
    budget.add_argument("--minutes", type=float, help="training wall-clock for target+draft together")
    budget.add_argument("--steps", type=int, help="target optimizer steps (reproducible)")
    parser.add_argument("--draft-share", type=float, default=0.4,
                        help="share of --minutes kept for the draft; it also gets what the target leaves")
    parser.add_argument("--max-epochs", type=float, help="with --minutes: stop the target after this many "
                        "passes over the training tokens (default: preset's)")
    parser.add_argument("--draft-steps", type=int, help="draft steps with --steps (default: same)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--corpus-mb", type=float, help="cap on training text (default: preset's)")
    parser.add_argument("--vocab-size", type=int, help="BPE vocab size (default: preset's)")
    parser.add_argument("--batch-size", type=int, help="windows per step (default: preset's)")
    parser.add_argument("--distill-ce", type=float, default=0.0, help="weight of CE added to the KL")
    parser.add_argument("--eval-prompts", type=int, default=16)
    parser.add_argument("--gen-tokens", type=int, default=48)


def resolve(args: argparse.Namespace) -> tuple[Preset, torch.device]:
    """Apply command-line overrides to the preset; pick the device."""
    preset = presets()[args.preset]
    overrides = {"corpus_mb": args.corpus_mb, "vocab_size": args.vocab_size, "batch_size": args.batch_size}
    preset = dataclasses.replace(preset, **{k: v for k, v in overrides.items() if v is not None})
    name = args.device
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return preset, torch.device(name)


def phase_plans(args: argparse.Namespace, preset: Preset, train_tokens: int) -> tuple[PhasePlan, PhasePlan]:
    """Target and draft budgets from --steps/--draft-steps or --minutes/--draft-share.

    --steps is taken literally. With --minutes the target gets at most (1 - draft_share)
    of the time and stops early at max_epochs passes over the training tokens (it
    overfits beyond that); the draft's plan here is provisional: train_pair gives it
    whatever time the target left. The draft has no epoch cap: it fits the target's
    soft distribution and its held-out agreement kept rising in our runs.
    """
    max_epochs = args.max_epochs if args.max_epochs is not None else preset.max_epochs
    common = {"batch": preset.batch_size, "seq_len": preset.seq_len, "probe_every": preset.probe_every}
    if args.steps is not None:
        t_budget = {"steps": args.steps}
        d_budget = {"steps": args.draft_steps if args.draft_steps is not None else args.steps}
    else:
        total = args.minutes * 60
        max_steps = max(1, int(max_epochs * train_tokens / (preset.batch_size * preset.seq_len)))
        t_budget = {"seconds": total * (1 - args.draft_share), "max_steps": max_steps}
        d_budget = {"seconds": total * args.draft_share}

    def warmup(budget: dict) -> int:
        # At most 10% of a known step count, so short runs still spend time at full lr.
        # Computed the same way for both modes: rerunning with the step counts a timed
        # run reports (--steps N --draft-steps M) gives the same schedule.
        known = budget.get("steps", budget.get("max_steps"))
        return min(preset.warmup_steps, max(1, known // 10)) if known else preset.warmup_steps

    target = PhasePlan(lr=preset.target_lr, warmup=warmup(t_budget), seed=args.seed, **common, **t_budget)
    draft = PhasePlan(lr=preset.draft_lr, warmup=warmup(d_budget), seed=args.seed + 1, **common, **d_budget)
    return target, draft


def train_pair(args, preset: Preset, data: Data, device: torch.device) -> tuple[dict, dict]:
    """Train the target, then distil the draft from it; save both to args.out."""
    target_plan, draft_plan = phase_plans(args, preset, int(data.train_ids.numel()))
    ids = data.train_ids.to(device)  # [N] int32, resident on the device for cheap sampling
    probe_windows = heldout_windows(data.heldout_ids, preset.seq_len, 16)  # [16, T+1]
    target = build_model(preset.target, preset, args.seed).to(device)

    def probe_target(model) -> dict:
        return {"val_ce": heldout_ce(model, probe_windows, device)}

    t_stats = train_phase(target, lm_loss, ids, target_plan, device, "target", probe_target)
    if draft_plan.seconds is not None:  # time budget: the draft inherits what the target left
        draft_plan = dataclasses.replace(draft_plan, seconds=args.minutes * 60 - t_stats["seconds"])
    draft = build_model(preset.draft, preset, args.seed + 1).to(device)

    def probe_draft(model) -> dict:
        m = teacher_forced_metrics(target, model, probe_windows, device)  # noqa: F821 (a closure; ruff reads the del below)
        return {"val_ce": m["draft_heldout_ce"], "agree": m["teacher_forced_agreement"]}

    loss_fn = functools.partial(distill_loss, teacher=target, ce_weight=args.distill_ce)
    d_stats = train_phase(draft, loss_fn, ids, draft_plan, device, "draft", probe_draft)
    t_stats["params"], d_stats["params"] = n_params(target), n_params(draft)
    sizes = save_pair(args.out, target, draft, data.tokenizer)
    del target, draft, ids
    return {"target": t_stats, "draft": d_stats}, sizes


def evaluate(args, preset: Preset, data: Data, device: torch.device) -> dict:
    """Reload the saved pair from disk and measure quality and draft acceptance."""
    target, draft, tokenizer = reload_pair(args.out, device)
    windows = heldout_windows(data.heldout_ids, preset.seq_len, preset.eval_windows)  # [n, T+1]
    metrics = teacher_forced_metrics(target, draft, windows, device)
    prompts = heldout_prompts(args.eval_prompts, seed=args.seed)
    metrics.update(generation_metrics(target, draft, tokenizer, prompts, args.gen_tokens, device))
    return metrics


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def run(args: argparse.Namespace) -> int:
    """Entry point for the `tandem zoo` subcommand: build, save, evaluate, report."""
    import transformers

    t0 = time.perf_counter()
    preset, device = resolve(args)
    args.out.mkdir(parents=True, exist_ok=True)
    data = prepare_data(preset)
    print(f"corpus: {json.dumps(data.stats)}", file=sys.stderr)
    training, sizes = train_pair(args, preset, data, device)
    metrics = evaluate(args, preset, data, device)
    report = {
        "preset": dataclasses.asdict(preset),
        # str() anything a parent CLI may have put on the namespace (paths, handler functions)
        "args": {k: v if isinstance(v, (str, int, float, bool, type(None))) else str(v)
                 for k, v in vars(args).items()},
        "device": device_name(device),
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "transformers": transformers.__version__},
        "corpus": data.stats,
        "training": training,
        "files": sizes,
        "metrics": metrics,
        "wall_seconds": round(time.perf_counter() - t0, 1),
    }
    (args.out / "zoo_report.json").write_text(json.dumps(report, indent=2) + "\n")
    print_summary(report)
    print(f"wrote {args.out / 'target'}, {args.out / 'draft'}, {args.out / 'zoo_report.json'}")
    return 0


def print_summary(report: dict) -> None:
    """Human-readable digest of zoo_report.json."""
    m, tr = report["metrics"], report["training"]
    print(f"device {report['device']}, wall {report['wall_seconds']} s")
    for name in ("target", "draft"):
        s = tr[name]
        print(f"{name}: {s['params']:,} params, {s['steps']} steps, {s['tokens']:,} tokens, "
              f"{s['seconds']} s, {s['tokens_per_s']:,} tok/s, final loss {s['final_loss']}")
    print(f"held-out CE: target {m['target_heldout_ce']}, draft {m['draft_heldout_ce']}")
    print(f"greedy agreement (teacher-forced): {m['teacher_forced_agreement']}")
    print(f"generation acceptance: {m['generation_acceptance']}  "
          f"tokens/target call: {m['spec_tokens_per_target_call']}")
    if m["samples"]:
        sample = m["samples"][0]
        print("--- prompt ---\n" + sample["prompt"] + "\n--- target continues ---\n" + sample["target"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tandem zoo", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
