"""Client SDK for tandem's gRPC API: sync and asyncio, streaming, deadlines, retries.

Light: needs grpcio and protobuf only (the base install), never torch or ray.

    from tandem.client import TandemClient
    with TandemClient("127.0.0.1:9000") as client:
        for chunk in client.generate("def fib(n):", max_tokens=32):
            print(chunk.text, end="", flush=True)

    async with AsyncTandemClient("127.0.0.1:9000") as client:
        done = await client.complete("import os", max_tokens=16, mode="sd")

Failed calls raise a TandemClientError subclass named after the gRPC status (InvalidArgument,
ResourceExhausted, Unavailable, ...) carrying the server's message. Breaking out of a
`generate` loop cancels the call, which frees the request's lane slot on the server.
"""
from __future__ import annotations

import os
import time
import uuid
from dataclasses import dataclass, field
from typing import AsyncIterator, Iterator

import grpc

from tandem.protos import tandem_pb2 as pb
from tandem.protos import tandem_pb2_grpc as pb_grpc

RETRYABLE = (grpc.StatusCode.UNAVAILABLE,)


class TandemClientError(Exception):
    """A failed call: `code` is the gRPC status, `details` the server's message."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"{code.name}: {details}")
        self.code, self.details = code, details


class InvalidArgument(TandemClientError): ...
class ResourceExhausted(TandemClientError): ...
class Unavailable(TandemClientError): ...
class DeadlineExceeded(TandemClientError): ...
class NotFound(TandemClientError): ...
class Cancelled(TandemClientError): ...
class Unauthenticated(TandemClientError): ...
class Internal(TandemClientError): ...


_ERRORS = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgument,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhausted,
    grpc.StatusCode.UNAVAILABLE: Unavailable,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceeded,
    grpc.StatusCode.NOT_FOUND: NotFound,
    grpc.StatusCode.CANCELLED: Cancelled,
    grpc.StatusCode.UNAUTHENTICATED: Unauthenticated,
    grpc.StatusCode.INTERNAL: Internal,
}


def _typed(err: grpc.RpcError) -> TandemClientError:
    code = err.code() if hasattr(err, "code") else grpc.StatusCode.UNKNOWN
    return _ERRORS.get(code, TandemClientError)(code, err.details() if hasattr(err, "details") else str(err))


@dataclass
class Completion:
    """A whole generation: the streamed chunks put together."""

    request_id: str
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str = ""
    stats: pb.RequestStats | None = None


def build_request(prompt: str, max_tokens: int = 0, temperature: float | None = None,
                  top_p: float | None = None, top_k: int | None = None, seed: int | None = None,
                  stop: list[str] | None = None, mode: str | None = None, max_draft: int | None = None,
                  adaedl: bool | None = None, request_id: str | None = None,
                  ignore_eos: bool = False, model: str = "") -> pb.GenerateRequest:
    """A GenerateRequest; None / 0 leave a setting to the server's default (max_tokens 0 included)."""
    spec = pb.Speculation(mode=mode, max_draft=max_draft, adaedl=adaedl)
    return pb.GenerateRequest(
        prompt=prompt, max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
        seed=seed, stop=stop or [], speculation=spec, request_id=request_id or uuid.uuid4().hex,
        ignore_eos=ignore_eos, model=model,
    )


def _metadata(request_id: str, extra: dict[str, str] | None) -> list[tuple[str, str]]:
    return [("x-request-id", request_id), *((extra or {}).items())]


def _call_metadata(metadata: dict[str, str] | None, api_key: str | None) -> dict[str, str]:
    """The caller's metadata, with `authorization: Bearer <key>` when there is a key (the
    argument, else the TANDEM_API_KEY environment variable)."""
    key = api_key if api_key is not None else os.environ.get("TANDEM_API_KEY")
    return {**(metadata or {}), **({"authorization": f"Bearer {key}"} if key else {})}


def _channel(target: str, tls: bool, root_certificates: bytes | None, aio: bool):
    """A plaintext channel, or TLS (root_certificates: PEM of the CA to trust; None: the system's)."""
    grpc_mod = grpc.aio if aio else grpc
    if not tls and root_certificates is None:
        return grpc_mod.insecure_channel(target)
    return grpc_mod.secure_channel(target, grpc.ssl_channel_credentials(root_certificates))


