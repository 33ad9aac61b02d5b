"""Engines against transformers' own forward, and KV rollback."""
import pytest
import torch
from conftest import random_llama

from tandem.engine.hf_engine import HFEngine
from tandem.engine.llama import LlamaEngine

ENGINES = [LlamaEngine, HFEngine]


def hf_logits(model, seq):  # [len(seq), V]
    with torch.no_grad():
        return model(torch.tensor([seq])).logits[0]


@pytest.mark.parametrize("engine_cls", ENGINES)
def test_ragged_batch_matches_transformers_forward(engine_cls, target_model):
    eng = engine_cls(target_model, max_slots=4)
    seqs = [list(range(1, 12)), [5, 6, 7], list(range(40, 70))]
    slots = [eng.allocate() for _ in seqs]
    out = eng.forward(slots, seqs, [3, 1, 5])
    ref = torch.cat([hf_logits(target_model, seqs[0])[-3:], hf_logits(target_model, seqs[1])[-1:],
                     hf_logits(target_model, seqs[2])[-5:]])
    assert torch.allclose(out, ref, atol=1e-4), (out - ref).abs().max()


@pytest.mark.parametrize("engine_cls", ENGINES)
def test_a_prompt_beside_short_rows_is_prefilled_apart(engine_cls, target_model, monkeypatch):
    # else every row of the batch is padded to the prompt's length (continuous batching: a
    # request joins a running batch at almost every step)
    eng = engine_cls(target_model, max_slots=4)
    slots = [eng.allocate() for _ in range(3)]
    running = [[1, 2, 3], [4, 5, 6, 7]]
    eng.forward(slots[:2], running, [1, 1])
    widths = []
    forward = eng._forward
    monkeypatch.setattr(eng, "_forward", lambda sl, st, tok, n: widths.append([len(t) for t in tok]) or forward(sl, st, tok, n))
    prompt = list(range(10, 50))
    seqs = [running[0] + [8, 9], running[1] + [3], prompt]
    out = eng.forward(slots, seqs, [2, 1, 1])
    assert widths == [[39], [2, 1, 1]]  # the prompt alone, then every row's own few tokens
    ref = torch.cat([hf_logits(target_model, seqs[0])[-2:], hf_logits(target_model, seqs[1])[-1:],
                     hf_logits(target_model, seqs[2])[-1:]])
    assert torch.allclose(out, ref, atol=1e-4), (out - ref).abs().max()
    assert eng.cached_length(slots[2]) == 40


@pytest.mark.parametrize("engine_cls", ENGINES)
def test_incremental_feeding_and_rollback(engine_cls, target_model):
    eng = engine_cls(target_model, max_slots=2)
    slot = eng.allocate()
    eng.forward([slot], [[1, 2, 3, 4]], [1])
    eng.forward([slot], [[1, 2, 3, 4, 9, 9, 9]], [4])  # drafts 9 9 9 fed
    assert eng.cached_length(slot) == 7
    # Rejected after the first 9: the next sequence diverges there; the slot must roll back.
    out = eng.forward([slot], [[1, 2, 3, 4, 9, 5, 6]], [2])
    ref = hf_logits(target_model, [1, 2, 3, 4, 9, 5, 6])[-2:]
    assert torch.allclose(out, ref, atol=1e-4)


@pytest.mark.parametrize("engine_cls", ENGINES)
def test_slots_are_independent_and_released(engine_cls, target_model):
    eng = engine_cls(target_model, max_slots=2)
    a, b = eng.allocate(), eng.allocate()
    eng.forward([a, b], [[1, 2, 3], [7, 8, 9, 10]], [1, 1])
    assert eng.free_slots == 0
    eng.release(a)
    assert eng.free_slots == 1
    c = eng.allocate()
    out = eng.forward([c, b], [[4, 4], [7, 8, 9, 10, 11]], [1, 1])  # c starts clean
    ref = torch.stack([hf_logits(target_model, [4, 4])[-1], hf_logits(target_model, [7, 8, 9, 10, 11])[-1]])
    assert torch.allclose(out, ref, atol=1e-4)


def test_gqa_and_untied_checkpoint():
    model = random_llama(3, hidden=64, layers=2, tied=False, kv_heads=1)
    eng = LlamaEngine(model, max_slots=1)
    seq = list(range(3, 20))
    out = eng.forward([eng.allocate()], [seq], [len(seq)])
    assert torch.allclose(out, hf_logits(model, seq), atol=1e-4)


def test_sequence_longer_than_context_is_refused(target_model):
    eng = LlamaEngine(target_model, max_slots=1, max_context=8)
    with pytest.raises(ValueError, match="exceeds the context"):
        eng.forward([eng.allocate()], [list(range(9))], [1])
