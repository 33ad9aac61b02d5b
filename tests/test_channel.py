"""The request channel between routers and lanes (tandem/cluster/channel.py), without Ray or
models: a LaneServer over a fake step loop, a router's LaneLink to it on localhost, and the
router's stream (Frontend._deltas) holding tokens for the batching interval."""
from __future__ import annotations

import asyncio
import socket
import threading
import time
from dataclasses import asdict

import pytest

from tandem.cluster.channel import HEADER, MAX_FRAME, Inbox, LaneLink, Lanes, LaneServer, frame
from tandem.errors import LaneFull, LaneUnavailable, TandemError
from tandem.params import SamplingParams, SpecParams
from tandem.spec.messages import Emission, RequestStats

SAMPLING, SPEC = asdict(SamplingParams()), asdict(SpecParams())


class FakeCore:
    """LaneCore's face to the lane's channel: a step thread that hands each submitted request
    `emissions` at (delay_s, token_ids, finish_reason) and flushes after each, as the step loop
    does; `refuse` raises from submit."""

    def __init__(self, emissions: list, refuse: Exception | None = None) -> None:
        self.emissions, self.refuse = emissions, refuse
        self.cancelled: list[str] = []
        self.flush = lambda: None  # the LaneServer's flush
        self.stopped = threading.Event()

    def submit(self, key, prompt, sampling, spec, sink) -> None:
        if self.refuse is not None:
            raise self.refuse

        def steps():
            start = time.monotonic()
            for delay, ids, finish in self.emissions:
                if self.stopped.wait(max(0.0, start + delay - time.monotonic())):
                    sink(Emission(key, [], "cancelled"))
                    self.flush()
                    return
                stats = RequestStats(generated=sum(len(x[1]) for x in self.emissions)) if finish else RequestStats()
                sink(Emission(key, ids, finish, stats))
                self.flush()

        threading.Thread(target=steps, daemon=True).start()

    def cancel(self, key: str) -> bool:
        self.cancelled.append(key)
        self.stopped.set()
        return True


def lane(core: FakeCore):
    ended = []
    server = LaneServer(core, "127.0.0.1", lambda mode, e, gaps: ended.append((mode, e.finish_reason, len(gaps))))
    core.flush = server.flush
    return server, ended


async def connect(server: LaneServer, inboxes: dict) -> LaneLink:
    host, port = server.address.split(":")
    _, link = await asyncio.get_running_loop().create_connection(
        lambda: LaneLink("L", inboxes, server.secret), host, int(port))
    return link


async def submitted(server: LaneServer, prompt: list[int] = (1,)) -> tuple[LaneLink, Inbox]:
    """A router's link to the lane, and the inbox of request "k", submitted and accepted on it."""
    inboxes = {}
    link = await connect(server, inboxes)
    inbox = inboxes["k"] = Inbox(asyncio.get_running_loop())
    await link.submit("k", list(prompt), SAMPLING, SPEC)
    return link, inbox


async def drain(inbox: Inbox) -> list[Emission]:
    got = []
    while not got or got[-1].finish_reason is None:
        got += await asyncio.wait_for(inbox.take(), 10)
    return got


def test_a_request_goes_over_the_channel_and_its_tokens_come_back_one_frame_per_step():
    core = FakeCore([(0.005 * i, [i], None) for i in range(10)] + [(0.06, [10], "length")])
    server, ended = lane(core)

    async def run():
        link, inbox = await submitted(server, [1, 2])
        got = await drain(inbox)
        return got, link.inflight

    got, inflight = asyncio.run(run())
    assert [t for e in got for t in e.token_ids] == list(range(11))
    assert got[-1].finish_reason == "length" and got[-1].stats["generated"] == 11  # stats as a dict
    assert all(e.finish_reason is None and e.stats is None for e in got[:-1])
    assert not inflight  # the finish took it off the lane's count
    deadline = time.monotonic() + 5  # (the lane counts a frame once it is sent, the router may have it first)
    while server.streamed["frames"] < 11 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert server.streamed == {"frames": 11, "tokens": 11}  # one frame per step
    assert ended == [("pearl", "length", 10)]  # SpecParams()'s mode; a gap per step after the first
    server.close()


