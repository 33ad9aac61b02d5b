"""The request path both front ends share (gRPC and OpenAI-style HTTP).

validate → tokenize with the target's tokenizer → submit to a lane over the request channel
(tandem/cluster/channel.py; Serve runs the lanes, the router picks one per request) → hold the
tokens that come back for `lane.stream_batching_interval_ms` → detokenize incrementally → stop
strings. One validation at the edge, one table from errors to
gRPC and HTTP statuses, one health summary, one table of in-flight requests for Cancel. The
protocol modules (tandem/cluster/grpc_api.py, tandem/cluster/openai_api.py) only translate
their wire format to `GenerateParams` and `Delta`s back.
"""
from __future__ import annotations

import asyncio
import logging
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import AsyncIterator, Callable

import grpc
from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError
from ray.serve.exceptions import (
    BackPressureError,
    DeploymentUnavailableError,
)
from ray.serve.handle import DeploymentHandle

from tandem import models
from tandem.cluster.channel import Inbox, LaneLink, Lanes, merge
from tandem.cluster.config import AppConfig
from tandem.engine.pair import load_tokenizer
from tandem.errors import (
    LaneFull,
    LaneUnavailable,
    RequestFailed,
    TandemError,
    Unauthenticated,
)
from tandem.params import SamplingParams, SpecParams
from tandem.spec.messages import Emission

logger = logging.getLogger(__name__)

# A lane that says LaneFull is retried on another lane (Lanes.pick: one not tried yet), at most
# this many times in all: a full lane answers at once, so retrying is cheap.
MAX_LANE_ATTEMPTS = 4
MAX_STOPS, MAX_STOP_CHARS = 8, 256
MAX_REQUEST_ID = 128
# A prompt up to this long is tokenized on the event loop (~0.3 ms at most with a fast tokenizer,
# less than a worker thread's round trip on a busy loop); a longer one in a thread, so that it
# does not hold up every other stream.
INLINE_TOKENIZE_CHARS = 1000


@dataclass
class GenerateParams:
    """One request as either front end states it; None means "the server's default"."""

    prompt: str
    max_tokens: int = 0  # 0: AppConfig.default_max_tokens
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    mode: str | None = None
    max_draft: int | None = None
    adaedl: bool | None = None
    ignore_eos: bool = False
    model: str = ""
    request_id: str = ""


@dataclass
class Admitted:
    """A validated, tokenized request, ready for a lane."""

    rid: str  # the client's id for it (its own, or one made here)
    key: str  # its id on the lanes: "<owner>/<rid>", so a request id is scoped by the API key that made it
    prompt_ids: list[int]
    sampling: SamplingParams
    spec: SpecParams
    stop: list[str]
    received_at: float = field(default_factory=time.perf_counter)


@dataclass
class Delta:
    """What one lane emission becomes at the front: new tokens and the text they add."""

    token_ids: list[int]
    text: str
    finish_reason: str | None = None
    stats: dict | None = None  # on the last delta


# -- errors -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Status:
    """How a refusal reads on each wire: gRPC status, HTTP status and OpenAI error type."""

    grpc: grpc.StatusCode
    http: int
    kind: str


INVALID = Status(grpc.StatusCode.INVALID_ARGUMENT, 400, "invalid_request_error")
FULL = Status(grpc.StatusCode.RESOURCE_EXHAUSTED, 429, "rate_limit_exceeded")
UNAVAILABLE = Status(grpc.StatusCode.UNAVAILABLE, 503, "service_unavailable")


INTERNAL = Status(grpc.StatusCode.INTERNAL, 500, "server_error")
UNAUTHENTICATED = Status(grpc.StatusCode.UNAUTHENTICATED, 401, "invalid_api_key")
# A lane's process gone, or no lane up: the request may be retried (the SDK does, before a first chunk).
LANE_GONE = (LaneUnavailable, DeploymentUnavailableError, RayActorError, ActorDiedError, ActorUnavailableError)


def status_of(e: BaseException) -> Status:
    """The one table from what the front end raises to each wire's status."""
    if isinstance(e, (LaneFull, BackPressureError)):
        return FULL
    if isinstance(e, TandemError):
        return INVALID
    if isinstance(e, LANE_GONE):
        return UNAVAILABLE
    if isinstance(e, Unauthenticated):
        return UNAUTHENTICATED
    return INTERNAL


def user_message(e: BaseException, rid: str = "") -> str:
    """What the client is told: the problem for its own errors; for the server's, one line naming
    the request (the details go to the server log, never to the client)."""
    cause = getattr(e, "cause", None)
    if isinstance(cause, Exception):  # a lane's error arrives wrapped in a RayTaskError
        e = cause
    status = status_of(e)
    if status is INVALID or status is FULL or status is UNAUTHENTICATED or isinstance(e, (LaneUnavailable, RequestFailed)):
        return str(e)
    if status is UNAVAILABLE:
        return f"request {rid}: no lane is available (it failed or is starting); retry" if rid else "no lane is available; retry"
    return f"request {rid}: internal server error" if rid else "internal server error"


