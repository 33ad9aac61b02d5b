"""The ingress deployment: one replica answers gRPC (tandem.v1.Tandem) and OpenAI-style HTTP.

Both protocols go through one `Frontend` (tandem/cluster/frontend.py): validate → tokenize →
stream from a Lane → detokenize → stop strings. Keeping them in one replica also gives Cancel
one table of in-flight requests to look in. gRPC is tandem's own server, started with the replica
(tandem/cluster/grpc_api.py: its address, TLS, size limit and keys come from the config); HTTP
comes through Serve's proxy to the methods mounted from openai_api.ROUTES.
"""
from __future__ import annotations

import logging

from fastapi import Request
from fastapi.responses import JSONResponse, Response
from ray import serve
from ray.serve.handle import DeploymentHandle

from tandem import logs
from tandem.cluster import openai_api
from tandem.cluster.auth import ApiKeys
from tandem.cluster.config import AppConfig
from tandem.cluster.frontend import Frontend
from tandem.cluster.grpc_api import start_server
from tandem.cluster.openai_api import ChatCompletionRequest, CompletionRequest

logger = logging.getLogger(__name__)


class Router:
    async def __init__(self, config: dict, lane: DeploymentHandle) -> None:
        logs.to_serve_log()
        self.cfg = AppConfig(**config)
        self.keys = ApiKeys.from_env()
        self.frontend = Frontend(self.cfg, lane)
        await self.frontend.start()
        self.grpc = await start_server(self.cfg, self.frontend, self.keys) if self.cfg.grpc.enabled else None
        logger.info("router up: model %s, %d lane(s), API keys %s", self.cfg.model.id, self.cfg.num_lanes,
                    "required" if self.keys.enabled else "off (TANDEM_API_KEYS unset)")

    # -- HTTP: routes in openai_api.ROUTES ---------------------------------------------------------
    async def http_models(self, request: Request) -> Response:
        return await openai_api.models(self.frontend, self.keys, request)

    async def http_health(self, request: Request) -> JSONResponse:
        return await openai_api.health(self.frontend, self.keys, request)

    async def http_completions(self, body: CompletionRequest, request: Request) -> Response:
        return await openai_api.completions(self.frontend, self.keys, body, request)

    async def http_chat(self, body: ChatCompletionRequest, request: Request) -> Response:
        return await openai_api.chat(self.frontend, self.keys, body, request)


def _request_limit() -> int:
    """limits.max_request_bytes of the replica serving the request (for openai_api.BodyLimit)."""
    return serve.get_replica_context().servable_object.cfg.limits.max_request_bytes


RouterDeployment = serve.deployment(openai_api.ingress(Router, _request_limit), name="Router")
