"""The fast engine path: bucketed shapes (CUDA graphs on GPU) and the overlapping drafter.

On CPU the bucketed path runs the same padding and row selection without capture, so its
bookkeeping is tested everywhere; the tests marked gpu capture real CUDA graphs and compare
with transformers on the device.
"""
from __future__ import annotations

import pytest
import torch
from conftest import TINY, gpu, make_pair, random_llama

from tandem.actors.offline import generate
from tandem.engine.graphs import GraphRunner
from tandem.engine.layout import Shape
from tandem.engine.llama import LlamaEngine
from tandem.kernels.streams import Stream
from tandem.params import SamplingParams, SpecParams


PROMPTS = [[1, 2, 3, 4, 5], [7, 8, 9], list(range(10, 40)), [42]]


def hf_logits(model, seq):  # [len(seq), V]
    with torch.no_grad():
        return model(torch.tensor([seq], device=model.device)).logits[0].float()


def test_buckets_round_up_and_large_shapes_run_eagerly(target_model):
    runner = GraphRunner(LlamaEngine(target_model, max_slots=6, max_context=200), max_batch=6)
    assert runner.batch_buckets == [1, 2, 4, 6]
    assert runner.bucket(Shape(3, 5, 20)) == Shape(4, 8, 128)
    assert runner.bucket(Shape(1, 1, 150)) == Shape(1, 1, 200)  # the span never passes the context
    assert runner.bucket(Shape(1, 33, 40)) == Shape(1, 64, 128)  # a prompt: a prefill bucket
    assert runner.bucket(Shape(2, 150, 160)) == Shape(2, 192, 200)
    assert runner.bucket(Shape(3, 33, 40)) == Shape(4, 64, 128)  # up to PREFILL_BATCH prompts at once
    assert runner.bucket(Shape(1, 199, 199)) == Shape(1, 200, 200)  # the context is the last prompt bucket
    big = GraphRunner(LlamaEngine(target_model, max_slots=16, max_context=200), max_batch=16)
    assert big.bucket(Shape(9, 33, 40)) is None  # more prompts than PREFILL_BATCH: eager
    assert runner.bucket(Shape(7, 1, 40)) is None


def test_forward_rows_are_the_rectangle_a_forward_computes(target_model):
    """What the load controller prices a verify by: every request padded to the longest query and,
    in graphs, both sides rounded up to the bucket (drafts of 5, 6 and 7 cost one bucket)."""
    graphed = LlamaEngine(target_model, max_slots=64, max_context=200, cuda_graphs=True)
    assert [graphed.forward_rows(64, q) for q in (1, 4, 6, 8, 9)] == [64, 256, 512, 512, 1024]
    assert graphed.forward_rows(3, 6) == 4 * 8 and graphed.forward_rows(1, 33) == 64  # a prompt graph's bucket
    assert graphed.forward_rows(2, 40) == 80  # 80 logits: more than a prompt graph computes, eager
    assert graphed.forward_rows(9, 33) == 9 * 33  # more prompts than a prompt graph takes: eager
    eager = LlamaEngine(target_model, max_slots=64, max_context=200, cuda_graphs=False)
    assert eager.forward_rows(3, 6) == 18 and eager.forward_rows(64, 9) == 576
    exact = LlamaEngine(target_model, max_slots=8, max_context=200, cuda_graphs=False, exact=True, exact_rows=16)
    assert exact.forward_rows(3, 6) == 32  # whole blocks of rows


def test_bucketed_path_matches_eager_with_rollback(target_model):
    eager = LlamaEngine(target_model, max_slots=4)
    bucketed = LlamaEngine(target_model, max_slots=4, cuda_graphs=True)
    assert bucketed.graphs is not None
    slots = [eager.allocate() for _ in range(3)]
    assert [bucketed.allocate() for _ in range(3)] == slots
    steps = [  # ragged batches: prompts, then decode / verify shapes with a rollback
        ([list(range(1, 12)), [5, 6, 7], list(range(40, 70))], [3, 1, 5]),
        ([list(range(1, 13)), [5, 6, 7, 8, 9, 10], list(range(40, 71))], [1, 3, 1]),
        ([list(range(1, 13)) + [3], [5, 6, 7, 8, 2], list(range(40, 71)) + [1, 2, 3]], [2, 2, 4]),
    ]
    for seqs, n in steps:
        a = eager.forward(slots, seqs, n)
        b = bucketed.forward(slots, seqs, n)
        assert torch.allclose(a, b, atol=1e-5), (a - b).abs().max()
        ref = torch.cat([hf_logits(target_model, s)[-k:] for s, k in zip(seqs, n)])
        assert torch.allclose(b, ref, atol=1e-4)
    # the 30-token prompt prefilled apart from the short rows (Engine._prefill_apart), then the
    # batch's own forwards: every forward in a bucket, none eager
    assert set(bucketed.graphs.graphs) == {Shape(1, 32, 128), Shape(4, 16, 128), Shape(4, 4, 128)}


