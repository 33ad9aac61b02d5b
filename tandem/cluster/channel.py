"""The token channel: a lane streams verified tokens to a router over a socket of their own.

A request still starts through Serve's handle (Serve picks the lane, counts the call for
autoscaling, and cancels it when the router goes away); that call answers once when the lane
has taken the request and ends when the request has. The tokens do not ride on it: each
streamed item of a Serve call is a Ray object that costs both interpreters (the lane's shares
its GIL with the step loop), so the lane sends every step's tokens, for all the requests of
one router, as one frame on one TCP connection (as vLLM's engine core sends its outputs to the
API server over one ZeroMQ socket). The router holds a request's tokens for
`lane.stream_batching_interval_ms` before streaming them to its client.

    lane -> router   hello {"secret", "lane"}, then one frame per step:
                     [[key, token_ids, finish_reason, error, lane_failed, stats | null], ...]

Frames are 4-byte big-endian lengths followed by JSON. The router listens on its node's address
and takes only connections that open with its secret, which it hands to lanes in the Serve call.
"""
from __future__ import annotations

import asyncio
import hmac
import json
import logging
import secrets
import socket
import struct
import threading
import time
from collections import deque

from tandem.spec.messages import Emission

logger = logging.getLogger(__name__)
HEADER = struct.Struct(">I")
MAX_FRAME = 64 << 20
CONNECT_TIMEOUT_S = 10.0
SEND_TIMEOUT_S = 30.0  # a router that reads nothing this long is gone: its requests fail


class ChannelBroken(ConnectionError):
    """The connection to a router failed; the requests it carried end."""


def frame(obj) -> bytes:
    body = json.dumps(obj, separators=(",", ":")).encode()
    return HEADER.pack(len(body)) + body


# -- the router's end -----------------------------------------------------------------------------
class Inbox:
    """One request's emissions, from the channel (or any thread) to the coroutine that streams it.

    put() wakes the reader only when it waits for a first emission or when the request finishes,
    not at every step; while the reader holds tokens to batch them, what arrives piles up here
    unseen until the hold ends, and a finish ends a hold at once.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.items: deque[Emission] = deque()
        self.wake = asyncio.Event()
        self.waiting = False  # the reader sleeps until the next emission
        self.finished = False  # a finish was put: later emissions are dropped

    def put(self, e: Emission) -> None:  # thread-safe: deque append, one flag
        if self.finished:
            return
        self.finished = e.finish_reason is not None
        self.items.append(e)
        if self.waiting or self.finished:
            self.waiting = False
            self.loop.call_soon_threadsafe(self.wake.set)

    async def take(self, hold_until: float = 0.0) -> list[Emission]:
        """The next emission, and every one that arrives behind it until `hold_until` (loop time);
        a finished request is never held."""
        while not self.items:  # a wake scheduled by an earlier put() can find nothing new: wait again
            self.wake.clear()
            self.waiting = True
            if not self.items:  # put() may have run before `waiting` was set
                await self.wake.wait()
            self.waiting = False
        delay = hold_until - self.loop.time()
        if delay > 0 and not self._finished():
            self.wake.clear()  # a wake scheduled before now runs after this: a finish is never missed
            if not self._finished():
                try:
                    await asyncio.wait_for(self.wake.wait(), delay)
                except asyncio.TimeoutError:
                    pass
        taken = []
        while self.items:
            taken.append(self.items.popleft())
        assert taken, "Inbox.take returned nothing"  # the loop above waits until there is something
        return taken

    def _finished(self) -> bool:
        return bool(self.items) and self.items[-1].finish_reason is not None


def merge(items: list[Emission]) -> Emission:
    """Consecutive emissions of one request as one (the last one carries finish_reason and stats)."""
    last = items[-1]
    if len(items) == 1:
        return last
    return Emission(last.rid, [t for e in items for t in e.token_ids], last.finish_reason, last.stats,
                    last.error, last.lane_failed)


class TokenChannel:
    """The router's end: a TCP server lanes connect to, and an Inbox per request it streams."""

    def __init__(self) -> None:
        self.secret = secrets.token_hex(16)
        self.address = ""  # "host:port" once started
        self.inboxes: dict[str, Inbox] = {}
        self.frames = 0  # frames received (benchmarks read it)
        self._server: asyncio.base_events.Server | None = None

    async def start(self, host: str) -> None:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(lambda: _LaneConnection(self), host, 0)
        port = self._server.sockets[0].getsockname()[1]
        self.address = f"{host}:{port}"

    def reply_to(self) -> dict:
        """What a lane needs to send a request's tokens here (passed in the Serve call)."""
        return {"address": self.address, "secret": self.secret}

    def open(self, key: str) -> Inbox:
        inbox = self.inboxes[key] = Inbox(asyncio.get_running_loop())
        return inbox

    def close(self, key: str) -> None:
        self.inboxes.pop(key, None)

    def deliver(self, items: list) -> None:
        self.frames += 1
        for key, ids, finish_reason, error, lane_failed, stats in items:
            inbox = self.inboxes.get(key)
            if inbox is not None:  # gone: the router ended the request (stop string, Cancel)
                inbox.put(Emission(key, ids, finish_reason, stats, error, lane_failed))

    def stop(self) -> None:
        if self._server is not None:
            self._server.close()


