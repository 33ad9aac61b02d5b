"""A lane's step loop in a process of its own, as vLLM v1 runs its engine core.

The Lane replica's interpreter also runs Serve's event loop, the request streams and the
metrics; a step loop sharing it waits for the GIL, and the more streams the longer (the cluster
path cost 12-38% against the same work in one process). Here the replica keeps the I/O and the
core process only steps: it is verifier rank 0 (it joins the tensor-parallel world and hosts the
drafters' rendezvous, tandem/actors/lane_roles.py) and runs a LaneCore.

The two talk over one local socket (multiprocessing.connection, pickled tuples), one way at a
time, never waiting for an answer on the request path:

    replica -> core   ("submit", rid, prompt, sampling, spec) | ("cancel", rid) | ("reset",) | ("stop",)
    core -> replica   ("emit", [Emission, ...]) once per step | ("load", dict) every LOAD_EVERY_S
                      | ("respawn", i, address) | ("ready", info) | ("failed", reason)

The replica checks what it can itself (parameters, the prompt against the context, the lane's
capacity, a request id already running), so submit raises at once as LaneCore.submit does; the
core's own answer to a request comes as its emissions. The core process dies with the replica
(PR_SET_PDEATHSIG), and the replica fails every stream with the lane when the core dies.
"""
from __future__ import annotations

import logging
import os
import secrets
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable
from multiprocessing.connection import Client, Listener

from tandem.actors.lane_core import check_room, checked_request
from tandem.params import SamplingParams, SpecParams
from tandem.spec.messages import Emission

logger = logging.getLogger(__name__)
Sink = Callable[[Emission], None]
LOAD_EVERY_S = 0.2
START_TIMEOUT_S = 3600.0  # loading a large pair and capturing every graph takes minutes


class CoreProcess:
    """The replica's side: LaneCore's interface (submit, cancel, load, reset_timing, stop, error)."""

    def __init__(self, spec, addresses, stop_ids: set[int], max_queued: int, max_batch_size: int,
                 request_timeout_s: float, respawn: Callable[[int, str], None] | None = None) -> None:
        self.max_queued, self.max_batch_size = max_queued, max_batch_size
        self.respawn = respawn
        self.flush: Callable[[], None] = lambda: None  # after each step's emissions (as LaneCore.flush)
        self.error: BaseException | None = None
        self._sinks: dict[str, Sink] = {}
        # `_lock` (sinks, the load snapshot) is never held while sending, so the reader thread,
        # which takes it to deliver, always drains the core's messages; `_send_lock` orders sends.
        self._lock = threading.Lock()
        self._send_lock = threading.Lock()
        self._load: dict = {}
        folder = tempfile.mkdtemp(prefix="tandem-core-")
        address, key = os.path.join(folder, "core.sock"), secrets.token_bytes(32)
        listener = Listener(address, family="AF_UNIX", authkey=key)
        env = {**os.environ, "TANDEM_CORE_ADDRESS": address, "TANDEM_CORE_KEY": key.hex()}
        self.proc = subprocess.Popen([sys.executable, "-m", "tandem.actors.core_process"], env=env)
        self.conn = _accept(listener, self.proc)
        listener.close()
        self.conn.send((spec, addresses, set(stop_ids), max_queued, max_batch_size, request_timeout_s))
        kind, info = self._wait_ready()
        if kind == "failed":
            raise RuntimeError(f"the lane's core process failed to start: {info}")
        self.max_context, self.vocab_size = info["max_context"], info["vocab_size"]
        self._reader = threading.Thread(target=self._read, name="lane-core-reader", daemon=True)
        self._reader.start()

    def _wait_ready(self):
        while True:
            msg = self.conn.recv()
            if msg[0] in ("ready", "failed"):
                return msg[0], msg[1]
            if msg[0] == "respawn":  # a drafter lost while the core starts
                self._respawn(*msg[1:])

    # -- the request path (the replica's event loop) ----------------------------------------------
    def submit(self, rid: str, prompt: list[int], sampling: SamplingParams, spec: SpecParams, sink: Sink) -> None:
        """Queue a request; bad input and a full lane raise here, before anything is held."""
        sampling, spec = checked_request(prompt, sampling, spec, self.vocab_size, self.max_context)
        with self._send_lock:  # a submit and a cancel of one request reach the core in order
            with self._lock:
                check_room(rid, self._sinks, self.error, self.max_batch_size, self.max_queued)
                self._sinks[rid] = sink
            try:
                self.conn.send(("submit", rid, list(prompt), sampling, spec))
            except BaseException:
                with self._lock:
                    self._sinks.pop(rid, None)
                raise

    def cancel(self, rid: str) -> bool:
        with self._send_lock:
            with self._lock:
                if rid not in self._sinks:
                    return False
            self.conn.send(("cancel", rid))
            return True

    def load(self) -> dict:
        """The core's latest snapshot (at most LOAD_EVERY_S old), with this side's health; running +
        queued is exact (the requests this side holds), their split the snapshot's."""
        with self._lock:
            holding = len(self._sinks)
            running = min(self._load.get("running", 0), holding)
            return {**self._load, "running": running, "queued": holding - running,
                    "healthy": self.error is None and self._load.get("healthy", True)}

    def reset_timing(self) -> None:
        self._send(("reset",))

    def stop(self) -> None:
        try:
            self._send(("stop",))
        except OSError:
            pass
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()

    def _send(self, msg) -> None:
        with self._send_lock:
            self.conn.send(msg)

    # -- what the core says (a thread of the replica) --------------------------------------------
    def _read(self) -> None:
        try:
            while True:
                msg = self.conn.recv()
                kind = msg[0]
                if kind == "emit":
                    self._deliver(msg[1])
                    self.flush()
                elif kind == "load":
                    with self._lock:
                        self._load = msg[1]
                elif kind == "respawn":
                    threading.Thread(target=self._respawn, args=msg[1:], daemon=True).start()
                elif kind == "failed":
                    self._failed(RuntimeError(msg[1]))
                    return
        except (EOFError, OSError) as e:  # the core process is gone
            code = self.proc.poll()
            if self.error is None and code not in (0, None):
                logger.error("the lane's core process exited (code %s)", code)
            self._failed(e)

    def _deliver(self, emissions: list[Emission]) -> None:
        for e in emissions:
            with self._lock:
                sink = self._sinks.get(e.rid)
                if e.finish_reason:
                    self._sinks.pop(e.rid, None)
            if sink is not None:
                sink(e)

    def _respawn(self, i: int, address: str) -> None:
        if self.respawn is None:
            return
        try:
            self.respawn(i, address)
        except Exception:
            logger.exception("could not start a new drafter %d", i)

    def _failed(self, err: BaseException) -> None:
        with self._lock:
            if self.error is None:
                self.error = err
            sinks, self._sinks = self._sinks, {}
        for rid, sink in sinks.items():
            sink(Emission(rid, [], "error", error=f"lane failed: {type(err).__name__}", lane_failed=True))
        self.flush()


