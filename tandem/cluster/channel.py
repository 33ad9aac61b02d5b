"""The request channel: routers and lanes talk over sockets of their own, not Serve calls.

A Serve handle call costs both interpreters several milliseconds (routing, an actor task, a Ray
object per streamed item), and the lane's interpreter is the one its step loop runs in. So, as
vLLM's API server talks to its engine core over one ZeroMQ socket, each lane listens on its
node's address and each router keeps one TCP connection to each lane:

    router -> lane   hello {"secret"}, then ["submit", key, prompt, sampling, spec] | ["cancel", key]
    lane -> router   ["accepted", key] | ["refused", key, kind, message]
                     | ["emit", [[key, token_ids, finish_reason, error, lane_failed, stats | null], ...]]
                       one frame per step, for all of that router's requests on the lane

Frames are 4-byte big-endian lengths followed by JSON. The lane's side runs in plain threads (a
reader per router, and the step loop's flush), so no request touches the replica's event loop.
A router learns the lanes' addresses and secrets through Serve (`Lane.channel`, broadcast to
every replica), so Serve still places, restarts and scales the lanes; the router picks the
lane for each request (the one with the fewest of its requests). A lane whose router's
connection drops cancels that router's requests; a router whose lane's connection drops ends
that lane's requests as failed (UNAVAILABLE: the client may retry).
"""
from __future__ import annotations

import asyncio
import hmac
import json
import logging
import random
import secrets
import socket
import struct
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator

from tandem.errors import LaneFull, LaneUnavailable, RequestFailed, TandemError
from tandem.params import SamplingParams, SpecParams
from tandem.spec.messages import Emission

logger = logging.getLogger(__name__)
HEADER = struct.Struct(">I")
MAX_FRAME = 64 << 20
HELLO_TIMEOUT_S = 10.0
SEND_TIMEOUT_S = 10  # a send that moves nothing this long: the router is gone, its requests are
# cancelled (the step loop sends, so a router that stops reading holds up the lane this long)
REFRESH_S = 2.0  # how often a router asks Serve which lanes there are
LANE_WAIT_S = 60.0  # how long a request waits for a first lane to come up
ANSWER_TIMEOUT_S = 30.0  # a lane that neither accepts nor refuses a submit this long is taken for gone
MAX_HELLO = 4096


def keepalive(sock: socket.socket) -> None:
    """Notice a peer whose machine vanished (no FIN) within about 30 s, not TCP's default hours."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for name, value in (("TCP_KEEPIDLE", 10), ("TCP_KEEPINTVL", 5), ("TCP_KEEPCNT", 4)):
        if hasattr(socket, name):
            sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, name), value)


def frame(obj) -> bytes:
    body = json.dumps(obj, separators=(",", ":")).encode()
    return HEADER.pack(len(body)) + body


class Frames:
    """Splits a byte stream into decoded frames; raises ValueError on an oversized or bad one."""

    def __init__(self) -> None:
        self.buffer = bytearray()

    def feed(self, data: bytes) -> Iterator:
        self.buffer += data
        while len(self.buffer) >= HEADER.size:
            (size,) = HEADER.unpack_from(self.buffer)
            if size > MAX_FRAME:
                raise ValueError(f"a frame of {size} bytes")
            if len(self.buffer) < HEADER.size + size:
                return
            body = bytes(self.buffer[HEADER.size:HEADER.size + size])
            del self.buffer[:HEADER.size + size]
            yield json.loads(body)


# -- errors on the wire ---------------------------------------------------------------------------
def refusal_kind(e: BaseException) -> str:
    if isinstance(e, LaneFull):
        return "full"
    if isinstance(e, LaneUnavailable):
        return "unavailable"
    if isinstance(e, TandemError):
        return "invalid"
    return "error"


def refusal_error(kind: str, message: str) -> Exception:
    return {"full": LaneFull, "unavailable": LaneUnavailable, "invalid": TandemError}.get(kind, RequestFailed)(message)


# -- the lane's end -------------------------------------------------------------------------------
class Ticket:
    """One request from one router: the step loop's sink for it, and its inter-token gaps (the
    time between the steps that gave it tokens, per token) for the lane's metrics."""

    def __init__(self, link: RouterLink, key: str, mode: str) -> None:
        self.link, self.key, self.mode = link, key, mode
        self.gaps: list[float] = []
        self._last: float | None = None

    def put(self, e: Emission) -> None:  # the step loop's thread (or the lane's, on admission)
        if e.token_ids:
            now = time.perf_counter()
            if self._last is not None:
                self.gaps.append((now - self._last) / len(e.token_ids))
            self._last = now
        self.link.put(self, e)


