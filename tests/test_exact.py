"""Exact mode (tandem/kernels/exact.py): a position's logits do not depend on what else a forward
computes, so greedy output is the same in every mode, alone or batched.

On CPU: the fixed-shape matmul, the attention plan, and the engine's logits compared bit for bit
across the ways a position can be computed (prompt, verify of any width, decode beside other
requests, the graphs' padded path), in fp32 and bf16. On a GPU (marked): the same in bf16 with
the Triton kernels, and greedy output of every mode identical at batch 1 and mixed into batches.
"""
from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F
from conftest import random_llama

from tandem.actors.offline import generate
from tandem.engine.llama import LlamaEngine
from tandem.engine.pair import ModelPair
from tandem.kernels.attention import TILE_M, _Plan
from tandem.kernels.exact import EXACT_ROWS, fixed_rows_linear
from tandem.params import SamplingParams, SpecParams

ON_GPU = torch.cuda.is_available()
DEVICE = "cuda" if ON_GPU else "cpu"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_rows_product_does_not_depend_on_the_other_rows(dtype):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3 * EXACT_ROWS + 5, 96, generator=g).to(dtype)
    w, b = torch.randn(80, 96, generator=g).to(dtype), torch.randn(80, generator=g).to(dtype)
    full = fixed_rows_linear(x, w, b)
    torch.testing.assert_close(full.float(), F.linear(x, w, b).float(), rtol=2e-2, atol=2e-2)
    for r in (0, 7, EXACT_ROWS, 2 * EXACT_ROWS + 3, x.shape[0] - 1):
        for batch in (x[r : r + 1], torch.cat([x[r : r + 1], torch.randn(40, 96, generator=g).to(dtype)]),
                      torch.cat([torch.randn(EXACT_ROWS + 9, 96, generator=g).to(dtype), x[r : r + 1]])):
            at = (batch == x[r]).all(1).nonzero()[0, 0]
            assert torch.equal(fixed_rows_linear(batch, w, b)[at], full[r])
    assert fixed_rows_linear(x[:0], w, b).shape == (0, 80)


def test_exact_attention_runs_one_tile_shape_and_no_key_splits():
    """Every query length and batch: the same rows per tile, lanes and a single split (the key
    blocks a row sums, in the same order)."""
    shapes = set()
    for group in (1, 4, 8):
        for query_len in range(1, 18):
            for batch in (1, 3, 64):
                for span in (128, 300, 4096):
                    p = _Plan.of(batch, query_len, group, 8, 128, span, 64, torch.device("cpu"), 1, exact=True)
                    shapes.add((group, p.rows, p.block_m, p.splits))
    assert shapes == {(g, TILE_M // g, TILE_M, 1) for g in (1, 4, 8)}


def _engine(dtype, graphs: bool, exact: bool = True, device: str = DEVICE, seed: int = 3, tiles: bool = False) -> LlamaEngine:
    model = random_llama(seed, hidden=64, layers=2, vocab=97, tied=False, init=0.3).to(device=device, dtype=dtype)
    return LlamaEngine(model, max_slots=8, max_context=96, cuda_graphs=graphs, exact=exact, exact_tiles=tiles)


def _position_logits(engine: LlamaEngine, seq: list[int], prompt_len: int, way: str, rng: random.Random) -> torch.Tensor:
    """Logits of positions prompt_len-1 .. len(seq)-1 of seq, computed one way: `prompt` (one
    forward of everything), `verify` (the prompt, then the rest in one verify), `decode` (one
    token at a time beside other requests of other lengths)."""
    slot = engine.allocate()
    others = [engine.allocate() for _ in range(3)]
    try:
        if way == "prompt":
            return engine.forward([slot], [seq], [len(seq) - prompt_len + 1]).clone()
        first = engine.forward([slot], [seq[:prompt_len]], [1]).clone()
        if way == "verify":
            rest = engine.forward([slot], [seq], [len(seq) - prompt_len]).clone()
            return torch.cat([first, rest])
        rows, other_seqs = [first], [[rng.randrange(97) for _ in range(rng.randint(3, 20))] for _ in others]
        for end in range(prompt_len + 1, len(seq) + 1):
            other_seqs = [s + [rng.randrange(97)] * rng.randint(1, 3) for s in other_seqs]  # verifies of any width
            logits = engine.forward([*others, slot], [*other_seqs, seq[:end]], [1, 2, 3, 1])
            rows.append(logits[-1:].clone())
        return torch.cat(rows)
    finally:
        for s in [slot, *others]:
            engine.release(s)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_exact_logits_are_the_same_bits_however_a_position_is_computed(dtype, tiles: bool = False):
    rng = random.Random(0)
    seq = [rng.randrange(97) for _ in range(30)]
    results = []
    for graphs in (False, True):  # the graphs' padded buckets (captured on a GPU) and the eager path
        engine = _engine(dtype, graphs, tiles=tiles)
        for way in ("prompt", "verify", "decode"):
            results.append((graphs, way, _position_logits(engine, seq, 12, way, rng)))
    _, _, first = results[0]
    for graphs, way, logits in results[1:]:
        assert torch.equal(logits, first), (graphs, way, (logits - first).abs().max().item())


def _logits_across_widths_and_batches(engine: LlamaEngine, seq: list[int], t: int, rng: random.Random) -> list:
    """Position t's logits from verifies of every width 1..17 (the prompt before them fed
    first), each beside 0, 1, 2, 4 or 7 other requests verifying widths of their own: every
    verify width and batch bucket a lane can run."""
    out = []
    for width in range(1, 18):
        for others in (0, 1, 2, 4, 7):
            slots = [engine.allocate() for _ in range(others + 1)]
            try:
                seqs = [[rng.randrange(97) for _ in range(rng.randint(3, 40))] for _ in range(others)]
                engine.forward(slots, [*seqs, seq[: t + 1 - width]], [1] * (others + 1))
                widths = [rng.randint(1, 17) for _ in range(others)]
                seqs = [s + [rng.randrange(97) for _ in range(w)] for s, w in zip(seqs, widths)]
                logits = engine.forward(slots, [*seqs, seq[: t + 1]], [*widths, width])
                out.append((width, others, logits[-1].clone()))
            finally:
                for slot in slots:
                    engine.release(slot)
    return out


@pytest.mark.parametrize("graphs", [False, True])
def test_a_positions_exact_logits_are_the_same_at_every_verify_width_and_batch(graphs, tiles: bool = False):
    rng = random.Random(4)
    seq = [rng.randrange(97) for _ in range(40)]
    results = _logits_across_widths_and_batches(_engine(torch.bfloat16, graphs, tiles=tiles), seq, 30, rng)
    reference = results[0][2]
    for width, others, logits in results[1:]:
        assert torch.equal(logits, reference), (width, others, (logits - reference).abs().max().item())


def test_a_cluster_lane_with_model_exact_runs_the_exact_target():
    """`model.exact: true` in a deployment's yaml reaches the lane's verifier engine."""
    from tandem.actors.lane_roles import _target_engine
    from tandem.cluster.config import AppConfig
    from tandem.cluster.topology import lane_spec

    assert not lane_spec(AppConfig()).exact
    spec = lane_spec(AppConfig(model={"exact": True}))
    assert spec.exact and _target_engine(spec, 0, None).exact


def test_exact_mode_needs_the_native_engine_and_a_rope_of_fixed_angles(tiny_pair_paths):
    from transformers import LlamaConfig, LlamaForCausalLM

    from tandem.engine.pair import load_engine
    from tandem.errors import TandemError

    target, _ = tiny_pair_paths
    with pytest.raises(TandemError, match="native engine"):
        load_engine(target, "cpu", "float32", "hf", 2, None, exact=True)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=128,
                      rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0})
    with pytest.raises(TandemError, match="'dynamic' RoPE"):  # its angles follow the batch's longest row
        LlamaEngine(LlamaForCausalLM(cfg), max_slots=2, exact=True)
    LlamaEngine(LlamaForCausalLM(cfg), max_slots=2)  # fine without exact mode