# -- text ---------------------------------------------------------------------------------------
class TextStream:
    """Token ids in, text deltas out, correct for byte-level BPE and stop strings.

    Byte-level BPE splits one UTF-8 character over several tokens, so decoding token by token
    yields U+FFFD halves. Decoding the whole output and emitting only the new suffix does not,
    as long as an incomplete character at the end is held back. Text that could still be the
    start of a stop string is held back too (at most the longest stop string minus one chars),
    so a stop string never reaches the client even in part.
    """

    def __init__(self, tokenizer, stop: list[str]) -> None:
        self.tokenizer = tokenizer
        self.stop = [s for s in stop if s]
        self.hold = max(map(len, self.stop), default=1) - 1
        self.ids: list[int] = []
        self.sent = ""
        self.stopped = False

    def push(self, ids: list[int], final: bool) -> tuple[list[int], str]:
        """Add the lane's new tokens; return the tokens to report and the text to emit."""
        start = len(self.ids)
        self.ids += ids
        text = self._decode(self.ids)
        cut = self._find_stop(text)
        if cut is not None:
            self.stopped = True
            ids, text = self._ids_through_stop(start), text[:cut]
        elif not final:
            text = text.rstrip("\ufffd")  # an incomplete UTF-8 tail: wait for its other bytes
            text = text[: max(len(self.sent), len(text) - self.hold)]
        if not text.startswith(self.sent):  # decoding is prefix-stable here; never re-send
            return ids, ""
        delta, self.sent = text[len(self.sent):], text
        return ids, delta

    def _decode(self, ids: list[int]) -> str:
        # clean_up_tokenization_spaces rewrites " ." after the fact, which would break the
        # "earlier text never changes" property the suffix emission needs.
        return self.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def _find_stop(self, text: str) -> int | None:
        """Where the first stop string starts, searching only text not yet checked."""
        begin = max(0, len(self.sent) - self.hold)
        hits = [i for i in (text.find(s, begin) for s in self.stop) if i >= 0]
        return min(hits) if hits else None

    def _ids_through_stop(self, start: int) -> list[int]:
        """The new tokens up to the one that completes the stop string (later ones are dropped)."""
        for k in range(start + 1, len(self.ids) + 1):
            if self._find_stop(self._decode(self.ids[:k])) is not None:
                break
        new, self.ids = self.ids[start:k], self.ids[:k]
        return new


# -- the shared path ----------------------------------------------------------------------------
class LaneStream:
    """A request's deltas (Frontend._deltas) whose aclose() ends the lane's work even if they were
    never iterated: an HTTP client that leaves before its response starts streaming never runs
    the generator, so the generator's own cleanup would never run and the lane would generate
    the whole request for nobody."""

    def __init__(self, deltas: AsyncIterator[Delta], end: Callable[[], None]) -> None:
        self._deltas, self._end, self._started = deltas, end, False

    def __aiter__(self) -> "LaneStream":
        return self

    async def __anext__(self) -> Delta:
        self._started = True
        return await self._deltas.__anext__()

    async def aclose(self) -> None:
        if not self._started:  # never iterated: the generator's finally will not run
            self._started = True
            self._end()
        await self._deltas.aclose()