Ended = Callable[[str, Emission, list], None]  # (mode, final emission, gaps): the lane's metrics


class RouterLink:
    """The lane's connection to one router: a reader thread that submits and cancels, and the
    step loop's emissions for that router, sent as one frame per step (flush)."""

    def __init__(self, sock: socket.socket, core, ended: Ended, frames: Frames, draining: threading.Event) -> None:
        self.sock, self.core, self.ended, self.frames = sock, core, ended, frames
        self.draining = draining  # set: the lane is shutting down and takes no new request
        self.peer = sock.getpeername()
        # Two locks: `lock` (pending, tickets) is never held during I/O, because the step loop
        # takes it in Ticket.put while it holds the lane's lock; `send_lock` orders whole frames.
        self.lock = threading.Lock()
        self.send_lock = threading.Lock()
        self.pending: list[tuple[Ticket, Emission]] = []
        self.tickets: dict[str, Ticket] = {}
        self.closed = False

    @property
    def spent(self) -> bool:
        """Closed, and every request it carried has ended: the server may forget it."""
        return self.closed and not self.tickets

    def start(self) -> None:
        threading.Thread(target=self._read, name="lane-router-link", daemon=True).start()

    def _read(self) -> None:
        data = b""  # first what came in behind the hello
        try:
            while True:
                for msg in self.frames.feed(data):
                    if msg[0] == "submit":
                        self._submit(*msg[1:])
                    elif msg[0] == "cancel":
                        self.core.cancel(msg[1])
                data = self.sock.recv(1 << 16)
                if not data:
                    break
        except Exception as e:  # the connection failed, or the router sent what this lane cannot read
            if not self.closed:
                logger.warning("router %s: its connection failed: %r", self.peer, e)
        self.close()

    def _submit(self, key: str, prompt: list[int], sampling: dict, spec: dict) -> None:
        try:
            if self.draining.is_set():
                raise LaneUnavailable("this lane is shutting down")
            params = SamplingParams(**sampling), SpecParams(**spec)
            ticket = Ticket(self, key, params[1].mode)
            with self.lock:
                if key in self.tickets:
                    raise TandemError(f"request id {key!r} is already running")
                self.tickets[key] = ticket
            try:
                self.core.submit(key, prompt, *params, ticket.put)
            except BaseException:
                with self.lock:
                    self.tickets.pop(key, None)
                raise
        except Exception as e:  # bad input, a full or failed lane: the router says so to its client
            self._send(frame(["refused", key, refusal_kind(e), str(e)]))
            return
        self._send(frame(["accepted", key]))

    def _send(self, data: bytes) -> bool:
        with self.send_lock:
            if self.closed:
                return False
            try:
                self.sock.sendall(data)
                return True
            except OSError as e:
                logger.warning("router %s: sending failed (%r); cancelling its %d requests", self.peer, e, len(self.tickets))
                self._shut()
        self._cancel_if_closed()
        return False

    def put(self, ticket: Ticket, e: Emission) -> None:
        with self.lock:
            self.pending.append((ticket, e))

    def flush(self) -> int:
        """Send what the step gave this router as one frame; the tokens sent."""
        with self.lock:
            batch, self.pending = self.pending, []
        if not batch:
            return 0
        rows = [[e.rid, e.token_ids, e.finish_reason, e.error, e.lane_failed,
                 e.stats.as_dict() if e.finish_reason is not None and e.stats is not None else None]
                for _, e in batch]
        sent = self._send(frame(["emit", rows]))
        finished = [(t, e) for t, e in batch if e.finish_reason is not None]
        with self.lock:  # held until its ending went out: a draining lane waits for that
            for ticket, _ in finished:
                if self.tickets.get(ticket.key) is ticket:
                    del self.tickets[ticket.key]
        for ticket, e in finished:
            self.ended(ticket.mode, e, ticket.gaps)
        self._cancel_if_closed()
        return sum(len(e.token_ids) for _, e in batch) if sent else 0

    def _shut(self) -> None:
        if not self.closed:
            self.closed = True
            try:
                self.sock.shutdown(socket.SHUT_RDWR)  # wakes the reader's recv; close() alone would not
            except OSError:
                pass
            self.sock.close()

    def _cancel_if_closed(self) -> None:
        """The router is gone, so are its requests. Called without either lock: the step loop
        holds the lane's lock when it hands an emission to a ticket, which takes self.lock."""
        if self.closed:
            for key in list(self.tickets):
                self.core.cancel(key)  # their "cancelled" endings reach flush, which sends nothing more

    def close(self) -> None:
        self._shut()
        self._cancel_if_closed()


