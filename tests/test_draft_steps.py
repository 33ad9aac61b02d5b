"""Whole draft windows in one device program (tandem/engine/draft_steps.py) against the drafter's
token-by-token loop, the reference: the same greedy tokens (AdaEDL stops included) over rounds
with rollbacks and ragged batches, and sampled drafts that follow q.

On CPU the bucketed path (cuda_graphs=True) runs the graphs' padded programs eagerly; the gpu
test captures them.
"""
from __future__ import annotations

import pytest
import torch
from conftest import gpu, random_llama
from scipy.stats import chisquare

from tandem.actors.drafter import LocalDrafter
from tandem.engine.draft_steps import LONG_PIECE, PIECE
from tandem.engine.llama import LlamaEngine
from tandem.kernels.streams import Stream
from tandem.params import SamplingParams
from tandem.spec.adaedl import AdaEDLConfig
from tandem.spec.messages import DraftItem


GREEDY = SamplingParams(max_tokens=64)


def drafters(model, graphs: bool, adaedl: AdaEDLConfig, slots: int = 4):
    fused = LocalDrafter(LlamaEngine(model, max_slots=slots, cuda_graphs=graphs), adaedl)
    stepwise = LocalDrafter(LlamaEngine(model, max_slots=slots, cuda_graphs=False), adaedl, fused=False)
    assert fused.fused and not stepwise.fused
    return fused, stepwise


def start(drafter: LocalDrafter, n: int) -> list[int]:
    return [drafter.start(f"r{i}", seed=i) for i in range(n)]


STOPS = {  # AdaEDL off (it never stops); the paper's rule, stopping mid-window often
    "off": AdaEDLConfig(stop="paper", lambda0=0.0),
    "paper": AdaEDLConfig(stop="paper", lambda0=0.93),
}


