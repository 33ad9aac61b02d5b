"""A drafter in another process that may die, and a lane that goes on without it.

When the exchange with the drafter fails (its process died: the socket closes and the call raises
at once), its requests draft nothing from that step on: the step verifies them as AR does (an SD
request's empty draft gets the bonus token; a PEARL request's pending tokens are still judged), so
greedy output is what it would have been and sampled output keeps the target's distribution. In
the background `reconnect()` brings up a new drafter process (in the cluster: a new Ray actor in
the same placement-group bundle); once it has joined, every running request is started on it again
(its seed kept, AdaEDL's state fresh) and speculation resumes. No request fails.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import replace

from tandem.actors.remote_drafter import RemoteDrafter
from tandem.spec.drafting import DraftFuture, DraftResult
from tandem.spec.messages import DraftChunk, DraftItem, DraftRound

logger = logging.getLogger(__name__)
RETRY_S = 5.0  # wait before trying again to bring up a drafter that failed to start


class ResilientDrafter:
    def __init__(self, drafter: RemoteDrafter, max_slots: int, reconnect: Callable[[], RemoteDrafter] | None,
                 name: str = "drafter") -> None:
        self.inner: RemoteDrafter | None = drafter
        self.max_context = drafter.max_context
        self.max_slots, self.reconnect, self.name = max_slots, reconnect, name
        self.failures = 0  # drafter processes lost
        self._seeds: dict[str, int] = {}  # running requests and their seeds (to start them again)
        self._slots: dict[str, int] = {}  # request -> its slot on the drafter in use
        self._next: Future | None = None  # a replacement being brought up
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"tandem-{name}-reconnect")

    @property
    def up(self) -> bool:
        return self.inner is not None

    @property
    def free_slots(self) -> int:
        return self.max_slots - len(self._seeds)

    def start(self, rid: str, seed: int) -> int:
        self._swap_in()
        self._seeds[rid] = seed
        if self.inner is not None:
            try:
                self._slots[rid] = self.inner.start(rid, seed)
            except Exception as e:
                self._lost(e)
        return -1  # slots are kept here, by request (DraftItem.slot is set from them)

    def finish(self, rid: str, slot: int) -> None:
        self._seeds.pop(rid, None)
        mine = self._slots.pop(rid, None)
        if self.inner is not None and mine is not None:
            try:
                self.inner.finish(rid, mine)
            except Exception as e:
                self._lost(e)

    def update(self, rounds: list[DraftRound], step_s: float | None = None) -> None:
        if self.inner is not None:
            self.inner.update([r for r in rounds if r.rid in self._slots], step_s)

    def submit(self, items: list[DraftItem], overlap: bool = False) -> DraftResult:
        self._swap_in()
        if self.inner is None or any(it.rid not in self._slots for it in items):
            return _nothing(items)
        try:
            future = self.inner.submit([replace(it, slot=self._slots[it.rid]) for it in items], overlap)
        except Exception as e:
            self._lost(e)
            return _nothing(items)
        return _Guarded(future, self, items)

    def status(self) -> list[dict]:
        return [{"kind": "remote", "up": self.up, "lost": self.failures}]

    def close(self) -> None:
        if self.inner is not None:
            try:
                self.inner.close()
            except Exception:  # already gone
                pass
        self._pool.shutdown(wait=False, cancel_futures=True)

    # -- losing and regaining the drafter (step thread; `reconnect` runs in the pool) ---------------
    def _lost(self, e: BaseException) -> None:
        if self.inner is None:
            return
        self.failures += 1
        logger.error("%s lost (%s: %s): its %d requests go on without drafts until a new one is up",
                     self.name, type(e).__name__, e, len(self._seeds))
        self.inner = None
        self._slots.clear()
        self._bring_up(delay_s=0.0)

    def _bring_up(self, delay_s: float) -> None:
        if self.reconnect is not None and self._next is None:
            self._next = self._pool.submit(self._reconnect_after, delay_s)

    def _reconnect_after(self, delay_s: float) -> RemoteDrafter:
        time.sleep(delay_s)
        return self.reconnect()

    def _swap_in(self) -> None:
        """Between steps: a replacement that is up takes over every running request."""
        if self._next is None or not self._next.done():
            return
        future, self._next = self._next, None
        try:
            drafter = future.result()
            for rid, seed in self._seeds.items():
                self._slots[rid] = drafter.start(rid, seed)
        except Exception as e:
            logger.error("%s: bringing up a new drafter failed (%r); trying again in %.0f s", self.name, e, RETRY_S)
            self._slots.clear()
            self._bring_up(delay_s=RETRY_S)
            return
        self.inner = drafter
        logger.info("%s is back: %d running requests draft again", self.name, len(self._seeds))


class _Guarded:
    """A remote draft's result, or no drafts if the drafter died meanwhile."""

    def __init__(self, future, owner: ResilientDrafter, items: list[DraftItem]) -> None:
        self._future, self._owner, self._items = future, owner, items
        self.concurrent = future.concurrent
        self.seconds = 0.0

    def result(self) -> list[DraftChunk]:
        try:
            chunks = self._future.result()
        except Exception as e:
            self._owner._lost(e)
            return _nothing(self._items).result()
        self.seconds = self._future.seconds
        return chunks


def _nothing(items: list[DraftItem]) -> DraftFuture:
    """No drafts: every request's step is an AR step (PEARL: its pending tokens are still judged)."""
    return DraftFuture([DraftChunk([], None) for _ in items], 0.0)
