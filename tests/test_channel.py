"""The token channel between a lane and a router (tandem/cluster/channel.py), without Ray or
models: a Lane over a fake step loop sends to a real TokenChannel on localhost, and the router's
stream (Frontend._deltas) holds tokens for the batching interval."""
from __future__ import annotations

import asyncio
import socket
import threading
import time
from dataclasses import asdict

import pytest

pytest.importorskip("ray")

from tandem.cluster.channel import TokenChannel, frame  # noqa: E402
from tandem.params import SamplingParams, SpecParams  # noqa: E402
from tandem.spec.messages import Emission, RequestStats  # noqa: E402


class FakeCore:
    """LaneCore's face to Lane.generate: a step thread that hands each submitted request
    `emissions` at (delay_s, Emission) and flushes after each, as the step loop does."""

    def __init__(self, emissions: list) -> None:
        self.emissions = emissions
        self.cancelled: list[str] = []
        self.flush = lambda: None  # Lane sets it to its senders' flush
        self.stopped = threading.Event()

    def submit(self, rid, prompt, sampling, spec, sink) -> None:
        def steps():
            start = time.monotonic()
            for delay, e in self.emissions:
                if self.stopped.wait(max(0.0, start + delay - time.monotonic())):
                    return
                sink(e)
                self.flush()

        threading.Thread(target=steps, daemon=True).start()

    def cancel(self, rid: str) -> bool:
        self.cancelled.append(rid)
        self.stopped.set()
        return True

    def stop(self) -> None:  # Lane.__del__
        self.stopped.set()


class CountedEnds:
    """What a fake lane tells its metrics: (mode, finish_reason) per ended request, and gaps."""

    def __init__(self) -> None:
        self.ended, self.gaps = [], []

    def request_finished(self, mode, finish_reason, stats) -> None:
        self.ended.append((mode, finish_reason))

    def streamed(self, mode, seconds_per_token) -> None:
        self.gaps.append(seconds_per_token)

    def stop(self) -> None:  # Lane.__del__
        pass


def fake_lane(core: FakeCore):
    """A Lane without Ray or models (cf. Ray Serve LLM's mock engines)."""
    from tandem.cluster.channel import Senders
    from tandem.cluster.lane import CallerWatch, Lane

    lane = Lane.__new__(Lane)
    lane.core, lane.lane_id = core, "fake"
    lane.senders = Senders("fake")
    core.flush = lane.senders.flush
    lane.callers = CallerWatch(core.cancel)
    lane.metrics = CountedEnds()
    return lane


def call(lane, channel: TokenChannel, rid: str = "r"):
    return lane.generate(rid, [1, 2], asdict(SamplingParams()), asdict(SpecParams()), channel.reply_to())


async def started_channel() -> TokenChannel:
    channel = TokenChannel()
    await channel.start("127.0.0.1")
    return channel


def test_a_lane_sends_the_tokens_on_the_channel_and_its_call_ends_with_the_request():
    tokens = [(0.005 * i, Emission("r", [i])) for i in range(10)]
    core = FakeCore(tokens + [(0.05, Emission("r", [10], "length", RequestStats(generated=11)))])
    lane = fake_lane(core)

    async def run():
        channel = await started_channel()
        inbox = channel.open("r")
        items = [item async for item in call(lane, channel)]
        got = []
        while not got or got[-1].finish_reason is None:
            got += await inbox.take()
        channel.stop()
        return items, got, channel.frames

    items, got, frames = asyncio.run(run())
    assert items == [{"lane": "fake"}]  # the call says "taken", then ends with the request
    assert [t for e in got for t in e.token_ids] == list(range(11))
    assert got[-1].finish_reason == "length" and got[-1].stats["generated"] == 11  # stats as a dict
    assert all(e.finish_reason is None and e.stats is None for e in got[:-1])
    assert frames == 11  # one frame per step
    assert lane.metrics.ended == [("pearl", "length")]  # SpecParams()'s mode
    assert len(lane.metrics.gaps) == 10  # a gap per step after the first


