"""A request can only fail itself (no Ray): the validators take any value without crashing, a lane
fed random requests keeps serving the exact greedy output, a request that breaks inside a step
ends alone, and only an engine that fails every request takes the lane down."""
from __future__ import annotations

import math
import threading

import pytest
from conftest import make_pair, random_llama

pytest.importorskip("hypothesis")  # the test extra (not on every GPU machine)
pytest.importorskip("ray")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from tandem.actors.drafter import LocalDrafter
from tandem.actors.lane_core import MAX_FAILED_STEPS, LaneCore
from tandem.actors.offline import generate, run_batch
from tandem.cluster.frontend import check_request_id, check_stops, check_text
from tandem.errors import TandemError
from tandem.params import MAX_SEED, SamplingParams, SpecParams
from tandem.spec.batch import SpecBatch
from tandem.spec.messages import Emission

VOCAB = 300  # random_llama's
anything = st.one_of(st.none(), st.booleans(), st.integers(min_value=-(2**80), max_value=2**80),
                     st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=5))


@settings(max_examples=300, deadline=None)
@given(max_tokens=anything, temperature=anything, top_k=anything, top_p=anything, seed=anything, ignore_eos=anything)
def test_sampling_validation_refuses_cleanly_or_returns_usable_values(max_tokens, temperature, top_k, top_p, seed,
                                                                      ignore_eos):
    params = SamplingParams(max_tokens, temperature, top_k, top_p, seed, ignore_eos)
    try:
        ok = params.validate(VOCAB)
    except TandemError:
        return
    assert isinstance(ok.max_tokens, int) and ok.max_tokens >= 1
    assert math.isfinite(ok.temperature) and (ok.temperature == 0 or ok.temperature >= 1e-5)
    assert 0 < ok.top_p <= 1 and 0 <= ok.top_k <= VOCAB
    assert ok.seed is None or 0 <= ok.seed <= MAX_SEED


@settings(max_examples=200, deadline=None)
@given(mode=anything, max_draft=anything, adaedl=anything)
def test_spec_validation_refuses_cleanly(mode, max_draft, adaedl):
    try:
        SpecParams(mode, max_draft, adaedl).validate()
    except TandemError:
        return
    assert mode in ("ar", "sd", "pearl") and 0 <= max_draft <= 64


@settings(max_examples=200, deadline=None)
@given(text=st.text(max_size=40), stops=st.lists(st.text(max_size=300), max_size=12))
def test_text_checks_refuse_cleanly(text, stops):
    for check in (lambda: check_text("prompt", text, 30), lambda: check_stops(stops), lambda: check_request_id(text)):
        try:
            check()
        except TandemError:
            pass


requests = st.fixed_dictionaries({
    "prompt": st.lists(st.integers(0, VOCAB - 1), min_size=0, max_size=6),
    "max_tokens": st.one_of(st.integers(1, 10), st.integers(-3, 0), st.just(10**9)),
    "temperature": st.sampled_from([0.0, 0.0, 0.7, 1.0, -1.0, math.nan, math.inf, 1e-30]),
    "top_k": st.sampled_from([0, 5, VOCAB, VOCAB + 1, -2, 10**12]),
    "seed": st.one_of(st.none(), st.integers(-5, 2**70)),
    "mode": st.sampled_from(["ar", "sd", "pearl", "bogus"]),
    "max_draft": st.sampled_from([0, 3, 8, 65, -1]),
})


@pytest.fixture(scope="module")
def pair():
    return make_pair(random_llama(0), random_llama(1, hidden=32, layers=1, tied=False), slots=4)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(batch=st.lists(requests, min_size=1, max_size=6))
def test_a_lane_fed_random_requests_keeps_serving_exact_greedy_output(pair, batch):
    core = LaneCore(SpecBatch(pair.target, LocalDrafter(pair.draft), set()), max_queued=8, max_batch_size=3)
    got, done, accepted, ended = {}, threading.Event(), [], []

    def sink(e: Emission) -> None:
        got.setdefault(e.rid, []).extend(e.token_ids)
        if e.finish_reason:
            ended.append((e.rid, e.finish_reason))
            if len(ended) == len(accepted):
                done.set()

    try:
        for i, r in enumerate(batch):
            sampling = SamplingParams(r["max_tokens"], r["temperature"], r["top_k"], 1.0, r["seed"], True)
            try:
                core.submit(str(i), r["prompt"], sampling, SpecParams(r["mode"], r["max_draft"], False), sink)
            except TandemError:
                continue  # refused at the edge of the lane, with a message
            accepted.append((str(i), r, sampling))
        assert not accepted or done.wait(timeout=60)
        assert core.load()["healthy"] and all(reason == "length" for _, reason in ended), ended
    finally:
        core.stop()
    for rid, r, sampling in accepted:  # greedy requests: exactly the target alone
        if sampling.validate(VOCAB).temperature == 0:
            want = generate(pair, [r["prompt"]], SamplingParams(r["max_tokens"], ignore_eos=True), SpecParams("ar"))
            assert got[rid] == want[0].token_ids, (rid, r)


def test_a_request_that_breaks_inside_a_step_ends_alone(pair, monkeypatch):
    """One request's verify raises: it ends with "error"; the others finish with the greedy output."""
    from tandem.spec.modes import SDMode

    prompts = [[1, 2, 3], [4, 5], [6, 7, 8, 9]]
    sampling = SamplingParams(max_tokens=10, ignore_eos=True)
    want = [d.token_ids for d in generate(pair, prompts, sampling, SpecParams("ar"))]
    real = SDMode.verify_item

    def broken(self, r, chunk):
        if r.rid == "1":
            raise RuntimeError("injected fault")
        return real(self, r, chunk)

    monkeypatch.setattr(SDMode, "verify_item", broken)
    batch = SpecBatch(pair.target, LocalDrafter(pair.draft), set())
    out = run_batch(batch, prompts, sampling, SpecParams("sd", 3, adaedl=False))
    assert [out[0].token_ids, out[2].token_ids] == [want[0], want[2]]
    assert out[1].finish_reason == "error" and [o.finish_reason for o in (out[0], out[2])] == ["length"] * 2
    assert batch.free_slots == 4  # its slots came back


def test_an_engine_that_fails_every_step_takes_the_lane_down_and_says_so(pair, monkeypatch):
    from tandem.spec import batch as batch_module

    def always(*args, **kwargs):
        raise RuntimeError("device lost")

    monkeypatch.setattr(batch_module, "speculative_step", always)
    core = LaneCore(SpecBatch(pair.target, LocalDrafter(pair.draft), set()), max_queued=8, max_batch_size=1)
    ends: list[Emission] = []
    done = threading.Event()

    def sink(e: Emission) -> None:
        ends.append(e)
        if len(ends) == MAX_FAILED_STEPS + 1:
            done.set()

    sampling = SamplingParams(max_tokens=5, ignore_eos=True)
    for i in range(MAX_FAILED_STEPS + 1):  # one request per step: each fails alone, the third takes the lane
        core.submit(str(i), [1, 2], sampling, SpecParams("ar"), sink)
    assert done.wait(timeout=30)
    core._thread.join(timeout=10)
    assert all(e.finish_reason == "error" for e in ends)
    assert ends[-1].lane_failed and not ends[0].lane_failed
    assert not core.load()["healthy"]
    from tandem.errors import LaneUnavailable

    with pytest.raises(LaneUnavailable):
        core.submit("late", [1, 2], sampling, SpecParams("ar"), sink)
