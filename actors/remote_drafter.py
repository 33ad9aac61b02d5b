"""A drafter in another process, reached over torch.distributed (DESIGN §2: per-step traffic
goes over a process group, never through Ray calls). The messages are small pickled structs, so
the exchange group is gloo even on GPUs (actors/lane_roles.py says why).

The lane's leader holds a `RemoteDrafter` with the Drafter's interface; the drafter process runs
`serve_drafter`. `submit` sends the step's draft requests and returns at once, so the verifier's
forward runs while the drafter drafts (PEARL); `result` receives the chunks. The verdicts of a
step (`update`) travel with the next step's draft requests: one message each way per step.
"""
from __future__ import annotations

import time

import torch.distributed as dist

from actors.drafter import Drafter, DraftFuture
from actors.messages import DraftChunk, DraftItem, DraftRound


class RemoteDrafter:
    def __init__(self, peer: int, max_context: int, max_slots: int, group=None) -> None:
        self.peer = peer  # the drafter's global rank
        self.group = group  # the leader <-> drafter exchange group
        self.max_context = max_context
        self._free = list(range(max_slots - 1, -1, -1))  # slot ids mirrored on the drafter
        self._rounds: list[DraftRound] = []  # verdicts not sent yet, and the last step's time
        self._step_s: float | None = None

    @property
    def free_slots(self) -> int:
        return len(self._free)

    def _send(self, op: str, *args) -> None:
        dist.send_object_list([(op, args)], dst=self.peer, group=self.group)

    def _recv(self):
        box = [None]
        dist.recv_object_list(box, src=self.peer, group=self.group)
        return box[0]

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

    def submit(self, items: list[DraftItem]) -> RemoteDraftFuture | DraftFuture:
        if all(it.max_len == 0 for it in items):  # nothing to draft (AR): skip the round trip
            return DraftFuture([DraftChunk([], None) for _ in items], 0.0)
        self._send("propose", items, self._rounds, self._step_s)
        self._rounds, self._step_s = [], None
        return RemoteDraftFuture(self)

    def stop(self) -> None:
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


def serve_drafter(drafter: Drafter, leader: int, group=None) -> None:
    """Drafter process: execute the leader's requests until it says stop."""
    while True:
        box = [None]
        dist.recv_object_list(box, src=leader, group=group)
        op, args = box[0]
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
            dist.send_object_list([(chunks, time.perf_counter() - start)], dst=leader, group=group)
        else:
            raise AssertionError(f"unknown drafter op {op!r}")
