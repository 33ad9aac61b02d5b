"""What guards a running cluster, tried as a client and as an attacker would (a real local Ray
cluster on CPU, the app built by tandem.cluster.app:build_app with TANDEM_API_KEYS set):

- keys on every gRPC and HTTP call, and request ids that belong to the key that made them;
- bad numbers, oversized and malformed requests refused with a clear status, the lane unharmed;
- faults, injected by killing a process by its pid: a drafter (no request fails, greedy output as
  if nothing happened, speculation resumes), the Router (its requests leave the lane within
  seconds), the Lane (its streams end UNAVAILABLE at once, Serve replaces it, Health is honest
  meanwhile, the SDK's retry covers new calls). The fault tests run last: they disrupt the cluster.
"""
from __future__ import annotations

import http.client
import json
import math
import os
import shutil
import signal
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import pytest
from conftest import TINY, free_port

from tandem.client import (
    InvalidArgument,
    ResourceExhausted,
    TandemClient,
    TandemClientError,
    Unauthenticated,
    Unavailable,
)

KEYS = ("key-alpha", "key-beta")
LIMIT_BYTES = 64 * 1024
# The lane's step loop runs in a core process of its own here (lane.core_process): the faults below
# go through it (killing the replica takes its core process along).
ARGS = {"lane": {"drafter_cpus": 0.5, "max_batch_size": 6, "max_queued": 8, "core_process": True},
        "max_tokens_limit": 1000,
        "limits": {"max_request_bytes": LIMIT_BYTES, "max_prompt_chars": 20_000}}
PROMPT = "def fibonacci(n):\n"


@dataclass
class Cluster:
    grpc: str
    http: str

    def client(self, key: str | None = KEYS[0], **kw) -> TandemClient:
        kw.setdefault("retries", 0)
        return TandemClient(self.grpc, timeout=120, api_key=key or "", **kw)

    def post(self, path: str, body, key: str | None = KEYS[0], raw: bytes | None = None) -> tuple[int, dict]:
        host, port = self.http.removeprefix("http://").split(":")
        conn = http.client.HTTPConnection(host, int(port), timeout=120)
        headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
        try:
            conn.request("POST", path, raw if raw is not None else json.dumps(body), headers)
            r = conn.getresponse()
            return r.status, json.loads(r.read())
        finally:
            conn.close()

    def get(self, path: str, key: str | None = KEYS[0]) -> int:
        host, port = self.http.removeprefix("http://").split(":")
        conn = http.client.HTTPConnection(host, int(port), timeout=60)
        try:
            conn.request("GET", path, headers={"Authorization": f"Bearer {key}"} if key else {})
            r = conn.getresponse()
            r.read()
            return r.status
        finally:
            conn.close()


