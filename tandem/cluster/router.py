"""The ingress deployment: one replica answers gRPC (tandem.v1.Tandem) and OpenAI-style HTTP.

Both protocols go through one `Frontend` (tandem/cluster/frontend.py): validate → tokenize →
stream from a Lane → detokenize → stop strings. Keeping them in one replica also gives Cancel
one table of in-flight requests to look in. The methods here only translate: gRPC methods are
named after their RPCs (tandem/cluster/grpc_api.py converts the messages), HTTP methods are
mounted from openai_api.ROUTES.
"""
from __future__ import annotations

import logging
from typing import AsyncIterator

from fastapi import Request
from fastapi.responses import JSONResponse, Response
from ray import serve
from ray.serve.grpc_util import RayServegRPCContext
from ray.serve.handle import DeploymentHandle

from tandem import logs
from tandem.cluster import openai_api
from tandem.cluster.config import AppConfig
from tandem.cluster.frontend import Frontend
from tandem.cluster.grpc_api import params_from_proto, raise_grpc, stats_proto
from tandem.cluster.openai_api import ChatCompletionRequest, CompletionRequest
from tandem.protos import tandem_pb2 as pb

logger = logging.getLogger(__name__)


class Router:
    def __init__(self, config: dict, lane: DeploymentHandle) -> None:
        logs.to_serve_log()
        self.cfg = AppConfig(**config)
        self.frontend = Frontend(self.cfg, lane)
        logger.info("router up: model %s, %d lane(s)", self.cfg.model.id, self.cfg.num_lanes)

    # -- gRPC: method names are the RPC names ------------------------------------------------------
    async def Generate(self, request: pb.GenerateRequest,
                       grpc_context: RayServegRPCContext) -> AsyncIterator[pb.GenerateChunk]:
        """Stream verified tokens; the last chunk carries finish_reason and stats."""
        try:
            req, deltas = await self.frontend.open_stream(params_from_proto(request, grpc_context))
        except Exception as e:
            raise_grpc(grpc_context, e)
        try:
            async for d in deltas:
                yield pb.GenerateChunk(request_id=req.rid, token_ids=d.token_ids, text=d.text,
                                       finish_reason=d.finish_reason or "", stats=stats_proto(d.stats))
        finally:  # closed at a yield (client gone): end the lane's work now, not at GC
            await deltas.aclose()

    async def Health(self, request: pb.HealthRequest, grpc_context: RayServegRPCContext = None) -> pb.HealthResponse:
        return pb.HealthResponse(**await self.frontend.health())

    async def ListModels(self, request: pb.ListModelsRequest,
                         grpc_context: RayServegRPCContext = None) -> pb.ListModelsResponse:
        return pb.ListModelsResponse(models=[pb.Model(**self.frontend.model_card())])

    async def Cancel(self, request: pb.CancelRequest, grpc_context: RayServegRPCContext = None) -> pb.CancelResponse:
        return pb.CancelResponse(cancelled=await self.frontend.cancel(request.request_id))

    # -- HTTP: routes in openai_api.ROUTES ---------------------------------------------------------
    async def http_models(self) -> dict:
        return await openai_api.models(self.frontend)

    async def http_health(self) -> JSONResponse:
        return await openai_api.health(self.frontend)

    async def http_completions(self, body: CompletionRequest, request: Request) -> Response:
        return await openai_api.completions(self.frontend, body, request)

    async def http_chat(self, body: ChatCompletionRequest, request: Request) -> Response:
        return await openai_api.chat(self.frontend, body, request)


RouterDeployment = serve.deployment(openai_api.ingress(Router), name="Router")