@pytest.mark.parametrize("spec", [SpecParams("pearl", 4, adaedl=True), SpecParams("sd", 4, adaedl=False)])
def test_overlapping_drafter_is_lossless(spec, target_model):
    pair = make_pair(target_model, random_llama(0, layers=1))
    ref = generate(pair, PROMPTS, SamplingParams(max_tokens=20), SpecParams("ar"))
    done = generate(pair, PROMPTS, SamplingParams(max_tokens=20), spec, overlap=True)
    assert [d.token_ids for d in done] == [r.token_ids for r in ref]
    assert sum(d.stats.accepted for d in done) > 0


def test_threaded_drafter_drafts_on_its_thread_only_beside_a_verify():
    """SD steps (overlap=False) draft inline; PEARL steps on the thread; both give the plain
    drafter's chunks (the reference)."""
    from tandem.actors.drafter import LocalDrafter, ThreadedDrafter, ThreadedDraftFuture
    from tandem.spec.drafting import DraftFuture
    from tandem.spec.messages import DraftItem

    model = random_llama(7, layers=1)
    plain, threaded = (cls(LlamaEngine(model, max_slots=2)) for cls in (LocalDrafter, ThreadedDrafter))
    try:
        for d in (plain, threaded):
            d.start("r", seed=0)
        items = [DraftItem("r", 0, [1, 2, 3], 4, SamplingParams(), False)]
        want = [c.ids for c in plain.submit(items).result()]
        inline, beside = threaded.submit(items, overlap=False), threaded.submit(items, overlap=True)
        assert type(inline) is DraftFuture and not inline.concurrent
        assert isinstance(beside, ThreadedDraftFuture) and beside.concurrent
        assert [c.ids for c in inline.result()] == [c.ids for c in beside.result()] == want
        assert isinstance(threaded.submit([DraftItem("r", 0, [1, 2, 3], 0, SamplingParams(), False)],
                                          overlap=True), DraftFuture)  # nothing to draft: no thread
    finally:
        threaded.close()


# --------------------------------------------------------------------------- on the GPU


@gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_graphs_match_transformers_forward_on_gpu(dtype):
    model = random_llama(5, hidden=256, layers=3, vocab=512, kv_heads=2).to("cuda", dtype)
    eng = LlamaEngine(model, max_slots=4)
    assert eng.graphs is not None
    seqs = [list(range(1, 30)), [5, 6, 7], list(range(40, 90))]
    slots = [eng.allocate() for _ in seqs]
    eng.forward(slots, seqs, [1, 1, 1])  # three prompts at once: eager
    for extra, n in (([3], 1), ([3, 4, 5], 3), ([9, 8], 2)):  # decode / verify: graphs
        seqs = [s + extra for s in seqs]
        out = eng.forward(slots, seqs, [n] * 3).float()
        ref = torch.cat([hf_logits(model, s)[-n:] for s in seqs])
        err = (out - ref).norm() / ref.norm()
        assert err < (1e-5 if dtype == torch.float32 else 2e-2), err
    assert len(eng.graphs.graphs) >= 2
    # a request joins: its prompt in a prompt graph of its own, then the batch's verify graph
    eng.release(slots[1])
    slots[1] = eng.allocate()
    seqs = [seqs[0] + [4], list(range(100, 177)), seqs[2] + [4]]
    for n in (1, 2):
        out = eng.forward(slots, seqs, [1, n, 1]).float()
        ref = torch.cat([hf_logits(model, s)[-k:] for s, k in zip(seqs, (1, n, 1))])
        assert (out - ref).norm() / ref.norm() < (1e-5 if dtype == torch.float32 else 2e-2)
        seqs = [s + [7] for s in seqs]
    assert any(isinstance(k, Shape) and k.query >= 64 and g.graph is not None for k, g in eng.graphs.graphs.items())


