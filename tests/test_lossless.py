"""Lossless decoding: exact greedy equality with the target alone, and sampling distributions.

The greedy tests are transformers' own assisted-generation check ("same" and "random"
assistants), extended to every mode, AdaEDL on and off, batches of ragged prompts.
"""
from __future__ import annotations

import copy

import pytest
import torch
from conftest import Scripted, ScriptedLengths, make_pair, random_llama
from scipy.stats import chi2, ncx2

from tandem.actors.offline import generate
from tandem.engine.hf_engine import HFEngine
from tandem.kernels.sampling import logits_to_probs
from tandem.params import SamplingParams, SpecParams

PROMPTS = [[1, 2, 3, 4, 5], [7, 8, 9], list(range(10, 40)), [42]]
SPECS = [
    SpecParams("ar"),
    SpecParams("sd", 4, adaedl=False),
    SpecParams("sd", 6, adaedl=True),
    SpecParams("pearl", 3, adaedl=False),
    SpecParams("pearl", 5, adaedl=True),
    SpecParams("sd", 4, adaedl=False, send_draft_probs=False),
]


def hf_greedy(model, prompt, n):
    out = model.generate(torch.tensor([prompt]), max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
    return out[0, len(prompt):].tolist()


@pytest.fixture(scope="module")
def reference(target_model):
    return {tuple(p): hf_greedy(target_model, p, 24) for p in PROMPTS}


@pytest.mark.parametrize("drafter", ["same", "random"])
@pytest.mark.parametrize("spec", SPECS, ids=lambda s: f"{s.mode}-k{s.max_draft}-ada{int(s.adaedl)}-q{int(s.send_draft_probs)}")
def test_greedy_equals_target_alone(drafter, spec, target_model, random_draft_model, reference):
    draft = target_model if drafter == "same" else random_draft_model
    pair = make_pair(target_model, draft)
    for prompts in (PROMPTS[:1], PROMPTS):  # batch of 1, and a ragged batch of 4
        done = generate(pair, prompts, SamplingParams(max_tokens=24), spec)
        for p, d in zip(prompts, done):
            assert d.token_ids == reference[tuple(p)], (spec, p)
            assert d.finish_reason == "length"
    if drafter == "same" and spec.mode != "ar":
        assert done[0].stats.accepted == done[0].stats.checked > 0  # everything accepted
    if drafter == "random" and spec.mode != "ar":
        assert done[0].stats.accepted <= done[0].stats.checked // 4  # almost nothing accepted


def test_mixed_modes_in_one_batch(target_model, random_draft_model, reference):
    pair = make_pair(target_model, random_llama(0, layers=1))  # related drafter: partial acceptance
    specs = [SPECS[i % len(SPECS)] for i in range(len(PROMPTS))]
    done = generate(pair, PROMPTS, SamplingParams(max_tokens=24), specs)
    assert [d.token_ids for d in done] == [reference[tuple(p)] for p in PROMPTS]


def test_more_requests_than_slots_queue_and_finish(target_model, reference):
    pair = make_pair(target_model, random_llama(0, layers=1), slots=2)
    done = generate(pair, PROMPTS * 2, SamplingParams(max_tokens=24), SpecParams("pearl", 4))
    assert [d.token_ids for d in done] == [reference[tuple(p)] for p in PROMPTS * 2]
    assert pair.target.free_slots == 2 and pair.draft.free_slots == 2  # nothing leaked


def test_hf_engine_path_is_also_exact(target_model, reference):
    pair = make_pair(target_model, random_llama(0, layers=1), engine_cls=HFEngine)
    done = generate(pair, PROMPTS, SamplingParams(max_tokens=24), SpecParams("pearl", 4))
    assert [d.token_ids for d in done] == [reference[tuple(p)] for p in PROMPTS]


def test_seeded_sampling_is_reproducible_alone_or_batched(target_model):
    pair = make_pair(target_model, random_llama(0, layers=1))
    s = SamplingParams(max_tokens=16, temperature=1.0, seed=123)
    alone = generate(pair, [PROMPTS[0]], s, SpecParams("pearl", 4))[0].token_ids
    batched = generate(pair, PROMPTS, [s] + [SamplingParams(16, 1.0, seed=i) for i in range(3)], SpecParams("pearl", 4))
    assert batched[0].token_ids == alone


# -- sampling distributions ------------------------------------------------------------------------

N_SAMPLES = 6000
CONTEXT = [5, 17, 40, 3]


def peaked_pair():
    """A target with peaked distributions (init 0.8) and a drafter that differs from it only in
    a perturbed output head: acceptance is partial (joint TV of two tokens ~0.55), so both
    acceptances and corrections occur, and ~50 cells of (t1, t2) hold most of the mass."""
    target = random_llama(10, hidden=32, layers=1, vocab=64, init=0.8, kv_heads=4, tied=False)
    draft = copy.deepcopy(target)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        draft.lm_head.weight.add_(0.3 * torch.randn(draft.lm_head.weight.shape, generator=g))
    return target, draft


def exact_joint(model, context, temperature, top_p) -> torch.Tensor:  # [V, V] P(t1, t2)
    def probs(rows):
        n = rows.shape[0]
        return logits_to_probs(rows, torch.full((n,), temperature), torch.zeros(n, dtype=torch.long), torch.full((n,), top_p))

    vocab = model.config.vocab_size
    with torch.no_grad():
        p1 = probs(model(torch.tensor([context])).logits[0, -1:])[0].double()  # [V]
        seqs = torch.tensor([context + [t] for t in range(vocab)])
        p2 = probs(model(seqs).logits[:, -1]).double()  # [V, V] rows: t1
    return p1[:, None] * p2


def cells(expected_probs: torch.Tensor, n: int) -> torch.Tensor:
    """Cells expected >= 5 times; everything else is pooled into one more cell."""
    return expected_probs.flatten() * n >= 5


def pooled(x: torch.Tensor, big: torch.Tensor) -> torch.Tensor:
    return torch.cat([x.flatten()[big], x.flatten()[~big].sum().view(1)])


def chi_square_pvalue(counts: torch.Tensor, expected_probs: torch.Tensor, n: int) -> float:
    big = cells(expected_probs, n)
    obs, exp = pooled(counts.double(), big), pooled(expected_probs * n, big)
    keep = exp > 0
    if (obs[~keep] > 0).any():
        return 0.0  # a token the law gives no mass to was observed
    stat = float(((obs[keep] - exp[keep]) ** 2 / exp[keep]).sum())
    return float(chi2.sf(stat, int(keep.sum()) - 1))


def power_against_mixture(p: torch.Tensor, q: torch.Tensor, n: int, bias=0.1, level=1e-3) -> float:
    """Power of the test above if the sampler emitted (1-bias)·p + bias·q instead of p."""
    big = cells(p, n)
    pp, mm = pooled(p, big), pooled((1 - bias) * p + bias * q, big)
    noncentrality = float(n * ((mm - pp) ** 2 / pp.clamp_min(1e-12)).sum())
    df = int(big.sum())
    return float(ncx2.sf(chi2.isf(level, df), df, noncentrality))


def sample_joint(pair, spec, temperature, top_p, vocab, controller=None) -> torch.Tensor:  # [V, V] counts
    counts = torch.zeros(vocab, vocab)
    samplings = [SamplingParams(4, temperature, 0, top_p, seed=s, ignore_eos=True) for s in range(N_SAMPLES)]
    for d in generate(pair, [CONTEXT] * N_SAMPLES, samplings, spec, controller=controller):
        counts[d.token_ids[0], d.token_ids[1]] += 1
    return counts


@pytest.mark.parametrize(
    "spec,top_p",
    [(SpecParams("sd", 3, adaedl=False), 1.0), (SpecParams("pearl", 3, adaedl=False), 1.0),
     (SpecParams("pearl", 3, adaedl=True), 0.8), (SpecParams("sd", 3, False, False), 1.0),
     (SpecParams("pearl", 2, False, False), 0.8), (SpecParams("sd", 3, adaedl=False), "capped"),
     (SpecParams("pearl", 3, adaedl=False), "capped"), (SpecParams("sd", 3, adaedl=False), "lengths"),
     (SpecParams("pearl", 3, adaedl=False), "lengths"), (SpecParams("auto", 3, adaedl=True), "lengths")],
    ids=["sd", "pearl", "pearl-adaedl-topp", "sd-onehot", "pearl-onehot-topp", "sd-load-capped", "pearl-load-capped",
         "sd-own-lengths", "pearl-own-lengths", "auto-own-lengths"],
)
def test_sampling_matches_target_distribution(spec, top_p):
    """Joint law of the first two tokens (the second is judged in PEARL's POST step). "capped":
    the load controller's cap changes every step (1, then 0, then 2: the first token drafted, the
    second decoded, or the other way round in PEARL), at top-p 1. "lengths": every request gets
    its own random length (0-3) every step, as the controller's per-request choice does."""
    target, draft = peaked_pair()
    pair = make_pair(target, draft, slots=1024)
    controller = {"capped": Scripted([1, 0, 2]), "lengths": ScriptedLengths(3, seed=1)}.get(top_p)
    top_p = 1.0 if controller is not None else top_p
    counts = sample_joint(pair, spec, 1.0, top_p, 64, controller)
    p, q = exact_joint(target, CONTEXT, 1.0, top_p), exact_joint(draft, CONTEXT, 1.0, top_p)
    assert chi_square_pvalue(counts, p, N_SAMPLES) > 1e-3
    # The test has teeth: the draft's own law is rejected, and a sampler that leaked 10% of
    # the draft's law into its output would be caught with high probability.
    assert chi_square_pvalue(counts, q, N_SAMPLES) < 1e-3
    assert power_against_mixture(p, q, N_SAMPLES) > 0.9
    assert pair.target.free_slots == 1024


# -- the shipped tiny pair ----------------------------------------------------------------------------

TINY_PROMPTS = [
    "def _parse_header(line):\n",
    "class Queue:\n    def __init__(self, maxsize=0):\n        self.maxsize = maxsize\n",
    "import os\n",
]


def test_tiny_pair_all_modes_equal_transformers_generate(tiny_pair_paths):
    from transformers import AutoModelForCausalLM

    from tandem.engine.pair import load_pair

    target_dir, draft_dir = tiny_pair_paths
    pair = load_pair(target_dir, draft_dir, max_slots=4)
    hf = AutoModelForCausalLM.from_pretrained(str(target_dir), dtype=torch.float32, local_files_only=True)
    prompts = [pair.tokenizer.encode(p, add_special_tokens=False) for p in TINY_PROMPTS]
    sampling = SamplingParams(max_tokens=32, ignore_eos=True)
    reference = [hf_greedy(hf, p, 32) for p in prompts]
    for spec in SPECS:
        done = generate(pair, prompts, sampling, spec)  # ragged batch of 3
        assert [d.token_ids for d in done] == reference, spec
    pearl = generate(pair, prompts, sampling, SpecParams("pearl", 4, adaedl=False))
    assert sum(d.stats.accepted for d in pearl) / sum(d.stats.checked for d in pearl) > 0.5