class LaneServer:
    """A lane's end of the request channel: it listens on `host`, and each router that opens with
    its secret gets a RouterLink."""

    def __init__(self, core, host: str, ended: Ended) -> None:
        self.core, self.ended = core, ended
        self.secret = secrets.token_hex(16)
        self.listener = socket.create_server((host, 0))
        self.address = f"{host}:{self.listener.getsockname()[1]}"
        self.links: list[RouterLink] = []  # replaced, never changed in place, under _links_lock
        self._links_lock = threading.Lock()
        self.streamed = {"frames": 0, "tokens": 0}  # since the lane's reset_timing()
        self._stopped = False
        self.draining = threading.Event()
        threading.Thread(target=self._accept, name="lane-channel", daemon=True).start()

    def _accept(self) -> None:
        while not self._stopped:
            try:
                sock, _ = self.listener.accept()
            except OSError:
                return
            if self._stopped:
                sock.close()
                return
            threading.Thread(target=self._hello, args=(sock,), daemon=True).start()

    def _hello(self, sock: socket.socket) -> None:
        try:
            sock.settimeout(HELLO_TIMEOUT_S)
            frames, hello, deadline = Frames(), None, time.monotonic() + HELLO_TIMEOUT_S
            while hello is None:
                data = sock.recv(4096)
                if not data:
                    raise OSError("closed before its hello")
                if len(frames.buffer) + len(data) > MAX_HELLO or time.monotonic() > deadline:
                    raise PermissionError("no hello within its size and time")
                hello = next(frames.feed(data), None)
            if not (isinstance(hello, dict) and hmac.compare_digest(str(hello.get("secret", "")), self.secret)):
                raise PermissionError("a hello without this lane's secret")
            sock.settimeout(None)  # reads block; sends give up after SEND_TIMEOUT_S
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, struct.pack("ll", SEND_TIMEOUT_S, 0))
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            keepalive(sock)
        except Exception as e:  # a peer without the secret, or one that sends nonsense
            logger.warning("lane channel: refusing a connection: %r", e)
            sock.close()
            return
        link = RouterLink(sock, self.core, self.ended, frames, self.draining)
        with self._links_lock:
            self.links = [old for old in self.links if not old.spent] + [link]
        link.start()  # once flush sees it: a request's first tokens go out with its first step

    def info(self) -> dict:
        return {"address": self.address, "secret": self.secret}

    def flush(self) -> None:  # the step loop's thread, after each step
        links = self.links
        for link in links:
            tokens = link.flush()
            if tokens:
                self.streamed["frames"] += 1
                self.streamed["tokens"] += tokens
        if any(link.spent for link in links):
            with self._links_lock:
                self.links = [link for link in self.links if not link.spent]

    def held(self) -> int:
        """Requests the routers have here, running or queued."""
        return sum(len(link.tickets) for link in self.links)

    def drain(self, timeout_s: float) -> int:
        """Take no new request; wait up to `timeout_s` for the held ones to end. Returns how many
        are still held."""
        self.draining.set()
        deadline = time.monotonic() + timeout_s
        while self.held() and time.monotonic() < deadline:
            time.sleep(0.05)
        return self.held()

    def close(self) -> None:
        self._stopped = True
        try:
            self.listener.shutdown(socket.SHUT_RDWR)  # wakes the accept; close() alone would not
        except OSError:
            pass
        self.listener.close()
        for link in self.links:
            link.close()