@gpu
def test_a_failed_capture_runs_that_shape_eagerly_and_later_captures_work():
    """Something not capturable (here a host sync) costs its shape the graph, not the engine: the
    shape replays eagerly and the next capture works (PyTorch leaves a failed capture's pool
    recording; without `_abandon_capture` every later capture failed)."""
    eng = LlamaEngine(random_llama(3, hidden=128, layers=1, vocab=256).to("cuda"), max_slots=2)
    x = torch.ones(4, device="cuda")
    caller = torch.cuda.current_stream()
    bad = eng.graphs._capture("bad", (x,), lambda v: v * float(v.sum().item()))
    assert bad.graph is None and torch.equal(bad.replay(), x * 4)
    assert torch.cuda.current_stream() == caller  # not left on the capture stream
    good = eng.graphs._capture("good", (x,), lambda v: v * 2)
    assert good.graph is not None and torch.equal(good.replay(), x * 2)


@gpu
@pytest.mark.parametrize("overlap", [False, True])
def test_tiny_pair_lossless_on_gpu_with_graphs(overlap):
    from tandem.engine.pair import load_pair

    pair = load_pair(TINY / "target", TINY / "draft", device="cuda", dtype="float32", max_slots=4)
    assert pair.target.graphs is not None and pair.draft.graphs is not None
    prompts = [pair.tokenizer.encode(p) for p in ("def main(", "import os\n", "class A:\n    def", "    return ")]
    sampling = SamplingParams(max_tokens=48, ignore_eos=True)
    ref = generate(pair, prompts, sampling, SpecParams("ar"))
    model = pair.target.model
    for p, r in zip(prompts, ref):
        hf = model.generate(torch.tensor([p], device="cuda"), max_new_tokens=48, min_new_tokens=48, do_sample=False)
        assert hf[0, len(p):].tolist() == r.token_ids
    for spec in (SpecParams("sd", 5, adaedl=False), SpecParams("pearl", 4, adaedl=True)):
        done = generate(pair, prompts, sampling, spec, overlap=overlap)
        assert [d.token_ids for d in done] == [r.token_ids for r in ref], spec


@gpu
@pytest.mark.parametrize("batch", [1, 3])
def test_overlapped_drafting_leaves_the_target_alone_on_gpu(batch):
    """In-process PEARL replays the draft's graphs on the drafter's stream while the target's
    replay. GEMMs this wide use cuBLAS split-K and its workspace; when both engines' graphs were
    captured on one stream they shared it and the target's logits came out wrong. With the same
    shapes and kernels, overlapped and sequential drafting must give identical tokens, also in bf16."""
    target = random_llama(6, hidden=2048, layers=2, vocab=4096, heads=16, kv_heads=8).to("cuda", torch.bfloat16)
    draft = random_llama(7, hidden=512, layers=2, vocab=4096, heads=4, kv_heads=4).to("cuda", torch.bfloat16)
    pair = make_pair(target, draft, slots=4)
    prompts = [list(range(3 + b, 40 + 7 * b)) for b in range(batch)]
    sampling = SamplingParams(max_tokens=64, ignore_eos=True)
    for spec in (SpecParams("pearl", 6, adaedl=False), SpecParams("pearl", 12, adaedl=True)):
        alone = generate(pair, prompts, sampling, spec, overlap=False)
        overlapped = generate(pair, prompts, sampling, spec, overlap=True)
        assert [d.token_ids for d in overlapped] == [d.token_ids for d in alone], spec


