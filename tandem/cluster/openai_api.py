"""OpenAI-compatible HTTP: /v1/models, /v1/completions, /v1/chat/completions and /health.

Request bodies, response shapes and the route handlers, which speak to the shared front end
(tandem/cluster/frontend.py). `ingress(cls)` mounts the routes listed in ROUTES on the Router
deployment class, as Ray Serve LLM builds its ingress from an endpoint table. Bodies are strict:
an unknown field is a 400 naming it, while the usual OpenAI fields a client sends (n=1,
stream_options, user, ...) are accepted. tandem's own knobs (mode, max_draft, adaedl, top_k,
ignore_eos) go in the JSON body, e.g. through the openai client's `extra_body`.
"""
from __future__ import annotations

import json
import logging
import time
from typing import Any, AsyncIterator, Callable, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, field_validator
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException

from tandem.cluster.auth import ApiKeys
from tandem.cluster.frontend import (
    Delta,
    Frontend,
    GenerateParams,
    status_of,
    user_message,
)
from tandem.errors import TandemError
from tandem.params import Mode

logger = logging.getLogger(__name__)


# -- request bodies -------------------------------------------------------------------------------
class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class StreamOptions(_Body):
    include_usage: bool = False


class _SamplingBody(_Body):
    """Fields shared by both routes. Unsupported OpenAI features are accepted only at their no-op value."""

    model: str = Field("", description="must be the served model's id when set")
    max_tokens: int | None = Field(None, description="0 or unset: the server default")
    temperature: float | None = Field(None, description="OpenAI default 1.0; 0 = greedy")
    top_p: float | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: Literal[1] = Field(1, description="one choice per request")
    user: str | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None
    # tandem extensions
    top_k: int | None = None
    mode: Mode | None = None
    max_draft: int | None = None
    adaedl: bool | None = None
    ignore_eos: bool = False

    @field_validator("presence_penalty", "frequency_penalty")
    @classmethod
    def _no_penalty(cls, v: float) -> float:
        if v != 0:  # penalties change the verifier's distribution: not lossless-compatible yet
            raise ValueError("penalties are not supported (leave them at 0)")
        return v

    @field_validator("logit_bias")
    @classmethod
    def _no_bias(cls, v: dict | None) -> dict | None:
        if v:
            raise ValueError("logit_bias is not supported")
        return v

    def params(self, prompt: str, request_id: str, max_tokens: int | None) -> GenerateParams:
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        temperature = 1.0 if self.temperature is None else self.temperature  # OpenAI's default
        return GenerateParams(
            prompt=prompt, max_tokens=max_tokens or 0, temperature=temperature,
            top_p=self.top_p, top_k=self.top_k, seed=self.seed, stop=stop, mode=self.mode,
            max_draft=self.max_draft, adaedl=self.adaedl, ignore_eos=self.ignore_eos, model=self.model,
            request_id=request_id)


class CompletionRequest(_SamplingBody):
    prompt: str | list[str]
    echo: Literal[False] = False
    logprobs: None = None
    best_of: Literal[1] | None = None
    suffix: None = None

    def prompt_text(self) -> str:
        if isinstance(self.prompt, str):
            return self.prompt
        if len(self.prompt) != 1:
            raise TandemError(f"prompt: give one string (batches of prompts are not supported), got {len(self.prompt)}")
        return self.prompt[0]


class ContentPart(_Body):
    type: Literal["text"]
    text: str


class ChatMessage(_Body):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart]
    name: str | None = None

    def as_dict(self) -> dict:
        text = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)
        return {"role": self.role, "content": text}


class ChatCompletionRequest(_SamplingBody):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = None
    logprobs: Literal[False] | None = None


# -- errors ---------------------------------------------------------------------------------------
def error_response(status: int, message: str, kind: str = "invalid_request_error",
                   param: str | None = None) -> JSONResponse:
    """OpenAI's error body, which the openai client turns into BadRequestError, RateLimitError, ..."""
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": None}}, status_code=status)


async def _bad_body(request: Request, exc: RequestValidationError) -> JSONResponse:
    """A body that does not parse is the client's fault: 400 naming each bad field (FastAPI says 422)."""
    problems = ["{}: {}".format(".".join(str(x) for x in e["loc"] if x != "body") or "body", e["msg"])
                for e in exc.errors()]
    return error_response(400, "; ".join(problems))


def http_error(e: Exception, rid: str = "") -> JSONResponse:
    """What the front end raised, as an HTTP status in OpenAI's error shape (one table:
    tandem/cluster/frontend.py); a server fault is logged with its traceback, never sent."""
    status = status_of(e)
    if status.http >= 500:
        logger.error("HTTP request %s failed", rid or "(no id)", exc_info=e)
    return error_response(status.http, user_message(e, rid), status.kind)