class _LaneConnection(asyncio.Protocol):
    """One lane's connection: a hello with the secret, then frames of emissions."""

    def __init__(self, channel: TokenChannel) -> None:
        self.channel = channel
        self.buffer = bytearray()
        self.lane = None  # the lane's id once its hello checked out
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while len(self.buffer) >= HEADER.size:
            (size,) = HEADER.unpack_from(self.buffer)
            if size > MAX_FRAME:
                return self._refuse(f"a frame of {size} bytes")
            if len(self.buffer) < HEADER.size + size:
                return
            body = bytes(self.buffer[HEADER.size:HEADER.size + size])
            del self.buffer[:HEADER.size + size]
            try:
                message = json.loads(body)
            except ValueError:
                return self._refuse("a frame that is not JSON")
            if self.lane is None:
                if not (isinstance(message, dict) and hmac.compare_digest(str(message.get("secret", "")), self.channel.secret)):
                    return self._refuse("a hello without this router's secret")
                self.lane = str(message.get("lane", "?"))
                logger.info("lane %s connected its token channel", self.lane)
                continue
            self.channel.deliver(message)

    def _refuse(self, what: str) -> None:
        peer = self.transport.get_extra_info("peername") if self.transport else None
        logger.warning("token channel: closing the connection from %s: %s", peer, what)
        self.buffer.clear()
        if self.transport is not None:
            self.transport.close()

    def connection_lost(self, exc) -> None:
        if self.lane is not None:
            logger.info("lane %s closed its token channel%s", self.lane, f": {exc!r}" if exc else "")


# -- the lane's end -------------------------------------------------------------------------------
class Ticket:
    """One request on a ChannelSender: its sink for the step loop, and when it ended.

    `gaps` holds the time between the steps that gave the request tokens, per token (the lane's
    inter-token latency; the lane turns it into metrics when the request ends).
    """

    def __init__(self, sender: ChannelSender, rid: str, loop: asyncio.AbstractEventLoop) -> None:
        self.sender, self.rid, self.loop = sender, rid, loop
        self.done = loop.create_future()  # the final emission, once sent; or ChannelBroken
        self.gaps: list[float] = []
        self.tokens = 0
        self._last: float | None = None

    def put(self, e: Emission) -> None:  # the step loop's sink
        if e.token_ids:
            now = time.perf_counter()
            if self._last is not None:
                self.gaps.append((now - self._last) / len(e.token_ids))
            self._last = now
            self.tokens += len(e.token_ids)
        self.sender.put(self, e)

    def _end(self, result: Emission | BaseException) -> None:  # any thread
        self.loop.call_soon_threadsafe(_settle, self.done, result)


def _settle(future: asyncio.Future, result) -> None:
    if future.done():
        return
    if isinstance(result, BaseException):
        future.set_exception(result)
    else:
        future.set_result(result)