# -- the router's end -----------------------------------------------------------------------------
class Inbox:
    """One request's emissions, from its lane's connection to the coroutine that streams it.

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


class LaneLink(asyncio.Protocol):
    """The router's connection to one lane: submits and cancels go out, answers and tokens come in."""

    def __init__(self, lane: str, inboxes: dict[str, Inbox], secret: str) -> None:
        self.lane, self.inboxes, self.secret = lane, inboxes, secret
        self.frames = Frames()
        self.inflight: set[str] = set()  # this router's requests on the lane
        self.answers: dict[str, asyncio.Future] = {}  # submitted, not yet accepted or refused
        self.on_end: dict[str, Callable[[], None]] = {}  # called when the lane's ending of a request arrives
        self.transport: asyncio.Transport | None = None
        self.closed = False

    def connection_made(self, transport) -> None:
        self.transport = transport
        sock = transport.get_extra_info("socket")
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        keepalive(sock)
        transport.write(frame({"secret": self.secret}))

    async def submit(self, key: str, prompt: list[int], sampling: dict, spec: dict) -> None:
        """Queue the request on the lane; raises as the lane refuses it (full, failed, bad input)."""
        if self.closed:
            raise LaneUnavailable(f"lane {self.lane} is gone")
        answer = self.answers[key] = asyncio.get_running_loop().create_future()
        self.inflight.add(key)
        self.transport.write(frame(["submit", key, prompt, sampling, spec]))
        try:
            await asyncio.wait_for(answer, ANSWER_TIMEOUT_S)
        except (LaneFull, LaneUnavailable, TandemError, RequestFailed):  # refused: nothing runs there
            self.inflight.discard(key)
            raise
        except BaseException as e:  # the caller went away, or the lane is silent: it may run there
            self.cancel(key)
            self.inflight.discard(key)
            if isinstance(e, asyncio.TimeoutError):
                raise LaneUnavailable(f"lane {self.lane} did not answer in {ANSWER_TIMEOUT_S:g} s") from None
            raise
        finally:
            self.answers.pop(key, None)

    def cancel(self, key: str) -> None:
        if key in self.inflight and not self.closed:
            self.transport.write(frame(["cancel", key]))

    def data_received(self, data: bytes) -> None:
        try:
            for msg in self.frames.feed(data):
                kind = msg[0]
                if kind == "emit":
                    self._emit(msg[1])
                elif kind == "accepted":
                    self._answer(msg[1], None)
                elif kind == "refused":
                    self._answer(msg[1], refusal_error(msg[2], msg[3]))
        except (ValueError, TypeError, IndexError) as e:
            logger.error("lane %s sent what this router cannot read (%r): dropping its connection", self.lane, e)
            self.transport.close()

    def _answer(self, key: str, error: Exception | None) -> None:
        answer = self.answers.get(key)
        if answer is None or answer.done():
            return
        if error is None:
            answer.set_result(None)
        else:
            answer.set_exception(error)

    def _emit(self, rows: list) -> None:
        for key, ids, finish_reason, error, lane_failed, stats in rows:
            self._answer(key, None)  # tokens before the lane's "accepted": it was
            if finish_reason is not None:
                self.inflight.discard(key)
                done = self.on_end.pop(key, None)
                if done is not None:
                    done()
            inbox = self.inboxes.get(key)
            if inbox is not None:  # gone: the router ended the request (stop string, Cancel)
                inbox.put(Emission(key, ids, finish_reason, stats, error, lane_failed))

    def connection_lost(self, exc) -> None:
        self.closed = True
        if self.inflight:
            logger.error("lane %s: its connection was lost (%r); failing its %d requests", self.lane, exc, len(self.inflight))
        for key, answer in list(self.answers.items()):
            if not answer.done():
                answer.set_exception(LaneUnavailable(f"lane {self.lane} is gone"))
        for key in self.inflight:
            inbox = self.inboxes.get(key)
            if inbox is not None:
                inbox.put(Emission(key, [], "error", None, error=f"lane {self.lane}'s connection was lost", lane_failed=True))
        self.inflight = set()
        for done in self.on_end.values():
            done()
        self.on_end = {}