async def _http_exception(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    """Starlette's own refusals (a body that is not UTF-8 JSON, an unknown route) in OpenAI's shape."""
    return error_response(exc.status_code, str(exc.detail))


async def _server_fault(request: Request, exc: Exception) -> JSONResponse:
    logger.error("HTTP %s %s failed", request.method, request.url.path, exc_info=exc)
    return error_response(500, "internal server error", "server_error")


class BodyLimit:
    """ASGI middleware: a request body over the limit is refused with 413 before it is parsed
    (by its Content-Length, or while it streams in). The limit is read from the Router replica's
    config (limits.max_request_bytes)."""

    def __init__(self, app, limit: Callable[[], int]) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        limit = self.limit()
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            return await _too_large(send, limit)
        seen = 0

        async def limited():
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > limit:
                raise _TooLarge
            return message

        try:
            await self.app(scope, limited, send)
        except _TooLarge:
            await _too_large(send, limit)


class _TooLarge(Exception):
    pass


async def _too_large(send, limit: int) -> None:
    response = error_response(413, f"the request body is larger than {limit} bytes (limits.max_request_bytes)")
    await send({"type": "http.response.start", "status": 413, "headers": response.raw_headers})
    await send({"type": "http.response.body", "body": response.body})


# -- response shapes ------------------------------------------------------------------------------
def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


class _Shape:
    """How one route spells a chunk and a whole answer."""

    object_name = ""
    chunk_name = ""

    def __init__(self, rid: str, model: str) -> None:
        self.head = {"id": rid, "created": int(time.time()), "model": model}

    def chunk(self, text: str, finish: str | None, first: bool) -> dict:
        return {**self.head, "object": self.chunk_name, "choices": [self.choice_delta(text, finish, first)]}

    def whole(self, text: str, finish: str, use: dict) -> dict:
        return {**self.head, "object": self.object_name, "choices": [self.choice(text, finish)], "usage": use}

    def usage_chunk(self, use: dict) -> dict:
        return {**self.head, "object": self.chunk_name, "choices": [], "usage": use}


class CompletionShape(_Shape):
    object_name = chunk_name = "text_completion"
    id_prefix = "cmpl"

    def choice_delta(self, text: str, finish: str | None, first: bool) -> dict:
        return {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}

    def choice(self, text: str, finish: str) -> dict:
        return self.choice_delta(text, finish, False)


class ChatShape(_Shape):
    object_name, chunk_name = "chat.completion", "chat.completion.chunk"
    id_prefix = "chatcmpl"

    def choice_delta(self, text: str, finish: str | None, first: bool) -> dict:
        delta = {"role": "assistant", "content": text} if first else {"content": text}
        return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}

    def choice(self, text: str, finish: str) -> dict:
        return {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                "finish_reason": finish}


def _sse(payload: Any) -> str:
    return f"data: {json.dumps(payload)}\n\n"


def openai_finish(reason: str | None) -> str | None:
    """OpenAI knows stop / length; a cancelled or failed request reads as "stop" there."""
    return None if reason is None else ("length" if reason == "length" else "stop")


# -- routes ---------------------------------------------------------------------------------------
# Each handler checks the caller's API key first (tandem/cluster/auth.py): 401 without a valid one.
async def models(frontend: Frontend, keys: ApiKeys, request: Request) -> Response:
    try:
        keys.owner(request.headers.get("authorization"))
    except Exception as e:
        return http_error(e)
    card = frontend.model_card()
    return JSONResponse({"object": "list", "data": [{"id": card["id"], "object": "model", "created": 0,
                                                      "owned_by": "tandem", "root": card["target"],
                                                      "max_model_len": card["max_context"]}]})


async def health(frontend: Frontend, keys: ApiKeys, request: Request) -> JSONResponse:
    """200 while a lane is healthy, 503 otherwise (for load balancers and probes)."""
    try:
        keys.owner(request.headers.get("authorization"))
    except Exception as e:
        return http_error(e)
    body = await frontend.health()
    return JSONResponse(body, status_code=200 if body["status"] == "SERVING" else 503)


async def completions(frontend: Frontend, keys: ApiKeys, body: CompletionRequest, request: Request) -> Response:
    try:
        owner = keys.owner(request.headers.get("authorization"))
        params = body.params(body.prompt_text(), _request_id(request), body.max_tokens)
    except Exception as e:
        return http_error(e)
    return await _answer(frontend, owner, params, body, CompletionShape)