@pytest.fixture(scope="module")
def cluster():
    ray = pytest.importorskip("ray")
    from ray import serve

    from tandem.cluster.app import build_app

    temp = tempfile.mkdtemp(prefix="tdg", dir="/tmp")
    http_port, grpc_port = free_port(), free_port()
    old = os.environ.get("TANDEM_API_KEYS")
    os.environ["TANDEM_API_KEYS"] = ",".join(KEYS)  # the replicas inherit the environment Ray starts in
    ray.init(num_cpus=4, num_gpus=0, _temp_dir=temp, object_store_memory=200 * 1024**2,
             include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": http_port})
        serve.run(build_app({**ARGS, "grpc": {"port": grpc_port}}), name="tandem", route_prefix="/")
        yield Cluster(f"127.0.0.1:{grpc_port}", f"http://127.0.0.1:{http_port}")
    finally:
        serve.shutdown()
        ray.shutdown()
        shutil.rmtree(temp, ignore_errors=True)
        if old is None:
            os.environ.pop("TANDEM_API_KEYS", None)
        else:
            os.environ["TANDEM_API_KEYS"] = old


@pytest.fixture(scope="module")
def greedy():
    """Offline AR ids of PROMPT: the target alone, in-process."""
    from tandem.actors.offline import generate
    from tandem.engine.pair import load_pair
    from tandem.params import SamplingParams, SpecParams

    pair = load_pair(TINY / "target", TINY / "draft", max_slots=2)
    prompt = pair.tokenizer.encode(PROMPT, add_special_tokens=False)
    cache = {}

    def ids(n: int) -> list[int]:
        if n not in cache:
            cache[n] = generate(pair, [prompt], SamplingParams(max_tokens=n, ignore_eos=True), SpecParams("ar"))[0].token_ids
        return cache[n]
    return ids


def wait_until(cond, timeout: float, what: str) -> float:
    start = time.monotonic()
    while not cond():
        assert time.monotonic() - start < timeout, f"timed out after {timeout}s waiting for {what}"
        time.sleep(0.1)
    return time.monotonic() - start


# -- keys ---------------------------------------------------------------------------------------
def test_every_call_needs_a_valid_key(cluster):
    for key in (None, "key-gamma"):
        with cluster.client(key) as c:
            for call in (c.health, c.list_models, lambda: c.cancel("x"), lambda: c.complete("x", max_tokens=2)):
                with pytest.raises(Unauthenticated):
                    call()
        assert cluster.post("/v1/completions", {"prompt": "x", "max_tokens": 2}, key=key)[0] == 401
        assert cluster.get("/v1/models", key=key) == 401 and cluster.get("/health", key=key) == 401
    status, body = cluster.post("/v1/completions", {"prompt": "x", "max_tokens": 2}, key=None)
    assert body["error"]["type"] == "invalid_api_key" and "Bearer" in body["error"]["message"]
    with cluster.client(KEYS[1]) as c:
        assert c.health().status == "SERVING"
    assert cluster.get("/health") == 200


def test_a_request_id_belongs_to_the_key_that_made_it(cluster, greedy):
    with cluster.client(KEYS[0]) as alice, cluster.client(KEYS[1]) as bob:
        stream = alice.generate(PROMPT, max_tokens=900, ignore_eos=True, mode="ar", request_id="job-1")
        first = next(stream)
        assert first.request_id == "job-1"
        assert bob.cancel("job-1") is False  # bob cannot see alice's job-1, let alone cancel it
        mine = bob.complete(PROMPT, max_tokens=5, request_id="job-1")  # nor is the id taken for him
        assert mine.finish_reason == "length" and mine.token_ids == greedy(5)
        assert alice.cancel("job-1") is True
        assert [c.finish_reason for c in stream][-1] == "cancelled"


# -- bad input ----------------------------------------------------------------------------------
BAD_HTTP = [
    ({"seed": 1180591620717411303424, "temperature": 1}, "seed"),
    ({"seed": -1, "temperature": 1}, "seed"),
    ({"top_k": 10**12, "temperature": 1}, "top_k"),
    ({"temperature": 1e9}, "temperature"),
    ({"top_p": 0}, "top_p"),
    ({"max_tokens": 10**6}, "max_tokens"),
    ({"max_draft": 65}, "max_draft"),
    ({"mode": "fast"}, "mode"),
    ({"stop": ["x"] * 9}, "stop"),
    ({"unknown_field": 1}, "unknown_field"),
]


@pytest.mark.parametrize("extra,field", BAD_HTTP, ids=[f for _, f in BAD_HTTP])
def test_bad_numbers_are_refused_naming_the_field(cluster, extra, field):
    status, body = cluster.post("/v1/completions", {"prompt": "x", "max_tokens": 4, **extra})
    assert status == 400 and field in body["error"]["message"], body


def test_non_finite_numbers_and_bad_grpc_values(cluster, greedy):
    for raw in (b'{"prompt": "x", "max_tokens": 4, "temperature": NaN}', b'{"prompt": "x", "temperature": Infinity}'):
        status, body = cluster.post("/v1/completions", None, raw=raw)
        assert status == 400 and "error" in body, body
    with cluster.client() as c:
        for kwargs in ({"seed": -5}, {"top_k": 10**9, "temperature": 1.0}, {"temperature": math.nan},
                       {"top_p": math.inf}, {"max_draft": 1000}, {"request_id": "has space"}):
            with pytest.raises(InvalidArgument):
                c.complete("x", max_tokens=4, **kwargs)
        # the lane took none of it: it serves the exact greedy output, healthy
        assert c.complete(PROMPT, max_tokens=12, ignore_eos=True, mode="sd").token_ids == greedy(12)
        assert c.health().status == "SERVING"


def test_oversized_and_malformed_requests_get_a_clear_status(cluster):
    import grpc

    with cluster.client() as c:
        with pytest.raises(ResourceExhausted, match="larger than max"):
            c.complete("x" * (2 * LIMIT_BYTES), max_tokens=2)
        with pytest.raises(InvalidArgument, match="20000"):
            c.complete("y" * 30_000, max_tokens=2)  # under the byte limit, over max_prompt_chars
    status, body = cluster.post("/v1/completions", None, raw=json.dumps({"prompt": "x" * (2 * LIMIT_BYTES)}).encode())
    assert status == 413 and "max_request_bytes" in body["error"]["message"]
    status, body = cluster.post("/v1/completions", None, raw=b'{"prompt": "\xff\xfe", "max_tokens": 2}')
    assert status == 400 and body["error"]["type"] == "invalid_request_error"
    status, body = cluster.post("/v1/completions", None, raw='{"prompt": "a\\ud800b", "max_tokens": 2}'.encode())
    assert status == 400 and "Unicode" in body["error"]["message"]
    with grpc.insecure_channel(cluster.grpc) as channel:
        call = channel.unary_stream("/tandem.v1.Tandem/Generate", request_serializer=lambda b: b,
                                    response_deserializer=lambda b: b)
        with pytest.raises(grpc.RpcError) as err:
            list(call(b"\xff\xff\xff\xff not a message", metadata=[("authorization", f"Bearer {KEYS[0]}")]))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_list_models_names_no_paths(cluster):
    with cluster.client() as c:
        (m,) = c.list_models()
    assert (m.target, m.draft) == ("tandem:tiny/target", "tandem:tiny/draft") and "/" not in m.id


def test_a_full_lane_says_its_configured_limits(cluster):
    rids = [f"fill-{i}" for i in range(14)]  # max_batch_size 6 running + max_queued 8 waiting
    with cluster.client() as c:
        threads = [threading.Thread(target=_drain, args=(c.generate(PROMPT, max_tokens=900, ignore_eos=True,
                                                                   mode="ar", request_id=r),)) for r in rids]
        for t in threads:
            t.start()
        wait_until(lambda: (lambda h: h.running + h.queued)(c.health()) == 14, 60, "a full lane")
        with pytest.raises(ResourceExhausted) as err:
            c.complete(PROMPT, max_tokens=2)
        assert "holds 14 requests" in err.value.details and "max_batch_size 6" in err.value.details
        assert "max_queued 8" in err.value.details
        for r in rids:
            c.cancel(r)
        for t in threads:
            t.join(timeout=30)
        wait_until(lambda: (lambda h: h.running + h.queued)(c.health()) == 0, 30, "the lane to empty")


# -- faults (last: they disrupt the cluster) -------------------------------------------------------
def _pids() -> dict:
    """Pids of the app's processes: router, lane (replica = verifier rank 0) and drafter."""
    from ray import serve

    topology = serve.get_deployment_handle("Lane", app_name="tandem").topology.remote().result()
    return {"lane": topology["leader_pid"], "drafter": topology["pids"][1], "router": _router_pid()}


def _router_pid() -> int:
    from ray._private.state import state

    alive = [a for a in state.actor_table(None).values()
             if "#Router#" in str(a.get("Name")) and a["State"] == "ALIVE"]
    return int(alive[0]["Pid"])


def _lane_load() -> dict:
    from ray import serve

    return serve.get_deployment_handle("Lane", app_name="tandem").load.remote().result()


def test_a_killed_drafter_costs_no_request(cluster, greedy):
    pids, want = _pids(), greedy(300)
    with cluster.client() as c, ThreadPoolExecutor(4) as pool:
        streams = [c.generate(PROMPT, max_tokens=300, ignore_eos=True, mode=m) for m in ("sd", "pearl", "sd", "ar")]
        firsts = [next(s) for s in streams]  # every request is running
        os.kill(pids["drafter"], signal.SIGKILL)
        done = list(pool.map(lambda pair: [pair[0], *pair[1]], zip(firsts, streams)))
    for chunks in done:
        assert chunks[-1].finish_reason == "length"
        assert [t for ch in chunks for t in ch.token_ids] == want  # as if nothing had happened
    wait_until(lambda: _lane_load()["drafters"][0]["lost"] == 1, 10, "the loss counted")
    with cluster.client() as c:  # a new drafter comes up and drafts again
        wait_until(lambda: c.complete(PROMPT, max_tokens=20, mode="sd").stats.drafted > 0, 90, "a new drafter")
    # (the lane's load is its core process's snapshot, at most 0.2 s old)
    wait_until(lambda: _lane_load()["drafters"] == [{"kind": "remote", "up": True, "lost": 1}], 10, "the drafter up")


def test_a_killed_router_cancels_its_requests_on_the_lane(cluster):
    pid, ended = _router_pid(), []

    def stream():
        try:
            with cluster.client() as c:
                ended.append(list(c.generate(PROMPT, max_tokens=900, ignore_eos=True, mode="ar"))[-1])
        except TandemClientError as e:
            ended.append(e)

    threads = [threading.Thread(target=stream) for _ in range(3)]
    for t in threads:
        t.start()
    wait_until(lambda: _lane_load()["running"] == 3, 30, "three requests running")
    os.kill(pid, signal.SIGKILL)
    took = wait_until(lambda: _lane_load()["running"] == 0, 10, "the lane to drop the dead router's requests")
    assert took < 3.0, took  # measured ~0.6 s; CI machines are slower
    for t in threads:
        t.join(timeout=30)
    assert len(ended) == 3 and all(isinstance(e, Unavailable) for e in ended), ended
    with cluster.client(retries=8, backoff_s=1.0) as c:  # Serve starts a new router
        assert c.health().status == "SERVING"


def test_a_killed_lane_ends_its_streams_unavailable_and_comes_back(cluster, greedy):
    with cluster.client(retries=8, backoff_s=1.0) as c:
        c.health()  # the router is up
    pid = _pids()["lane"]
    with cluster.client() as c, ThreadPoolExecutor(3) as pool:
        streams = [c.generate(PROMPT, max_tokens=900, ignore_eos=True, mode=m) for m in ("sd", "pearl", "ar")]
        for s in streams:
            next(s)
        http_stream = pool.submit(_http_stream, cluster)
        wait_until(lambda: c.health().running == 4, 30, "four requests running")
        killed = time.monotonic()
        os.kill(pid, signal.SIGKILL)
        errors = list(pool.map(_drain, streams))
        ended_after = time.monotonic() - killed
        events = http_stream.result(timeout=60)
        assert all(isinstance(e, Unavailable) for e in errors), errors
        assert ended_after < 10, ended_after
        assert "error" in events[-1] and events[-1]["error"]["code"] == 503 and "[DONE]" not in json.dumps(events)
        assert all(e.get("choices", [{}])[0].get("finish_reason") is None for e in events[:-1])
        assert c.health().status == "NOT_SERVING"  # honest while Serve replaces the lane
    with cluster.client(retries=10, backoff_s=1.0) as c:  # the SDK's retry covers new calls
        wait_until(lambda: c.health().status == "SERVING", 120, "a new lane")
        assert c.complete(PROMPT, max_tokens=10, ignore_eos=True).token_ids == greedy(10)


def _drain(stream):
    try:
        for _ in stream:
            pass
    except TandemClientError as e:
        return e
    return None


def _http_stream(cluster) -> list[dict]:
    host, port = cluster.http.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=120)
    body = {"prompt": PROMPT, "max_tokens": 900, "stream": True, "ignore_eos": True, "mode": "ar"}
    conn.request("POST", "/v1/completions", json.dumps(body),
                 {"Content-Type": "application/json", "Authorization": f"Bearer {KEYS[0]}"})
    lines = conn.getresponse().read().decode().strip().split("\n\n")
    conn.close()
    return [json.loads(x.removeprefix("data: ")) if x != "data: [DONE]" else "[DONE]" for x in lines]
