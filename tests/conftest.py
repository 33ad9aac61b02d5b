"""Shared fixtures: small random Llama models (fast, fp32) and the shipped tiny pair."""
from __future__ import annotations

import itertools
import math
import random
import socket
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from tandem.engine.llama import LlamaEngine
from tandem.engine.pair import ModelPair
from tandem.models import SHIPPED
from tandem.spec.load_control import LoadControlConfig, LoadController

REPO = Path(__file__).resolve().parent.parent
TINY = SHIPPED / "tiny"
SERVICER = "tandem.protos.tandem_pb2_grpc.add_TandemServicer_to_server"


def gpu(test):
    """A GPU test: marked (`pytest -m gpu` on the GPU machine) and skipped without CUDA."""
    return pytest.mark.gpu(pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")(test))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def random_llama(seed: int, hidden=64, layers=2, vocab=300, tied=True, init=0.02, kv_heads=2, heads=4) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=256,
        tie_word_embeddings=tied, initializer_range=init, eos_token_id=None, bos_token_id=None,
    )
    return LlamaForCausalLM(cfg).eval()


class NoTokenizer:
    eos_token_id = None


def make_pair(target, draft, slots=8, engine_cls=LlamaEngine) -> ModelPair:
    return ModelPair(NoTokenizer(), engine_cls(target, slots), engine_cls(draft, slots))


@pytest.fixture(scope="session")
def target_model():
    return random_llama(0)


@pytest.fixture(scope="session")
def random_draft_model():
    # Untied and differently seeded: with tied embeddings a random model mostly repeats its
    # input token, and two such models would agree; this one almost never does.
    return random_llama(1, hidden=32, layers=1, tied=False)


@pytest.fixture(scope="session")
def tiny_pair_paths():
    assert (TINY / "target" / "config.json").is_file(), "the shipped tiny pair is missing (tandem/models/tiny)"
    return TINY / "target", TINY / "draft"


class Scripted(LoadController):
    """The real load controller's bookkeeping with caps that change every step (0 included), so
    a batch's handling of caps is tested apart from the cost model."""

    def __init__(self, caps) -> None:
        super().__init__(LoadControlConfig(every=1))
        self.script = itertools.cycle(caps)

    def _choose(self, candidates, speculating):
        return next(self.script), math.inf  # an infinite predicted gain: no probes of cap 0


class ScriptedLengths(LoadController):
    """Per-request lengths drawn afresh every step (0 included), independently per request: a
    batch's handling of each request's own length, tested apart from the model that picks them."""

    def __init__(self, longest: int = 4, seed: int = 0) -> None:
        super().__init__(LoadControlConfig(every=1))
        self.rng, self.longest = random.Random(seed), longest

    def _choose(self, candidates, speculating):
        self.lengths = {c.rid: self.rng.randint(0, self.longest) for c in speculating}
        return self.longest, math.inf