async def chat(frontend: Frontend, keys: ApiKeys, body: ChatCompletionRequest, request: Request) -> Response:
    try:
        owner = keys.owner(request.headers.get("authorization"))
        prompt = frontend.chat_prompt([m.as_dict() for m in body.messages])
        params = body.params(prompt, _request_id(request), body.max_completion_tokens or body.max_tokens)
    except Exception as e:
        return http_error(e)
    return await _answer(frontend, owner, params, body, ChatShape)


async def _answer(frontend: Frontend, owner: str, params: GenerateParams, body: _SamplingBody,
                  shape_cls: type[_Shape]) -> Response:
    """Open the lane stream first, so refusals are plain 400/429 responses, then stream or collect."""
    try:
        req, deltas = await frontend.open_stream(params, owner)
    except Exception as e:
        return http_error(e, params.request_id)
    shape = shape_cls(_openai_id(req.rid, shape_cls), frontend.cfg.model.id)
    if body.stream:
        include = bool(body.stream_options and body.stream_options.include_usage)
        return LaneResponse(_events(deltas, shape, len(req.prompt_ids), include, req.rid), deltas,
                            media_type="text/event-stream")
    text, n, finish = "", 0, None
    try:
        async for d in deltas:
            text, n, finish = text + d.text, n + len(d.token_ids), d.finish_reason or finish
    except Exception as e:  # nothing sent yet: a plain error response
        return http_error(e, req.rid)
    return JSONResponse(shape.whole(text, openai_finish(finish), usage(len(req.prompt_ids), n)))


# The Router's HTTP methods (each a one-line call of a handler above) and their routes.
ROUTES: dict[str, Callable[[FastAPI], Callable]] = {
    "http_models": lambda app: app.get("/v1/models"),
    "http_health": lambda app: app.get("/health"),
    "http_completions": lambda app: app.post("/v1/completions"),
    "http_chat": lambda app: app.post("/v1/chat/completions"),
}


def ingress(cls: type, request_limit: Callable[[], int]) -> type:
    """`cls` with the ROUTES mounted on a new FastAPI app, as a Serve ingress (routes to methods of
    a subclass, so `cls` itself is left as it is); request bodies over request_limit() bytes are refused."""
    app = FastAPI(title="tandem", description="OpenAI-compatible routes of the tandem router")
    app.add_exception_handler(RequestValidationError, _bad_body)
    app.add_exception_handler(StarletteHTTPException, _http_exception)
    app.add_exception_handler(Exception, _server_fault)
    app.add_middleware(BodyLimit, limit=request_limit)
    routed = type(cls.__name__, (cls,), {"__qualname__": cls.__qualname__, "__module__": cls.__module__})
    for name, route in ROUTES.items():
        setattr(routed, name, route(app)(getattr(cls, name)))
    return serve.ingress(app)(routed)


class LaneResponse(StreamingResponse):
    """A streamed answer that closes its lane stream however the response ends: a client that
    leaves before the first chunk (Starlette then never starts the body's generator, whose own
    cleanup would close it) ends the lane's work at once, not after max_tokens for nobody."""

    def __init__(self, content: AsyncIterator[str], deltas, **kwargs) -> None:
        super().__init__(content, **kwargs)
        self.deltas = deltas

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.deltas.aclose()


async def _events(deltas: AsyncIterator[Delta], shape: _Shape, prompt_tokens: int,
                  include_usage: bool, rid: str) -> AsyncIterator[str]:
    """SSE: one `data:` line per text delta, the finish chunk, optional usage, then [DONE]. A
    failure after the headers went out is an error event (the openai client raises APIError on
    it) with no finish chunk and no [DONE]."""
    n, first = 0, True
    try:
        async for d in deltas:
            n += len(d.token_ids)
            if d.text or d.finish_reason or first:
                yield _sse(shape.chunk(d.text, openai_finish(d.finish_reason), first))
                first = False
    except Exception as e:  # headers are sent: report in-band, as OpenAI-style servers do
        status = status_of(e)
        if status.http >= 500:
            logger.error("HTTP stream %s failed", rid, exc_info=e)
        yield _sse({"error": {"message": user_message(e, rid), "type": status.kind, "param": None,
                              "code": status.http}})
        return
    finally:  # a client that went away closes us at a yield: close the lane stream now, not at GC
        await deltas.aclose()
    if include_usage:
        yield _sse(shape.usage_chunk(usage(prompt_tokens, n)))
    yield "data: [DONE]\n\n"


def _request_id(request: Request) -> str:
    """The caller's x-request-id header, else "" (the front end makes an unguessable one)."""
    return request.headers.get("x-request-id", "")


def _openai_id(rid: str, shape_cls: type[_Shape]) -> str:
    return rid if "-" in rid else f"{shape_cls.id_prefix}-{rid}"