class ChannelSender:
    """The lane's connection to one router: the step loop's emissions for that router's requests,
    gathered and sent as one frame when the step is over (flush)."""

    def __init__(self, address: str, secret: str, lane_id: str) -> None:
        self.address = address
        host, _, port = address.rpartition(":")
        self.sock = socket.create_connection((host, int(port)), timeout=CONNECT_TIMEOUT_S)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock.settimeout(SEND_TIMEOUT_S)
        self.sock.sendall(frame({"secret": secret, "lane": lane_id}))
        self.lock = threading.Lock()
        self.pending: list[tuple[Ticket, Emission]] = []
        self.tickets: set[Ticket] = set()
        self.broken: BaseException | None = None

    def open(self, rid: str, loop: asyncio.AbstractEventLoop) -> Ticket:
        ticket = Ticket(self, rid, loop)
        with self.lock:
            if self.broken is not None:
                raise ChannelBroken(f"the token channel to {self.address} failed: {self.broken!r}")
            self.tickets.add(ticket)
        return ticket

    def forget(self, ticket: Ticket) -> None:
        with self.lock:
            self.tickets.discard(ticket)

    def put(self, ticket: Ticket, e: Emission) -> None:
        with self.lock:
            self.pending.append((ticket, e))

    def flush(self) -> int:
        """Send what the step gave; end the tickets whose final emission went out. Returns the
        tokens sent."""
        with self.lock:
            batch, self.pending = self.pending, []
            if not batch or self.broken is not None:
                return 0
            rows = [[e.rid, e.token_ids, e.finish_reason, e.error, e.lane_failed,
                     e.stats.as_dict() if e.finish_reason is not None and e.stats is not None else None]
                    for _, e in batch]
            try:
                self.sock.sendall(frame(rows))
            except OSError as err:
                self._break(err)
                return 0
            for ticket, e in batch:
                if e.finish_reason is not None:
                    self.tickets.discard(ticket)
                    ticket._end(e)
            return sum(len(e.token_ids) for _, e in batch)

    def _break(self, err: BaseException, quiet: bool = False) -> None:  # with self.lock held
        if not quiet:
            logger.error("token channel to router %s failed (%r): ending its %d requests", self.address, err, len(self.tickets))
        self.broken = err
        tickets, self.tickets = self.tickets, set()
        for ticket in tickets:
            ticket._end(ChannelBroken(f"the token channel to {self.address} failed: {err!r}"))
        try:
            self.sock.close()
        except OSError:
            pass

    def close(self) -> None:
        with self.lock:
            if self.broken is None:
                self._break(ChannelBroken("the lane stopped"), quiet=True)


class Senders:
    """A lane's ChannelSenders, one per router address, connected on a router's first request."""

    def __init__(self, lane_id: str) -> None:
        self.lane_id = lane_id
        self.by_address: dict[str, ChannelSender] = {}
        self._connecting: dict[str, asyncio.Future] = {}
        self.streamed = {"frames": 0, "tokens": 0}  # since the lane's reset_timing()

    async def get(self, reply_to: dict) -> ChannelSender:
        address = reply_to["address"]
        sender = self.by_address.get(address)
        if sender is not None and sender.broken is None:
            return sender
        pending = self._connecting.get(address)
        if pending is None:  # one connect per address, however many requests wait for it
            pending = self._connecting[address] = asyncio.ensure_future(
                asyncio.to_thread(ChannelSender, address, reply_to["secret"], self.lane_id))
        try:
            sender = await asyncio.shield(pending)
        finally:
            if pending.done():
                self._connecting.pop(address, None)
        self.by_address[address] = sender
        return sender

    def flush(self) -> None:  # the step loop's thread, after each step
        for address, sender in list(self.by_address.items()):
            tokens = sender.flush()
            if tokens:
                self.streamed["frames"] += 1
                self.streamed["tokens"] += tokens
            if sender.broken is not None and self.by_address.get(address) is sender:
                self.by_address.pop(address, None)

    def close(self) -> None:
        for sender in list(self.by_address.values()):
            sender.close()