def test_sampled_judge_equals_the_reference_sampler():
    """judge's batching (one host copy; p concatenated where every request has all its rows,
    scattered into padding where not) gives the tokens rejection_sample_reference gives on
    inputs padded one request at a time, with the same per-request draws."""
    from tandem.kernels.rejection import draw_randoms, rejection_sample_reference
    from tandem.spec.step import judge

    g = torch.Generator().manual_seed(0)
    vocab, paths = 11, set()
    for trial in range(150):
        batch = int(torch.randint(1, 5, (1,), generator=g))
        checks, targets = [], []
        for _ in range(batch):
            n = int(torch.randint(0, 4, (1,), generator=g))
            bonus = bool(torch.randint(0, 2, (1,), generator=g)) or n == 0
            ids = torch.randint(0, vocab, (n,), generator=g).tolist()
            q = torch.rand(n, vocab, generator=g).softmax(-1) if n and trial % 3 else None  # None: one-hot drafts
            checks.append((ids, q, bonus))
            targets.append(torch.rand(n + int(bonus), vocab, generator=g).pow(4).softmax(-1))
        k = max(len(ids) for ids, _, _ in checks)
        paths.add(all(t.shape[0] == k + 1 for t in targets))
        seed = [Stream(trial * 10 + b) for b in range(batch)]
        verdict = judge(checks, targets, seed)

        num = [len(ids) for ids, _, _ in checks]
        draft_ids, p = torch.zeros(batch, k, dtype=torch.long), torch.zeros(batch, k + 1, vocab)
        q = torch.zeros(batch, k, vocab) if any(c[1] is not None for c in checks) else None
        for b, ((ids, qb, _), t) in enumerate(zip(checks, targets)):
            draft_ids[b, : num[b]] = torch.tensor(ids, dtype=torch.long)
            p[b, : t.shape[0]] = t
            if q is not None and ids:
                q[b, : num[b]] = qb if qb is not None else torch.nn.functional.one_hot(torch.tensor(ids), vocab).float()
        uniforms, noise = draw_randoms([Stream(trial * 10 + b) for b in range(batch)], num, k, vocab, "cpu")
        ref = rejection_sample_reference(draft_ids, torch.tensor(num), q, p, torch.tensor([c[2] for c in checks]), uniforms, noise)
        assert verdict.num_accepted.tolist() == ref.num_accepted.tolist(), trial
        assert verdict.num_emitted.tolist() == ref.num_emitted.tolist(), trial
        assert verdict.output_ids.tolist() == ref.output_ids.tolist(), trial
    assert paths == {True, False}  # both ways of building p were taken


def test_greedy_judge_equals_rejection_sampling():
    """The temperature-0 host path gives the tokens the rejection sampler gives for one-hot p."""
    from tandem.spec.step import judge, judge_greedy

    g = torch.Generator().manual_seed(0)
    vocab = 7
    for _ in range(200):
        batch = int(torch.randint(1, 5, (1,), generator=g))
        checks, targets = [], []
        for _ in range(batch):
            n = int(torch.randint(0, 5, (1,), generator=g))
            bonus = bool(torch.randint(0, 2, (1,), generator=g)) or n == 0
            top = torch.randint(0, 3, (n + int(bonus),), generator=g).tolist()  # small range: matches happen
            ids = torch.randint(0, 3, (n,), generator=g).tolist()
            checks.append((ids, None, bonus))
            targets.append(top)
        probs = [torch.nn.functional.one_hot(torch.tensor(t, dtype=torch.long), vocab).float() for t in targets]
        verdict = judge(checks, probs, [Stream(1) for _ in checks])
        accepted, emitted = judge_greedy(checks, targets)
        assert accepted == verdict.num_accepted.tolist()
        assert emitted == [o[:k] for o, k in zip(verdict.output_ids.tolist(), verdict.num_emitted.tolist())]


def test_a_prompt_runs_in_a_prefill_bucket_that_computes_only_the_rows_asked_for(target_model):
    from tandem.engine.graphs import PREFILL_ROWS

    eager = LlamaEngine(target_model, max_slots=2)
    bucketed = LlamaEngine(target_model, max_slots=2, cuda_graphs=True)
    for n_logits in (1, 5):
        seq = [3 + (7 * i) % 60 for i in range(40 + n_logits)]
        a, b = eager.allocate(), bucketed.allocate()
        want, got = eager.forward([a], [seq], [n_logits]), bucketed.forward([b], [seq], [n_logits])
        assert got.shape == want.shape and torch.allclose(got, want, atol=1e-5), (got - want).abs().max()
        eager.release(a), bucketed.release(b)
    g = bucketed.graphs.graphs[Shape(1, 64, 128)]
    assert g.rows_inside and g.inputs[0].numel() == 3 * 64 + 1 + PREFILL_ROWS
    bucketed.forward([bucketed.allocate()], [list(range(1, 101))], [1])  # a 128 bucket
    assert bucketed.graphs.graphs[Shape(1, 128, 128)].outputs is g.outputs  # one output for all prompt graphs
    assert bucketed.graphs.bucket(Shape(1, 100, 100), rows=PREFILL_ROWS + 1) is None  # more logits: eager