# ---- on a GPU: bf16, the Triton kernels, every mode ----------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="needs CUDA")
@pytest.mark.parametrize("tiles", [False, True], ids=["row-blocks", "fixed-tiles"])
def test_exact_logits_on_the_gpu_in_bf16(tiles):
    test_exact_logits_are_the_same_bits_however_a_position_is_computed(torch.bfloat16, tiles)  # DEVICE is CUDA here


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="needs CUDA")
@pytest.mark.parametrize("tiles", [False, True], ids=["row-blocks", "fixed-tiles"])
def test_exact_logits_at_every_verify_width_and_batch_on_the_gpu(tiles):
    for graphs in (False, True):  # DEVICE is CUDA here: the Triton kernels and captured graphs
        test_a_positions_exact_logits_are_the_same_at_every_verify_width_and_batch(graphs, tiles)


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="needs CUDA")
def test_greedy_output_of_every_mode_is_identical_in_exact_bf16():
    """64 prompts x 48 tokens on a random bf16 pair (near-ties everywhere): AR at batch 1 is the
    reference; SD k = 3, 8, 16, SD + AdaEDL, PEARL and auto give the same tokens alone (the first
    16 prompts) and in batches of 8 and 64 (all of them). benchmarks/exact_bench.py checks the
    trained pair at full length."""
    def engine(seed, layers, exact):
        model = random_llama(seed, hidden=256, layers=layers, vocab=512, tied=False, init=0.05)
        return LlamaEngine(model.to("cuda", torch.bfloat16), max_slots=64, max_context=256, exact=exact)

    pair = ModelPair(_NoTokenizer(), engine(5, 4, True), engine(6, 1, False))
    rng = random.Random(2)
    prompts = [[rng.randrange(512) for _ in range(rng.randint(4, 60))] for _ in range(64)]
    greedy = SamplingParams(max_tokens=48, temperature=0.0)
    reference = [generate(pair, [p], greedy, SpecParams("ar"))[0].token_ids for p in prompts]
    specs = [SpecParams("sd", 3, adaedl=False), SpecParams("sd", 8, adaedl=False), SpecParams("sd", 16, adaedl=False),
             SpecParams("sd", 8, adaedl=True), SpecParams("pearl", 6, adaedl=False), SpecParams("auto", 16, adaedl=True)]
    for spec in specs:
        overlap = spec.mode == "pearl"  # PEARL drafts on a stream of its own beside the verify
        for group in (1, 8, 64):
            batch = prompts[:16] if group == 1 else prompts
            out = []
            for i in range(0, len(batch), group):
                out += [c.token_ids for c in generate(pair, batch[i : i + group], greedy, spec, overlap=overlap)]
            same = sum(a == b for a, b in zip(out, reference))
            assert same == len(batch), f"{spec} at batch {group}: {same}/{len(batch)} identical"


class _NoTokenizer:
    eos_token_id = None