@pytest.mark.parametrize("refusal", [LaneFull("lane is full"), LaneUnavailable("lane failed"), TandemError("bad prompt")])
def test_a_lane_that_refuses_a_request_says_why(refusal):
    server, _ = lane(FakeCore([], refuse=refusal))

    async def run():
        link = await connect(server, {})
        with pytest.raises(type(refusal), match=str(refusal)):
            await link.submit("k", [1], SAMPLING, SPEC)
        return link.inflight

    assert asyncio.run(run()) == set()
    server.close()


def test_a_submit_whose_caller_goes_away_before_the_answer_is_cancelled_on_the_lane():
    core = FakeCore([(0.01 * i, [i], None) for i in range(1000)])
    server, _ = lane(core)

    async def run():
        link = await connect(server, {})
        task = asyncio.ensure_future(link.submit("k", [1], SAMPLING, SPEC))
        await asyncio.sleep(0)  # the submit is on its way; the client disconnects before the answer
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await asyncio.sleep(0.3)
        return link.inflight

    assert asyncio.run(run()) == set()
    assert core.cancelled == ["k"]  # the lane does not run it for nobody
    server.close()


def test_a_router_that_goes_away_has_its_requests_cancelled_on_the_lane():
    core = FakeCore([(0.01 * i, [i], None) for i in range(1000)])  # never finishes on its own
    server, ended = lane(core)

    async def run():
        link, _ = await submitted(server)
        await asyncio.sleep(0.05)
        link.transport.close()  # the router's process dies
        await asyncio.sleep(0.2)

    asyncio.run(run())
    deadline = time.monotonic() + 5
    while not ended and time.monotonic() < deadline:
        time.sleep(0.01)
    assert core.cancelled == ["k"] and ended[0][:2] == ("pearl", "cancelled")
    server.close()


def test_a_lane_that_goes_away_fails_its_requests_at_the_router():
    core = FakeCore([(0.01 * i, [i], None) for i in range(1000)])
    server, _ = lane(core)

    async def run():
        link, inbox = await submitted(server)
        await asyncio.sleep(0.05)
        server.close()  # the lane's process dies
        got = await drain(inbox)
        with pytest.raises(LaneUnavailable):
            await link.submit("k2", [1], SAMPLING, SPEC)
        return got[-1]

    last = asyncio.run(run())
    assert last.finish_reason == "error" and last.lane_failed


def test_a_lane_takes_no_request_from_a_peer_without_its_secret():
    core = FakeCore([(0.0, [1], "stop")])
    server, _ = lane(core)
    host, port = server.address.split(":")
    with socket.create_connection((host, int(port)), timeout=5) as s:
        s.sendall(frame({"secret": "guess"}) + frame(["submit", "k", [1], SAMPLING, SPEC]))
        assert s.recv(10) == b""  # the lane hangs up
    assert not core.stopped.is_set() and server.links == []
    server.close()


def test_a_lane_hangs_up_on_an_oversized_frame():
    core = FakeCore([])
    server, _ = lane(core)
    host, port = server.address.split(":")
    with socket.create_connection((host, int(port)), timeout=5) as s:
        s.sendall(frame({"secret": server.secret}) + HEADER.pack(MAX_FRAME + 1))
        assert s.recv(10) == b""
    server.close()


def test_a_lane_that_shuts_down_refuses_new_requests_and_lets_running_ones_finish():
    core = FakeCore([(0.01 * i, [i], None) for i in range(30)] + [(0.3, [30], "length")])
    server, ended = lane(core)

    async def run():
        link, inbox = await submitted(server)
        drained = asyncio.get_running_loop().run_in_executor(None, server.drain, 10.0)  # Serve stops the lane
        await asyncio.sleep(0.05)
        with pytest.raises(LaneUnavailable, match="shutting down"):
            await link.submit("k2", [1], SAMPLING, SPEC)
        got = await drain(inbox)
        return got[-1].finish_reason, await drained

    assert asyncio.run(run()) == ("length", 0)  # the running request finished; nothing left held
    assert core.cancelled == []
    server.close()