def test_many_prompts_at_once_prefill_in_graphed_groups_of_similar_lengths(target_model):
    """Eleven prompts in one step (a wave of joins, or a lane's first step), seven short and four
    long, arriving mixed: prefilled in forwards of at most PREFILL_BATCH prompts, each a prompt
    graph, the short ones together and the long ones together (one forward pads every row to
    its longest), then the batch's own forward at a decode shape; the logits are the eager
    engine's."""
    from tandem.engine.graphs import PREFILL_BATCH

    eager = LlamaEngine(target_model, max_slots=12)
    bucketed = LlamaEngine(target_model, max_slots=12, cuda_graphs=True)
    lengths = [40, 150, 41, 42, 160, 43, 44, 45, 170, 46, 180]
    prompts = [[(7 * i + j) % 90 + 1 for j in range(n)] for i, n in enumerate(lengths)]
    slots = [eager.allocate() for _ in prompts]
    assert [bucketed.allocate() for _ in prompts] == slots
    a = eager.forward(slots, prompts, [1] * len(prompts))
    b = bucketed.forward(slots, prompts, [1] * len(prompts))
    assert torch.allclose(a, b, atol=1e-5), (a - b).abs().max()
    prompt_graphs = sorted((s.batch, s.query) for s in bucketed.graphs.graphs if s.query > 1)
    assert prompt_graphs == [(4, 192), (PREFILL_BATCH, 64)]  # not 8 x 192 + 4 x 192 in arrival order
    assert any(s.query == 1 and s.batch == 12 for s in bucketed.graphs.graphs)  # then one row each


def test_prompts_asking_many_logits_prefill_apart_in_graphs(target_model):
    """Five 40-token rows asking 17 logits each: one forward would ask 85 logits, more than a
    prompt graph holds (PREFILL_ROWS), and run eagerly; priced as such, the rows prefill apart in
    a graph, then verify their last 17 in another."""
    eager = LlamaEngine(target_model, max_slots=8)
    bucketed = LlamaEngine(target_model, max_slots=8, cuda_graphs=True)
    seqs = [[(5 * i + j) % 90 + 1 for j in range(40)] for i in range(5)]
    slots = [eager.allocate() for _ in seqs]
    assert [bucketed.allocate() for _ in seqs] == slots
    a = eager.forward(slots, seqs, [17] * 5)
    b = bucketed.forward(slots, seqs, [17] * 5)
    assert torch.allclose(a, b, atol=1e-5), (a - b).abs().max()
    assert {(s.batch, s.query) for s in bucketed.graphs.graphs} == {(8, 32)}  # 23 fed apart, then 17: both graphed


def test_a_prefill_plan_groups_similar_lengths_at_the_least_padding(target_model):
    """`_prefill_plan` against trying every split of the sorted rows into runs."""
    import itertools

    eng = LlamaEngine(target_model, max_slots=16, cuda_graphs=True)
    rng = torch.Generator().manual_seed(0)
    for _ in range(20):
        n = int(torch.randint(1, 11, (1,), generator=rng))
        lengths = {b: int(torch.randint(17, 230, (1,), generator=rng)) for b in range(n)}
        groups, cost = eng._prefill_plan(list(range(n)), lengths, lengths)
        assert sorted(b for g in groups for b in g) == list(range(n))
        order = sorted(range(n), key=lambda b: lengths[b])
        best = min(
            sum(eng.prefill_cost(len(run), lengths[run[-1]], lengths[run[-1]], len(run)) for run in runs)
            for cuts in itertools.product([False, True], repeat=n - 1)
            for runs in [_runs(order, cuts)] if all(len(r) <= eng.prefill_group for r in runs))
        assert cost == best


def _runs(order, cuts):
    runs, run = [], [order[0]]
    for b, cut in zip(order[1:], cuts):
        if cut:
            runs.append(run)
            run = []
        run.append(b)
    return runs + [run]
