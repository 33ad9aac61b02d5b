"""A drafter in another process, reached over torch.distributed (docs/design.md §2: per-step traffic
goes over a process group, never through Ray calls). The messages are small pickled structs, so
the exchange is gloo even on GPUs: it works wherever the drafter sits, also on a GPU it shares
with verifier rank 0, where NCCL refuses two ranks on one device.

Each drafter and the leader form a group of their own (`connect`: a TCPStore the leader hosts and
a two-rank gloo group), outside the tensor-parallel world, so a drafter that dies can be replaced
by a new process without the rest of the lane (tandem/actors/resilient.py). The lane's leader
holds a `RemoteDrafter` with the Drafter's interface; the drafter process runs `serve_drafter`.
`submit` sends the step's draft requests and returns at once, so the verifier's forward runs while
the drafter drafts (PEARL); `result` receives the chunks. The verdicts of a step (`update`)
travel with the next step's draft requests: one message each way per step.
"""
from __future__ import annotations

import pickle
import time
from datetime import timedelta

import torch
import torch.distributed as dist

from tandem.actors.drafter import LocalDrafter
from tandem.spec.drafting import DraftFuture
from tandem.spec.messages import DraftChunk, DraftItem, DraftRound


class Channel:
    """Pickled messages to one peer over a gloo group, in one fixed-size buffer.

    `send_object_list` sends a length, then the bytes, and copies both through fresh tensors:
    two messages per direction. Here a message is one send of CAP bytes (its length, then as much
    of the pickle as fits), with a second send only for what does not fit (sampled drafts' q
    rows). On the 2-core CPU machine a propose/chunk round trip takes 2.2-2.4 ms with
    send_object_list and 0.6-0.9 ms this way, about a bare tensor's (`benchmarks/exchange.py`).
    """

    CAP = 4096
    HEAD = 8  # little-endian payload length

    def __init__(self, group: dist.ProcessGroup, peer: int, store=None) -> None:
        self.group, self.peer = group, peer  # the pair's group and the other side's rank in it
        self._store = store  # the group's rendezvous store, kept alive with it
        self._out = torch.zeros(self.CAP, dtype=torch.uint8)
        self._in = torch.zeros(self.CAP, dtype=torch.uint8)

    def send(self, obj) -> None:
        data = pickle.dumps(obj)
        fits = self.CAP - self.HEAD
        head = len(data).to_bytes(self.HEAD, "little") + data[:fits]
        self._out[: len(head)] = torch.frombuffer(bytearray(head), dtype=torch.uint8)
        self.group.send([self._out], self.peer, 0).wait()
        if len(data) > fits:
            self.group.send([torch.frombuffer(bytearray(data[fits:]), dtype=torch.uint8)], self.peer, 0).wait()

    def recv(self):
        self.group.recv([self._in], self.peer, 0).wait()
        raw = self._in.numpy().tobytes()
        n = int.from_bytes(raw[: self.HEAD], "little")
        fits = self.CAP - self.HEAD
        data = raw[self.HEAD : self.HEAD + min(n, fits)]
        if n > fits:
            rest = torch.empty(n - fits, dtype=torch.uint8)
            self.group.recv([rest], self.peer, 0).wait()
            data += rest.numpy().tobytes()
        return pickle.loads(data)


# A peer that died is noticed at once (its socket closes); a peer that hangs, after this long.
EXCHANGE_TIMEOUT_S = 60.0


def connect(address: str, leader: bool, timeout_s: float = EXCHANGE_TIMEOUT_S) -> Channel:
    """The leader's (rank 0, hosting the store at address "host:port") or a drafter's (rank 1)
    side of a drafter exchange; returns once both sides have joined."""
    host, port = address.rsplit(":", 1)
    timeout = timedelta(seconds=timeout_s)
    store = dist.TCPStore(host, int(port), 2, leader, timeout=timeout)
    group = dist.ProcessGroupGloo(store, 0 if leader else 1, 2, timeout)
    return Channel(group, 1 if leader else 0, store)


class RemoteDrafter:
    def __init__(self, channel: Channel, max_slots: int) -> None:
        self.channel = channel  # the leader <-> drafter exchange
        self.max_context = channel.recv()  # the drafter's first message: its context length
        self._free = list(range(max_slots - 1, -1, -1))  # slot ids mirrored on the drafter
        self._rounds: list[DraftRound] = []  # verdicts not sent yet, and the last step's time
        self._step_s: float | None = None

    @property
    def free_slots(self) -> int:
        return len(self._free)

    def _send(self, op: str, *args) -> None:
        self.channel.send((op, args))

    def _recv(self):
        return self.channel.recv()

    def start(self, rid: str, seed: int) -> int:
        slot = self._free.pop()
        self._send("start", rid, seed, slot)
        return slot

    def finish(self, rid: str, slot: int) -> None:
        self._free.append(slot)
        self._send("finish", rid, slot)

    def update(self, rounds: list[DraftRound], step_s: float | None = None) -> None:
        """Held until the next propose (a finished request's rounds are ignored there)."""
        if rounds:
            self._rounds += rounds
            self._step_s = step_s

    def submit(self, items: list[DraftItem], overlap: bool = False) -> RemoteDraftFuture | DraftFuture:
        """Returns at once: the drafter drafts in its own process (overlap changes nothing)."""
        if all(it.max_len == 0 for it in items):  # nothing to draft (AR): skip the round trip
            return DraftFuture([DraftChunk([], None) for _ in items], 0.0)
        self._send("propose", items, self._rounds, self._step_s)
        self._rounds, self._step_s = [], None
        return RemoteDraftFuture(self)

    def close(self) -> None:
        """Release the drafter process (it returns from serve_drafter)."""
        self._send("stop")


class RemoteDraftFuture:
    concurrent = True  # the drafter process drafts while the leader verifies

    def __init__(self, drafter: RemoteDrafter) -> None:
        self._drafter = drafter
        self._chunks: list[DraftChunk] | None = None
        self.seconds = 0.0  # the drafter's compute time, as it measured it

    def result(self) -> list[DraftChunk]:
        if self._chunks is None:
            self._chunks, self.seconds = self._drafter._recv()
        return self._chunks


def serve_drafter(drafter: LocalDrafter, channel: Channel) -> None:
    """Drafter process: say its context length, then execute the leader's requests until it says stop."""
    channel.send(drafter.max_context)
    while True:
        op, args = channel.recv()
        if op == "stop":
            return
        if op == "start":
            rid, seed, slot = args
            drafter.start(rid, seed, slot)
        elif op == "finish":
            drafter.finish(*args)
        elif op == "propose":
            items, rounds, step_s = args
            if rounds:
                drafter.update(rounds, step_s)
            start = time.perf_counter()
            chunks = drafter.propose(items)
            channel.send((chunks, time.perf_counter() - start))
        else:
            raise AssertionError(f"unknown drafter op {op!r}")