@pytest.mark.parametrize("graphs", [False, True])
@pytest.mark.parametrize("stop", list(STOPS))
def test_fused_greedy_drafts_equal_the_token_loop(graphs, stop):
    model = random_llama(3, hidden=64, layers=2, vocab=300, tied=False, init=0.2)
    fused, stepwise = drafters(model, graphs, STOPS[stop])
    slots = start(fused, 3)
    assert start(stepwise, 3) == slots
    seqs = [list(range(1, 20)), [5, 6], list(range(40, 47))]  # a backlog longer than MAX_FIRST, and short ones
    stops = 0
    for rnd in range(6):
        lens = [(rnd + b) % 7 for b in range(3)]  # ragged windows, 0 included
        items = [DraftItem(f"r{b}", slots[b], seqs[b], lens[b], GREEDY, adaedl=stop != "off") for b in range(3)]
        a, b_ = fused.propose(items), stepwise.propose(items)
        assert [c.ids for c in a] == [c.ids for c in b_], (rnd, lens)
        assert all(c.probs is None for c in a)  # greedy: q is one-hot, never sent
        stops += sum(len(c.ids) < n for c, n in zip(a, lens))
        # The verifier keeps part of each chunk and appends a correction: a rollback next round.
        seqs = [s + c.ids[: len(c.ids) // 2] + [7 + rnd] for s, c in zip(seqs, a)]
    assert (stops > 0) == (stop != "off")


@pytest.mark.parametrize("p, lengths", [(0.999, [11, 16, 9]), (0.001, [4, 4, 4])])
def test_fused_cost_rule_keeps_whole_pieces_and_decides_between_them(p, lengths):
    """The cost rule drafts pieces of PIECE and keeps them whole (a stop inside a piece saves no
    draft time); it drafts on while the next piece pays. Tokens: the greedy chain all the same."""
    model = random_llama(3, hidden=64, layers=2, vocab=300, tied=False, init=0.2)
    fused, _ = drafters(model, False, AdaEDLConfig(cost_ratio=6.0))
    _, full = drafters(model, False, STOPS["off"])
    for d in (fused, full):
        slots = start(d, 3)
    for table in fused._tables.values():  # acceptance p at every entropy
        table.accepted, table.seen = [p] * table.BINS, [1.0] * table.BINS
    seqs = [list(range(1, 20)), [5, 6], list(range(40, 47))]
    items = [DraftItem(f"r{b}", slots[b], seqs[b], n, GREEDY, adaedl=True) for b, n in enumerate([11, 16, 9])]
    chunks, chain = fused.propose(items), full.propose(items)
    assert [len(c.ids) for c in chunks] == lengths
    assert all(c.ids == f.ids[: len(c.ids)] for c, f in zip(chunks, chain))
    assert all(len(c.entropies) == len(c.ids) for c in chunks)


def test_long_pieces_for_requests_whose_drafts_run_long():
    """A request whose drafts averaged more than PIECE tokens drafts LONG_PIECE per program;
    the tokens are the token loop's all the same."""
    model = random_llama(3, hidden=64, layers=2, vocab=300, tied=False, init=0.2)
    fused, stepwise = drafters(model, False, AdaEDLConfig(stop="paper", lambda0=0.0))  # on, never stops
    for d in (fused, stepwise):
        slots = start(d, 2)
        d._adaedl["r0"].mean_length = 10.0
    items = [DraftItem(f"r{b}", slots[b], [1, 2, 3 + b], 12, GREEDY, adaedl=True) for b in range(2)]
    assert fused._piece(items[0]) == LONG_PIECE and fused._piece(items[1]) == PIECE
    a, b_ = fused.propose(items), stepwise.propose(items)
    assert [c.ids for c in a] == [c.ids for c in b_] and all(len(c.ids) == 12 for c in a)


def test_fused_sampled_drafts_follow_q():
    """The first drafted token of a sampled window is a draw from q = softmax(logits / T)."""
    torch.manual_seed(0)
    vocab, temperature, rows, rounds = 12, 0.8, 32, 40
    model = random_llama(4, hidden=32, layers=1, vocab=vocab, tied=False, init=0.3)
    drafter = LocalDrafter(LlamaEngine(model, max_slots=rows, cuda_graphs=True), AdaEDLConfig())
    slots = start(drafter, rows)
    sampling = SamplingParams(max_tokens=8, temperature=temperature)
    prompt = [1, 2, 3]
    with torch.no_grad():
        logits = model(torch.tensor([prompt])).logits[0, -1].float()
    q_ref = torch.softmax(logits / temperature, -1)
    counts = torch.zeros(vocab)
    for _ in range(rounds):
        chunks = drafter.propose([DraftItem(f"r{b}", slots[b], prompt, 3, sampling, False) for b in range(rows)])
        for c in chunks:
            assert len(c.ids) == 3 and c.probs.shape == (3, vocab)
            assert torch.allclose(c.probs[0], q_ref, atol=1e-5)
            assert torch.allclose(c.probs.sum(-1), torch.ones(3), atol=1e-5)
            counts[c.ids[0]] += 1
    expected = q_ref * rows * rounds
    keep = expected >= 5  # chi-square needs expected counts >= 5; pool the rare tokens
    obs = torch.cat([counts[keep], counts[~keep].sum(0, keepdim=True)])
    exp = torch.cat([expected[keep], expected[~keep].sum(0, keepdim=True)])
    assert chisquare(obs.numpy(), exp.numpy() * obs.sum().item() / exp.sum().item()).pvalue > 1e-3


def test_seeded_sampled_drafts_do_not_depend_on_the_batch():
    model = random_llama(4, hidden=32, layers=1, vocab=50, tied=False, init=0.3)
    sampling = SamplingParams(max_tokens=8, temperature=1.0)

    def draft(n_requests):
        d = LocalDrafter(LlamaEngine(model, max_slots=4, cuda_graphs=True), AdaEDLConfig())
        slots = start(d, n_requests)
        items = [DraftItem(f"r{b}", slots[b], [1, 2, 3 + b], 5, sampling, False) for b in range(n_requests)]
        return d.propose(items)[0].ids

    assert draft(1) == draft(3)


def test_padding_a_draft_to_a_bigger_batch_changes_nothing():
    """min_batch (a drafter's later pieces keep the first piece's graph bucket): padding rows
    draft into the scratch slot; the real rows' tokens and entropies are those of the unpadded run."""
    from tandem.engine.draft_steps import draft_window

    model = random_llama(5, hidden=32, layers=1, vocab=60, tied=False, init=0.3)

    def run(min_batch):
        eng = LlamaEngine(model, max_slots=8, cuda_graphs=True)
        slots = [eng.allocate() for _ in range(2)]
        seqs = [[1, 2, 3], [4, 5, 6, 7]]
        gens = [Stream(b) for b in range(2)]
        out = draft_window(eng, slots, seqs, [3, 2], [0.0, 1.0], [False, True], gens, min_batch=min_batch)
        again = draft_window(eng, slots, [s + t for s, t in zip(seqs, out[0])], [2, 2], [0.0, 0.0], [False, False],
                             gens, min_batch=min_batch)  # the slots hold what the first call fed
        return out[0], out[1], again[0]

    plain, padded = run(0), run(8)
    assert plain[0] == padded[0] and plain[2] == padded[2]
    for a, b in zip(plain[1], padded[1]):
        assert a == pytest.approx(b, abs=1e-5)


@gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_captured_draft_graphs_equal_the_token_loop_on_gpu(dtype):
    model = random_llama(3, hidden=128, layers=2, vocab=500, tied=False, init=0.2).to("cuda", dtype)
    fused, stepwise = drafters(model, True, AdaEDLConfig(stop="paper", lambda0=0.9))
    slots = start(fused, 3)
    start(stepwise, 3)
    seqs = [list(range(1, 30)), [5, 6], list(range(40, 52))]
    for rnd in range(5):
        items = [DraftItem(f"r{b}", slots[b], seqs[b], 2 + (rnd + b) % 6, GREEDY, adaedl=True) for b in range(3)]
        a, b_ = fused.propose(items), stepwise.propose(items)
        if dtype == torch.float32:
            assert [c.ids for c in a] == [c.ids for c in b_], rnd
        seqs = [s + c.ids + [9] for s, c in zip(seqs, b_)]
    assert any(type(k).__name__ == "DraftShape" for k in fused.engine.graphs.graphs)


def test_capture_at_start_covers_every_bucket_a_lane_can_ask_for():
    """lane.cuda_graphs_at_start: a verifier's runner holds every forward bucket; a drafter's also
    every window of 1..max(max_draft, LONG_PIECE) steps, greedy and sampled, for every batch
    bucket and first length (off CUDA the entries exist without a capture)."""
    from tandem.engine.draft_steps import DraftShape
    from tandem.engine.layout import Shape

    model = random_llama(6, hidden=32, layers=1, vocab=40, tied=False, init=0.3)
    verifier = LlamaEngine(model, max_slots=4, max_context=200, cuda_graphs=True).graphs
    n = verifier.capture_at_start(max_draft=5, draft=False)
    # decode / verify buckets at every span; prompts of 64 and 128 at span 128, of 64-192 and
    # the context (200) at span 200
    prompts = 3 * (2 + 4)  # batch 1, 2 and 4
    assert n == len(verifier.batch_buckets) * len(verifier.query_buckets) * len(verifier._spans(None)) + prompts
    assert not any(isinstance(k, DraftShape) for k in verifier.graphs)
    drafter = LlamaEngine(model, max_slots=4, max_context=200, cuda_graphs=True).graphs
    drafter.capture_at_start(max_draft=5, draft=True)
    windows = {(k.first.batch, k.first.query, k.steps, k.sampled) for k in drafter.graphs if isinstance(k, DraftShape)}
    assert {(b, q, n, s) for b in (1, 2, 4) for q in (1, 2, 4) for n in range(1, LONG_PIECE + 1)
            for s in (False, True)} <= windows
    assert Shape(4, 32, 200) in drafter.graphs  # a forward bucket too (prefill tails)
