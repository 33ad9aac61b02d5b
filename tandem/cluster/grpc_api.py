"""tandem.v1.Tandem over gRPC: tandem's own server, run in the Router replica's event loop.

The wire format to and from the shared front end (tandem/cluster/frontend.py), and the server's
guards: it listens where `grpc.host` says (127.0.0.1 by default), over TLS when a certificate is
configured, refuses a message over `limits.max_request_bytes` before decoding it, answers a
message that does not decode with INVALID_ARGUMENT, checks the API key of every call, and turns
every failure into a status with a short message that names the request (the details go to the
server log).
"""
from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import grpc
from google.protobuf.message import DecodeError

from tandem.cluster.auth import ApiKeys
from tandem.cluster.config import AppConfig
from tandem.cluster.frontend import Frontend, GenerateParams, status_of, user_message
from tandem.protos import tandem_pb2 as pb

logger = logging.getLogger(__name__)
SERVICE = "tandem.v1.Tandem"


class _BadMessage:
    """What a request that does not decode becomes (the handler answers INVALID_ARGUMENT)."""


def _decoder(cls) -> Callable[[bytes], object]:
    def decode(data: bytes):
        try:
            return cls.FromString(data)
        except DecodeError:
            return _BadMessage()
    return decode


class TandemService:
    """The four RPCs; each checks the caller's key, then asks the front end."""

    def __init__(self, frontend: Frontend, keys: ApiKeys) -> None:
        self.frontend, self.keys = frontend, keys

    def _owner(self, request, context: grpc.aio.ServicerContext) -> str:
        owner = self.keys.owner(_metadata(context).get("authorization"))
        if isinstance(request, _BadMessage):
            raise _Invalid("the request is not a valid tandem.v1 message")
        return owner

    async def generate(self, request: pb.GenerateRequest,
                       context: grpc.aio.ServicerContext) -> AsyncIterator[pb.GenerateChunk]:
        """Stream verified tokens; the last chunk carries finish_reason and stats."""
        rid = ""
        try:
            owner = self._owner(request, context)
            params = params_from_proto(request, _metadata(context))
            rid = params.request_id
            req, deltas = await self.frontend.open_stream(params, owner)
            rid = req.rid
            try:
                async for d in deltas:
                    yield pb.GenerateChunk(request_id=req.rid, token_ids=d.token_ids, text=d.text,
                                           finish_reason=d.finish_reason or "", stats=stats_proto(d.stats))
            finally:  # the client went away or the stream failed: end the lane's work now
                await deltas.aclose()
        except Exception as e:
            await _abort(context, e, rid)

    async def health(self, request, context: grpc.aio.ServicerContext) -> pb.HealthResponse:
        try:
            self._owner(request, context)
            return pb.HealthResponse(**await self.frontend.health())
        except Exception as e:
            await _abort(context, e)

    async def list_models(self, request, context: grpc.aio.ServicerContext) -> pb.ListModelsResponse:
        try:
            self._owner(request, context)
            return pb.ListModelsResponse(models=[pb.Model(**self.frontend.model_card())])
        except Exception as e:
            await _abort(context, e)

    async def cancel(self, request: pb.CancelRequest, context: grpc.aio.ServicerContext) -> pb.CancelResponse:
        try:
            owner = self._owner(request, context)
            return pb.CancelResponse(cancelled=await self.frontend.cancel(request.request_id, owner))
        except Exception as e:
            await _abort(context, e, getattr(request, "request_id", ""))

    def handler(self) -> grpc.GenericRpcHandler:
        unary = grpc.unary_unary_rpc_method_handler
        return grpc.method_handlers_generic_handler(SERVICE, {
            "Generate": grpc.unary_stream_rpc_method_handler(
                self.generate, _decoder(pb.GenerateRequest), pb.GenerateChunk.SerializeToString),
            "Health": unary(self.health, _decoder(pb.HealthRequest), pb.HealthResponse.SerializeToString),
            "ListModels": unary(self.list_models, _decoder(pb.ListModelsRequest), pb.ListModelsResponse.SerializeToString),
            "Cancel": unary(self.cancel, _decoder(pb.CancelRequest), pb.CancelResponse.SerializeToString),
        })


async def start_server(cfg: AppConfig, frontend: Frontend, keys: ApiKeys) -> grpc.aio.Server:
    """tandem's gRPC server on cfg.grpc.host:port, started on the running event loop."""
    g, limit = cfg.grpc, cfg.limits.max_request_bytes
    server = grpc.aio.server(options=[("grpc.max_receive_message_length", limit),
                                      ("grpc.max_send_message_length", 64 << 20)])
    server.add_generic_rpc_handlers([TandemService(frontend, keys).handler()])
    if g.reflection:
        from grpc_reflection.v1alpha import reflection

        reflection.enable_server_reflection([pb.DESCRIPTOR.services_by_name["Tandem"].full_name,
                                             reflection.SERVICE_NAME], server)
    address = f"{g.host}:{g.port}"
    if g.tls_cert_file:
        creds = grpc.ssl_server_credentials([(Path(g.tls_key_file).read_bytes(), Path(g.tls_cert_file).read_bytes())])
        server.add_secure_port(address, creds)
    else:
        server.add_insecure_port(address)
    await server.start()
    logger.info("gRPC tandem.v1.Tandem on %s (%s, keys %s, reflection %s)", address,
                "TLS" if g.tls_cert_file else "plaintext", "on" if keys.enabled else "off",
                "on" if g.reflection else "off")
    return server


def params_from_proto(r: pb.GenerateRequest, meta: dict) -> GenerateParams:
    """proto3 `optional` fields: unset means the server's default (HasField tells them apart)."""
    sp = r.speculation

    def opt(msg, name):
        return getattr(msg, name) if msg.HasField(name) else None

    return GenerateParams(
        prompt=r.prompt, max_tokens=r.max_tokens, temperature=opt(r, "temperature"), top_p=opt(r, "top_p"),
        top_k=opt(r, "top_k"), seed=opt(r, "seed"), stop=list(r.stop), mode=opt(sp, "mode"),
        max_draft=opt(sp, "max_draft"), adaedl=opt(sp, "adaedl"), ignore_eos=r.ignore_eos, model=r.model,
        request_id=r.request_id or meta.get("x-request-id", ""),
    )


def stats_proto(stats: dict | None) -> pb.RequestStats | None:
    if stats is None:
        return None
    names = pb.RequestStats.DESCRIPTOR.fields_by_name
    return pb.RequestStats(**{k: v for k, v in stats.items() if k in names and v is not None})


class _Invalid(Exception):
    """A request that is not a tandem.v1 message at all."""


def _metadata(context: grpc.aio.ServicerContext) -> dict:
    return {k.lower(): v for k, v in (context.invocation_metadata() or ()) if isinstance(v, str)}


async def _abort(context: grpc.aio.ServicerContext, e: Exception, rid: str = "") -> None:
    """End the call with the status of e (one table, tandem/cluster/frontend.py) and a short
    message; a server fault is logged here with its traceback, never sent."""
    if isinstance(e, _Invalid):
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
    status = status_of(e)
    if status.http >= 500:
        logger.error("request %s failed", rid or "(no id)", exc_info=e)
    await context.abort(status.grpc, user_message(e, rid))