class FakeHandle:
    """The Lane deployment's handle, as far as Lanes uses it: broadcast("channel")."""

    def __init__(self, servers: list[LaneServer]) -> None:
        self.servers = servers

    def broadcast(self, method: str):
        assert method == "channel"
        infos = [{"lane": f"L{i}", **s.info()} for i, s in enumerate(self.servers)]

        class Results:
            async def results_async(self, timeout_s, return_exceptions):
                return infos

        return Results()


def test_the_router_puts_each_request_on_the_lane_with_the_fewest_and_skips_tried_ones():
    servers = [lane(FakeCore([(10.0, [1], "stop")]))[0] for _ in range(2)]

    async def run():
        lanes = Lanes(FakeHandle(servers))
        await lanes.refresh()
        picks = []
        for i in range(4):
            link = await lanes.pick(set())
            await link.submit(f"k{i}", [1], SAMPLING, SPEC)
            picks.append(link.lane)
        assert (await lanes.pick({"L0"})).lane == "L1"
        with pytest.raises(LaneUnavailable):  # every lane tried: at once
            await lanes.pick({"L0", "L1"})
        return picks

    picks = asyncio.run(run())
    assert sorted(picks) == ["L0", "L0", "L1", "L1"]
    for s in servers:
        s.close()


def test_a_request_waits_for_a_lane_that_is_starting():
    server = lane(FakeCore([(0.0, [1], "stop")]))[0]
    handle = FakeHandle([])  # Serve has no lane up yet

    async def run():
        lanes = Lanes(handle)
        await lanes.refresh()
        asyncio.get_running_loop().call_later(0.5, handle.servers.append, server)  # the lane comes up
        start = time.monotonic()
        link = await lanes.pick(set())
        return link.lane, time.monotonic() - start

    lane_id, waited = asyncio.run(run())
    assert lane_id == "L0" and 0.4 < waited < 5
    server.close()


class CharTokenizer:
    def decode(self, ids, **_) -> str:
        return "".join(chr(97 + i % 26) for i in ids)


def router_stream(emissions: list, interval_s: float):
    """Frontend._deltas over an inbox fed at (delay_s, token_ids, finish_reason): each delta with
    its loop time."""
    from tandem.cluster.frontend import Admitted, Frontend

    front = Frontend.__new__(Frontend)
    front.tokenizer, front.batching_interval_s, front.inflight = CharTokenizer(), interval_s, {}
    front.lanes = Lanes(None)
    req = Admitted("r", "/r", [1], SamplingParams(), SpecParams(), [])

    async def run():
        loop = asyncio.get_running_loop()
        inbox = front.lanes.open(req.key)
        for delay, ids, finish in emissions:
            loop.call_later(delay, inbox.put, Emission(req.key, ids, finish, None))
        return [(loop.time(), d) async for d in front._deltas(req, None, inbox)]

    return asyncio.run(run())


def test_the_router_streams_the_first_token_at_once_then_batches_and_never_holds_the_finish():
    # tokens 0..9 one per 10 ms, then the finish; interval 40 ms
    out = router_stream([(0.01 * i, [i], None) for i in range(10)] + [(0.10, [10], "length")], 0.04)
    deltas = [d for _, d in out]
    assert [t for d in deltas for t in d.token_ids] == list(range(11))
    assert deltas[0].token_ids == [0]  # time to first token: never held
    assert deltas[-1].finish_reason == "length" and deltas[-1].stats["prompt_tokens"] == 1
    times = [t for t, _ in out]
    # later deltas go out at most once per interval (slack for a busy machine)...
    assert all(b - a >= 0.03 for a, b in zip(times[:-2], times[1:-1])), [round(b - a, 4) for a, b in zip(times, times[1:])]
    assert len(deltas) <= 5  # 110 ms of tokens: 0, ~40, ~80 ms, then the finish
    # ...but the finish is never held: with a 10 s interval the stream still ends at once
    start = time.monotonic()
    out = router_stream([(0.0, [1], None), (0.01, [2], None), (0.02, [3], "stop")], 10.0)
    assert time.monotonic() - start < 2.0
    assert [d.token_ids for _, d in out] == [[1], [2, 3]] and out[-1][1].finish_reason == "stop"