def _accept(listener: Listener, proc: subprocess.Popen):
    """The core's connection; its early death (before connecting) is an error, not a hang."""
    box: list = []
    thread = threading.Thread(target=lambda: box.append(listener.accept()), daemon=True)
    thread.start()
    while thread.is_alive():
        thread.join(timeout=0.5)
        if proc.poll() is not None and not box:
            raise RuntimeError(f"the lane's core process exited with code {proc.returncode} before it connected")
    return box[0]


# -- the core process -----------------------------------------------------------------------------
class _Outbox:
    """The core's sends: emissions gathered and sent once per step, other messages at once."""

    def __init__(self, conn) -> None:
        # `lock` guards pending and is never held while sending: LaneCore calls emit while it holds
        # its own lock, and a send can wait for the replica to read.
        self.conn, self.lock, self.send_lock, self.pending = conn, threading.Lock(), threading.Lock(), []

    def emit(self, e: Emission) -> None:  # LaneCore's sink (its thread, or the main thread on admission)
        with self.lock:
            self.pending.append(e)

    def flush(self) -> None:
        with self.lock:
            batch, self.pending = self.pending, []
        if batch:
            self.send(("emit", batch))

    def send(self, msg) -> None:
        with self.send_lock:
            self.conn.send(msg)


def _die_with_parent() -> None:
    """SIGKILL this process when the replica that started it dies (Linux)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def main() -> None:
    from tandem import logs
    from tandem.actors.lane_core import LaneCore
    from tandem.actors.lane_roles import run_leader

    _die_with_parent()
    logs.to_stderr()
    conn = Client(os.environ["TANDEM_CORE_ADDRESS"], family="AF_UNIX", authkey=bytes.fromhex(os.environ["TANDEM_CORE_KEY"]))
    spec, addresses, stop_ids, max_queued, max_batch_size, request_timeout_s = conn.recv()
    out = _Outbox(conn)
    try:
        batch = run_leader(spec, addresses, stop_ids, respawn=lambda i, address: out.send(("respawn", i, address)))
        core = LaneCore(batch, max_queued, max_batch_size, request_timeout_s, flush=out.flush)
    except BaseException:
        out.send(("failed", traceback.format_exc(limit=3)))
        return
    out.send(("ready", {"max_context": batch.max_context, "vocab_size": batch.vocab_size}))
    logger.info("lane core process %d serving", os.getpid())

    def publish() -> None:
        while core.error is None:
            out.send(("load", core.load()))
            time.sleep(LOAD_EVERY_S)
        out.send(("failed", f"lane step loop failed: {type(core.error).__name__}"))

    threading.Thread(target=publish, name="lane-core-load", daemon=True).start()
    while True:
        msg = conn.recv()
        kind = msg[0]
        if kind == "submit":
            _, rid, prompt, sampling, spec = msg
            try:
                core.submit(rid, prompt, sampling, spec, out.emit)
            except Exception as e:  # the replica checked the same: a race with the core's own state
                out.emit(Emission(rid, [], "error", error=f"{type(e).__name__}: {e}"))
                out.flush()
        elif kind == "cancel":
            core.cancel(msg[1])
        elif kind == "reset":
            core.reset_timing()
        elif kind == "stop":
            core.stop()
            return


if __name__ == "__main__":
    main()