class Frontend:
    """Admits requests, streams them from the lanes, and answers Cancel / health / model card."""

    def __init__(self, cfg: AppConfig, lane: DeploymentHandle) -> None:
        self.cfg = cfg
        self.tokenizer = load_tokenizer(cfg.model.target)
        self.lane = lane
        self.lanes = Lanes(lane)  # started by start()
        self.batching_interval_s = cfg.lane.stream_batching_interval_ms / 1000
        self.inflight: dict[str, LaneLink | None] = {}  # request key -> its lane (None: not on one yet)
        target = cfg.model.target_config()
        self.vocab_size = int(target["vocab_size"])
        self.max_context = cfg.model.max_context or int(target.get("max_position_embeddings", 2048))

    async def start(self) -> None:
        """Connect to the lanes Serve runs (and, every few seconds, to new ones)."""
        await self.lanes.start()

    async def admit(self, p: GenerateParams, owner: str = "") -> Admitted:
        """Validate and tokenize (a long prompt in a thread: it must not hold up the event loop, which
        serves every other stream), so bad input is refused here with a message naming the field."""
        cfg = self.cfg
        if p.model and p.model != cfg.model.id:
            raise TandemError(f"unknown model {p.model!r}: this server serves {cfg.model.id!r}")
        check_text("prompt", p.prompt, cfg.limits.max_prompt_chars)
        if not p.prompt:
            raise TandemError("prompt is empty: give at least one character")
        check_stops(p.stop)
        max_tokens = p.max_tokens or cfg.default_max_tokens
        if not 0 < max_tokens <= cfg.max_tokens_limit:
            raise TandemError(f"max_tokens must be in [1, {cfg.max_tokens_limit}] (0 = default "
                              f"{cfg.default_max_tokens}), got {p.max_tokens}")
        sampling = SamplingParams(
            max_tokens, _default(p.temperature, 0.0), _default(p.top_k, 0), _default(p.top_p, 1.0),
            p.seed, p.ignore_eos).validate(self.vocab_size)
        s = cfg.speculation
        spec = SpecParams(_default(p.mode, s.mode), _default(p.max_draft, s.max_draft),
                          _default(p.adaedl, s.adaedl), s.send_draft_probs).validate()
        rid = check_request_id(p.request_id) or uuid.uuid4().hex  # 128 random bits when the server makes it
        key = f"{owner}/{rid}"
        if key in self.inflight:
            raise TandemError(f"request id {rid!r} is already running: use a new one")
        if len(p.prompt) <= INLINE_TOKENIZE_CHARS:  # cheaper than a thread's round trip
            prompt_ids = self.tokenizer.encode(p.prompt, add_special_tokens=False)
        else:
            prompt_ids = await asyncio.to_thread(self.tokenizer.encode, p.prompt, add_special_tokens=False)
        if len(prompt_ids) >= self.max_context:
            raise TandemError(f"prompt of {len(prompt_ids)} tokens does not fit the context of "
                              f"{self.max_context} tokens")
        return Admitted(rid, key, prompt_ids, sampling, spec, list(p.stop))

    async def open_stream(self, p: GenerateParams, owner: str = "") -> tuple[Admitted, AsyncIterator[Delta]]:
        """Admit a request and wait until a lane has taken it.

        Bad input and a full lane raise here, before a gRPC stream or an HTTP 200 has started,
        so the client gets a status code and not a broken stream.
        """
        req = await self.admit(p, owner)
        if req.key in self.inflight:  # checked again: another request with this id may have come meanwhile
            raise TandemError(f"request id {req.rid!r} is already running: use a new one")
        self.inflight[req.key] = None  # the id is taken until this request's stream ends
        try:
            link, inbox = await self._submit(req)
        except BaseException:
            self.inflight.pop(req.key, None)
            raise
        return req, LaneStream(self._deltas(req, link, inbox), lambda: self._end_stream(req, link, False))

    async def _submit(self, req: Admitted) -> tuple[LaneLink, Inbox]:
        """Queue the request on the lane with the fewest of this router's requests; a full or
        failed lane: try the next one."""
        tried: set[str] = set()
        last: Exception | None = None
        for _ in range(MAX_LANE_ATTEMPTS):
            try:
                link = await self.lanes.pick(tried)
            except LaneUnavailable:
                if last is not None:  # every lane was tried: the last one's answer says why
                    raise last from None
                raise
            inbox = self.lanes.open(req.key)
            self.inflight[req.key] = link  # from now on Cancel can reach it
            try:
                await link.submit(req.key, req.prompt_ids, asdict(req.sampling), asdict(req.spec))
                return link, inbox
            except (LaneFull, LaneUnavailable) as e:
                self.inflight[req.key] = None
                self.lanes.close(req.key)
                tried.add(link.lane)
                last = e
            except BaseException:  # bad input, or the client went away (LaneLink.submit cancels it there)
                self.lanes.close(req.key)
                raise
        raise last

    async def _deltas(self, req: Admitted, link: LaneLink, inbox: Inbox) -> AsyncIterator[Delta]:
        """Turn the lane's emissions into deltas: the first token at once, later ones held for
        the batching interval (each delta costs this interpreter and the client a message).
        Whatever ends the stream early also ends the lane's work."""
        loop = asyncio.get_running_loop()
        text = TextStream(self.tokenizer, req.stop)
        first_token_at = None
        lane_done = False
        hold_until = 0.0  # loop time before which tokens wait for company; 0: the first goes out at once
        try:
            while True:
                e = merge(await inbox.take(hold_until))
                hold_until = loop.time() + self.batching_interval_s
                lane_done = e.finish_reason is not None
                if e.finish_reason == "error":
                    raise _lane_failure(req.rid, e)
                ids, chunk = text.push(e.token_ids, final=lane_done)
                if ids and first_token_at is None:
                    first_token_at = time.perf_counter() - req.received_at
                reason = "stop" if text.stopped else e.finish_reason
                stats = self._stats(req, text, e.stats if lane_done else None, first_token_at) if reason else None
                yield Delta(ids, chunk, reason, stats)
                if reason:
                    return
        finally:  # a stop string, Cancel or a client that went away: free the lane slot now
            self._end_stream(req, link, lane_done)

    def _end_stream(self, req: Admitted, link: LaneLink, lane_done: bool) -> None:
        """A request's stream ended here: stop its lane work unless the lane ended it."""
        self.lanes.close(req.key)
        if lane_done or req.key not in link.inflight:
            self.inflight.pop(req.key, None)
        else:  # the id stays taken until the lane's own ending arrives, so a new request
            link.on_end[req.key] = lambda: self.inflight.pop(req.key, None)  # cannot get the old one's
            link.cancel(req.key)

    def _stats(self, req: Admitted, text: TextStream, lane_stats: dict | None, ttft: float | None) -> dict:
        """The lane's stats (absent when the router ended the request) plus what the router measured."""
        stats = dict(lane_stats or {"generated": len(text.ids)})
        stats["prompt_tokens"] = len(req.prompt_ids)
        stats["time_to_first_token_s"] = ttft or 0.0
        return stats

    async def cancel(self, rid: str, owner: str = "") -> bool:
        """Cancel a request of this owner's here, or (another router replica's) on whichever lane
        holds it. Another key's requests are invisible: the same id names a different request."""
        key = f"{owner}/{rid}"
        link = self.inflight.get(key)
        if link is not None:  # its stream ends with the lane's "cancelled" (and frees the id then)
            link.cancel(key)
            return True
        results = await self.lane.broadcast("cancel", key).results_async(timeout_s=10, return_exceptions=True)
        return any(r is True for r in results)

    async def lane_loads(self) -> list[dict]:
        """load() of every lane replica; broadcast() bypasses max_ongoing_requests, so a full lane answers too."""
        try:
            results = await self.lane.broadcast("load").results_async(timeout_s=10, return_exceptions=True)
        except (DeploymentUnavailableError, TimeoutError):
            return []
        return [r for r in results if isinstance(r, dict)]

    async def health(self) -> dict:
        """SERVING while a lane is healthy; lanes, running and queued summed over all of them."""
        loads = await self.lane_loads()
        healthy = any(x.get("healthy") for x in loads)
        return {"status": "SERVING" if healthy else "NOT_SERVING", "lanes": len(loads),
                "running": sum(x["running"] for x in loads), "queued": sum(x["queued"] for x in loads)}

    def model_card(self) -> dict:
        """What a client may know of the served model: names, not where the checkpoints lie."""
        m = self.cfg.model
        max_context = m.max_context or int(m.target_config().get("max_position_embeddings", 0))
        return {"id": m.id, "target": _checkpoint_name(m.target), "draft": _checkpoint_name(m.draft),
                "max_context": max_context}

    def chat_prompt(self, messages: list[dict]) -> str:
        """The tokenizer's chat template, or a plain role-prefixed transcript when it has none."""
        if getattr(self.tokenizer, "chat_template", None):
            return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        lines = [f"{m['role'].capitalize()}: {m['content']}" for m in messages]
        return "\n".join(lines) + "\nAssistant:"


