"""tandem.v1.Tandem over gRPC: the wire format to and from the shared front end.

Ray Serve 2.60 facts this relies on (docs/design.md): a gRPC method is the deployment method of
the same name, server streaming is an async generator of protobufs, and a status set on
`grpc_context` before raising is what the client sees.
"""
from __future__ import annotations

import logging
from typing import NoReturn

from ray.serve.grpc_util import RayServegRPCContext

from tandem.cluster.frontend import GenerateParams, status_of, user_message
from tandem.protos import tandem_pb2 as pb

logger = logging.getLogger(__name__)


def params_from_proto(r: pb.GenerateRequest, ctx: RayServegRPCContext | None) -> GenerateParams:
    """proto3 `optional` fields: unset means the server's default (HasField tells them apart)."""
    meta = dict(ctx.invocation_metadata()) if ctx is not None else {}
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


def raise_grpc(ctx: RayServegRPCContext, e: Exception) -> NoReturn:
    """Serve sends the code set on grpc_context when the method then raises."""
    status = status_of(e)
    if status is not None:
        ctx.set_code(status.grpc)
        ctx.set_details(user_message(e))
    else:
        logger.error("Generate failed: %r", e)
    raise e