class Lanes:
    """A router's links to every lane Serve runs, refreshed every REFRESH_S; it picks each
    request's lane."""

    def __init__(self, handle) -> None:
        self.handle = handle  # the Lane deployment's handle
        self.links: dict[str, LaneLink] = {}  # by lane id
        self.inboxes: dict[str, Inbox] = {}  # by request key
        self._refreshing: asyncio.Task | None = None
        self._loop_task: asyncio.Task | None = None

    async def start(self) -> None:
        await self.refresh()
        self._loop_task = asyncio.get_running_loop().create_task(self._refresh_forever())

    async def _refresh_forever(self) -> None:
        while True:
            await asyncio.sleep(REFRESH_S)
            try:
                await self.refresh()
            except Exception:
                logger.exception("refreshing the lanes failed")

    async def refresh(self) -> None:
        """Connect to the lanes that are new (or whose connection was lost); one refresh at a time."""
        if self._refreshing is None or self._refreshing.done():
            self._refreshing = asyncio.get_running_loop().create_task(self._refresh())
        await asyncio.shield(self._refreshing)

    async def _refresh(self) -> None:
        from ray.serve.exceptions import DeploymentUnavailableError

        try:
            infos = await self.handle.broadcast("channel").results_async(timeout_s=10, return_exceptions=True)
        except (DeploymentUnavailableError, TimeoutError):
            return
        loop = asyncio.get_running_loop()
        for info in infos:
            if not isinstance(info, dict):
                continue
            link = self.links.get(info["lane"])
            if link is not None and not link.closed:
                continue
            host, _, port = info["address"].rpartition(":")
            try:
                _, link = await loop.create_connection(lambda: LaneLink(info["lane"], self.inboxes, info["secret"]), host, int(port))
            except OSError as e:
                logger.warning("lane %s at %s: cannot connect: %r", info["lane"], info["address"], e)
                continue
            self.links[info["lane"]] = link
            logger.info("connected to lane %s at %s", info["lane"], info["address"])
        for lane, link in list(self.links.items()):
            if link.closed:
                del self.links[lane]

    async def pick(self, tried: set[str]) -> LaneLink:
        """The open lane, not tried yet, with the fewest of this router's requests (ties: random).
        While no lane is up at all (starting, or being replaced), wait for one up to LANE_WAIT_S,
        as a Serve handle holds its calls until a replica is up."""
        deadline = time.monotonic() + LANE_WAIT_S
        refreshed = False
        while True:
            links = [link for lane, link in self.links.items() if not link.closed and lane not in tried]
            if links:
                random.shuffle(links)
                return min(links, key=lambda link: len(link.inflight))
            if (tried and refreshed) or time.monotonic() > deadline:  # every lane there is was tried
                raise LaneUnavailable("no lane is available (it failed or is starting); retry")
            await self.refresh()  # a lane may have come up since the last refresh
            refreshed = True
            if not any(not link.closed for link in self.links.values()):
                await asyncio.sleep(0.2)

    def open(self, key: str) -> Inbox:
        self.inboxes[key] = Inbox(asyncio.get_running_loop())
        return self.inboxes[key]

    def close(self, key: str) -> None:
        self.inboxes.pop(key, None)