def check_text(name: str, text: str, max_chars: int) -> None:
    """A string the tokenizer can take: not too long, and valid Unicode (no lone surrogates)."""
    if len(text) > max_chars:
        raise TandemError(f"{name} is {len(text)} characters; at most {max_chars} are accepted")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise TandemError(f"{name} is not valid Unicode: {e.reason} at character {e.start}") from None


def check_stops(stop: list[str]) -> None:
    if len(stop) > MAX_STOPS:
        raise TandemError(f"stop: at most {MAX_STOPS} strings, got {len(stop)}")
    for s in stop:
        check_text("a stop string", s, MAX_STOP_CHARS)


def check_request_id(rid: str) -> str:
    """A client's request id: up to 128 printable ASCII characters, no spaces (or "")."""
    if len(rid) > MAX_REQUEST_ID or not all(33 <= ord(c) < 127 for c in rid):
        raise TandemError(f"request_id must be at most {MAX_REQUEST_ID} printable ASCII characters without "
                          f"spaces, got {rid[:40]!r}{'...' if len(rid) > 40 else ''}")
    return rid


def _checkpoint_name(path: str) -> str:
    """`tandem:tiny/target` as it is; a folder by its name (e.g. Llama-3.1-8B-Instruct)."""
    return path if path.startswith(models.PREFIX) else Path(path).name


def _lane_failure(rid: str, e: Emission) -> Exception:
    """A lane's "error" ending as what the client sees: the lane failed (UNAVAILABLE, retry
    elsewhere) or this request did (INTERNAL); the lane's reason goes to the server log."""
    logger.error("request %s failed on its lane: %s", rid, e.error)
    if e.lane_failed:
        return LaneUnavailable(f"request {rid}: its lane failed; retry")
    return RequestFailed(f"request {rid} failed on the server")


def _default(value, default):
    return default if value is None else value