class TandemClient:
    """Blocking client. `timeout` is each call's deadline in seconds (None: no deadline);
    `api_key` is sent as `authorization: Bearer <key>` (default: $TANDEM_API_KEY); `tls` or
    `root_certificates` (PEM bytes of the server's CA) connect over TLS."""

    def __init__(self, target: str = "127.0.0.1:9000", timeout: float | None = 120.0, retries: int = 3,
                 backoff_s: float = 0.5, metadata: dict[str, str] | None = None,
                 channel: grpc.Channel | None = None, api_key: str | None = None, tls: bool = False,
                 root_certificates: bytes | None = None) -> None:
        self._channel = channel or _channel(target, tls, root_certificates, aio=False)
        self._stub = pb_grpc.TandemStub(self._channel)
        self.timeout, self.retries, self.backoff_s = timeout, retries, backoff_s
        self.metadata = _call_metadata(metadata, api_key)

    def __enter__(self) -> "TandemClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._channel.close()

    def _unary(self, method, request, request_id: str = ""):
        """Idempotent unary call, retried with backoff while the server is UNAVAILABLE."""
        for attempt in range(self.retries + 1):
            try:
                return method(request, timeout=self.timeout, metadata=_metadata(request_id, self.metadata))
            except grpc.RpcError as e:
                if e.code() not in RETRYABLE or attempt == self.retries:
                    raise _typed(e) from None
                time.sleep(self.backoff_s * 2**attempt)

    def health(self) -> pb.HealthResponse:
        return self._unary(self._stub.Health, pb.HealthRequest())

    def list_models(self) -> list[pb.Model]:
        return list(self._unary(self._stub.ListModels, pb.ListModelsRequest()).models)

    def cancel(self, request_id: str) -> bool:
        return self._unary(self._stub.Cancel, pb.CancelRequest(request_id=request_id), request_id).cancelled

    def generate(self, prompt: str, **kwargs) -> Iterator[pb.GenerateChunk]:
        """Stream chunks of verified tokens (keyword arguments: see build_request).

        Retried only until the first chunk has arrived. Leaving the loop early (break, an
        exception, closing the iterator) cancels the call, and the server frees the lane slot.
        """
        request = build_request(prompt, **kwargs)
        for attempt in range(self.retries + 1):
            received = False
            stream = self._stub.Generate(request, timeout=self.timeout,
                                         metadata=_metadata(request.request_id, self.metadata))
            try:
                for chunk in stream:
                    received = True
                    yield chunk
                return
            except grpc.RpcError as e:
                if received or e.code() not in RETRYABLE or attempt == self.retries:
                    raise _typed(e) from None
                time.sleep(self.backoff_s * 2**attempt)
            finally:
                stream.cancel()  # a no-op once the stream has ended

    def complete(self, prompt: str, **kwargs) -> Completion:
        """Run a generation to the end and return it whole."""
        return _collect(self.generate(prompt, **kwargs), kwargs.get("request_id"))


def _collect(chunks, request_id) -> Completion:
    out = Completion(request_id or "")
    for c in chunks:
        out.request_id = c.request_id
        out.text += c.text
        out.token_ids += list(c.token_ids)
        if c.finish_reason:
            out.finish_reason, out.stats = c.finish_reason, c.stats
    return out


class AsyncTandemClient:
    """asyncio client with the same calls as TandemClient."""

    def __init__(self, target: str = "127.0.0.1:9000", timeout: float | None = 120.0, retries: int = 3,
                 backoff_s: float = 0.5, metadata: dict[str, str] | None = None, api_key: str | None = None,
                 tls: bool = False, root_certificates: bytes | None = None) -> None:
        self._channel = _channel(target, tls, root_certificates, aio=True)
        self._stub = pb_grpc.TandemStub(self._channel)
        self.timeout, self.retries, self.backoff_s = timeout, retries, backoff_s
        self.metadata = _call_metadata(metadata, api_key)

    async def __aenter__(self) -> "AsyncTandemClient":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def close(self) -> None:
        await self._channel.close()

    async def _unary(self, method, request, request_id: str = ""):
        import asyncio

        for attempt in range(self.retries + 1):
            try:
                return await method(request, timeout=self.timeout, metadata=_metadata(request_id, self.metadata))
            except grpc.RpcError as e:
                if e.code() not in RETRYABLE or attempt == self.retries:
                    raise _typed(e) from None
                await asyncio.sleep(self.backoff_s * 2**attempt)

    async def health(self) -> pb.HealthResponse:
        return await self._unary(self._stub.Health, pb.HealthRequest())

    async def list_models(self) -> list[pb.Model]:
        return list((await self._unary(self._stub.ListModels, pb.ListModelsRequest())).models)

    async def cancel(self, request_id: str) -> bool:
        return (await self._unary(self._stub.Cancel, pb.CancelRequest(request_id=request_id), request_id)).cancelled

    async def generate(self, prompt: str, **kwargs) -> AsyncIterator[pb.GenerateChunk]:
        """As TandemClient.generate; closing the async iterator early cancels the call."""
        import asyncio

        request = build_request(prompt, **kwargs)
        for attempt in range(self.retries + 1):
            received = False
            call = self._stub.Generate(request, timeout=self.timeout,
                                       metadata=_metadata(request.request_id, self.metadata))
            try:
                async for chunk in call:
                    received = True
                    yield chunk
                return
            except grpc.RpcError as e:
                if received or e.code() not in RETRYABLE or attempt == self.retries:
                    raise _typed(e) from None
                await asyncio.sleep(self.backoff_s * 2**attempt)
            finally:
                call.cancel()  # a no-op once the call has ended

    async def complete(self, prompt: str, **kwargs) -> Completion:
        """Run a generation to the end and return it whole."""
        return _collect([c async for c in self.generate(prompt, **kwargs)], kwargs.get("request_id"))