def test_a_lane_call_cancelled_by_its_caller_frees_the_slot():
    """Serve cancels generate() (the client went away, Cancel): the lane must hear of it."""
    core = FakeCore([(0.0, Emission("r", [1])), (0.01, Emission("r", [2]))])  # never finishes
    lane = fake_lane(core)

    async def run():
        channel = await started_channel()
        gen = call(lane, channel)
        first = await gen.__anext__()
        pending = asyncio.ensure_future(gen.__anext__())  # waits for the request's end
        await asyncio.sleep(0.05)
        pending.cancel()
        with pytest.raises(asyncio.CancelledError):
            await pending
        channel.stop()
        return first

    assert asyncio.run(run()) == {"lane": "fake"}
    assert core.cancelled == ["r"]
    assert lane.metrics.ended == [("pearl", "cancelled")]


def test_a_broken_channel_fails_the_lane_call_and_frees_the_slot():
    core = FakeCore([(0.0, Emission("r", [1])), (0.2, Emission("r", [2])), (0.4, Emission("r", [3], "length"))])
    lane = fake_lane(core)

    async def run():
        channel = await started_channel()
        gen = call(lane, channel)
        await gen.__anext__()
        await asyncio.sleep(0.05)
        for sender in lane.senders.by_address.values():
            sender.sock.close()  # the connection to the router breaks
        failed = await gen.__anext__()
        with pytest.raises(StopAsyncIteration):
            await gen.__anext__()
        channel.stop()
        return failed

    assert "the token channel to 127.0.0.1" in asyncio.run(run())["failed"]
    assert core.cancelled == ["r"] and lane.metrics.ended == [("pearl", "cancelled")]


def test_the_channel_takes_no_frames_from_a_peer_without_its_secret():
    async def run():
        channel = await started_channel()
        inbox = channel.open("k")
        host, port = channel.address.split(":")
        reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(frame({"secret": "guess", "lane": "x"}) + frame([["k", [1], "stop", None, False, None]]))
        await writer.drain()
        closed = await asyncio.wait_for(reader.read(), 5)  # the router hangs up
        writer.close()
        channel.stop()
        return closed, list(inbox.items), channel.frames

    closed, items, frames = asyncio.run(run())
    assert closed == b"" and items == [] and frames == 0


def test_the_channel_hangs_up_on_an_oversized_frame():
    from tandem.cluster import channel as ch

    async def run():
        channel = await started_channel()
        host, port = channel.address.split(":")
        with socket.create_connection((host, int(port))) as s:
            s.sendall(frame({"secret": channel.secret, "lane": "x"}) + ch.HEADER.pack(ch.MAX_FRAME + 1))
            s.settimeout(5)
            data = await asyncio.to_thread(s.recv, 10)
        channel.stop()
        return data

    assert asyncio.run(run()) == b""


class CharTokenizer:
    def decode(self, ids, **_) -> str:
        return "".join(chr(97 + i % 26) for i in ids)


def router_stream(emissions: list, interval_s: float):
    """Frontend._deltas over an inbox fed at (delay_s, Emission): each delta with its loop time."""
    from tandem.cluster.frontend import Admitted, Frontend

    front = Frontend.__new__(Frontend)
    front.tokenizer, front.channel, front.batching_interval_s = CharTokenizer(), TokenChannel(), interval_s
    front.inflight = {}
    req = Admitted("r", "/r", [1], SamplingParams(), SpecParams(), [])

    async def run():
        loop = asyncio.get_running_loop()
        inbox = front.channel.open(req.key)
        for delay, e in emissions:
            loop.call_later(delay, front.channel.deliver,
                            [[e.rid, e.token_ids, e.finish_reason, e.error, e.lane_failed, None]])
        return [(loop.time(), d) async for d in front._deltas(req, None, inbox)]

    return asyncio.run(run())


def test_the_router_streams_the_first_token_at_once_then_batches_and_never_holds_the_finish():
    # tokens 0..9 one per 10 ms, then the finish; interval 40 ms
    emissions = [(0.01 * i, Emission("/r", [i])) for i in range(10)] + [(0.10, Emission("/r", [10], "length"))]
    out = router_stream(emissions, 0.04)
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
    out = router_stream([(0.0, Emission("/r", [1])), (0.01, Emission("/r", [2])), (0.02, Emission("/r", [3], "stop"))], 10.0)
    assert time.monotonic() - start < 2.0
    assert [d.token_ids for _, d in out] == [[1], [2, 3]] and out[-1][1].finish_reason == "stop"


def test_the_router_with_interval_zero_streams_every_step():
    emissions = [(0.05 * i, Emission("/r", [i], "length" if i == 5 else None)) for i in range(6)]
    assert [d.token_ids for _, d in router_stream(emissions, 0.0)] == [[i] for i in range(6)]