def test_the_router_with_interval_zero_streams_every_step():
    emissions = [(0.05 * i, [i], "length" if i == 5 else None) for i in range(6)]
    assert [d.token_ids for _, d in router_stream(emissions, 0.0)] == [[i] for i in range(6)]


def test_lanes_scale_on_the_requests_they_hold():
    pytest.importorskip("ray")
    from types import SimpleNamespace

    from ray.serve.config import AutoscalingConfig

    from tandem.cluster.app import lane_autoscaling_policy, lane_options
    from tandem.cluster.config import AppConfig

    opts = lane_options(AppConfig(autoscaling={"min_replicas": 1, "max_replicas": 4, "target_ongoing_requests": 8}))
    config = AutoscalingConfig(**opts["autoscaling_config"])  # Serve takes it, policy and all
    assert config.policy.policy_function == "tandem.cluster.app:lane_autoscaling_policy"

    def ctx(held, replicas=2):
        return SimpleNamespace(current_num_replicas=replicas, target_num_replicas=replicas, total_num_requests=0,
                               aggregated_metrics={"held_requests": dict(enumerate(held))}, config=config)

    assert lane_autoscaling_policy(ctx([16, 16]))[0] == 4  # 32 held, 8 per lane
    assert lane_autoscaling_policy(ctx([2, 0]))[0] == 0.25  # Serve rounds and bounds it (min 1)


class RecordingLink:
    """A LaneLink's side that _end_stream uses: the requests it holds, their on_end callbacks, cancels."""

    def __init__(self, key: str) -> None:
        self.inflight, self.on_end, self.cancelled = {key}, {}, []

    def cancel(self, key: str) -> None:
        self.cancelled.append(key)


def test_a_stream_closed_before_it_was_read_cancels_its_lane_request():
    from tandem.cluster.frontend import Admitted, Frontend, LaneStream

    front = Frontend.__new__(Frontend)
    front.tokenizer, front.batching_interval_s = CharTokenizer(), 0.0
    front.lanes = Lanes(None)
    req = Admitted("r", "/r", [1], SamplingParams(), SpecParams(), [])
    front.inflight = {req.key: None}
    link = RecordingLink(req.key)

    async def run():
        inbox = front.lanes.open(req.key)
        stream = LaneStream(front._deltas(req, link, inbox), lambda: front._end_stream(req, link, False))
        await stream.aclose()  # as an HTTP response whose client left before its first chunk
        await stream.aclose()  # twice is harmless
        return inbox

    asyncio.run(run())
    assert link.cancelled == [req.key]  # the lane stops generating for nobody
    assert req.key in front.inflight  # the id stays taken until the lane's own ending arrives...
    link.on_end[req.key]()
    assert req.key not in front.inflight  # ...then is free


def test_a_streamed_http_answer_closes_its_lane_stream_when_the_client_is_gone():
    from starlette.requests import ClientDisconnect

    from tandem.cluster.openai_api import LaneResponse

    class Deltas:
        closed = 0

        async def aclose(self):
            Deltas.closed += 1

    async def body():  # never started: the client is gone at the headers
        yield "data: x\n\n"

    async def send(message):
        raise OSError("client gone")

    async def receive():
        return {"type": "http.disconnect"}

    scope = {"type": "http", "asgi": {"spec_version": "2.4"}}
    with pytest.raises(ClientDisconnect):
        asyncio.run(LaneResponse(body(), Deltas(), media_type="text/event-stream")(scope, receive, send))
    assert Deltas.closed == 1
