"""The Serve application builder named by deploy/*.yaml: `import_path: tandem.cluster.app:build_app`.

`serve deploy` / `serve run` pass the yaml's `args:` mapping here. It is validated with
AppConfig first, so a wrong field fails the deploy with a message naming it, before any replica
or placement group is asked for.

    Router (ingress: gRPC + HTTP, 0.1 CPU) ──handle──► Lane × num_lanes (one placement group each)
"""
from __future__ import annotations

from pathlib import Path

from pydantic import ValidationError
from ray import serve

from tandem import models
from tandem.cluster.config import AppConfig
from tandem.cluster.lane import DRAIN_S, LaneDeployment
from tandem.cluster.router import RouterDeployment
from tandem.cluster.topology import lane_bundles
from tandem.errors import TandemError

# A lane's Serve calls are control calls (channel, load, cancel, reset_timing): requests come over
# the request channel (tandem/cluster/channel.py), which has its own limit (max_batch_size + max_queued).
LANE_CONTROL_CALLS = 64

ROUTER_OPTIONS = dict(
    num_replicas=1,
    # Async I/O and tokenizing: a sliver of a CPU is enough. On the head node, where Serve's HTTP
    # proxy is too: the gRPC server it runs (args.grpc) is then at the head's address.
    ray_actor_options={"num_cpus": 0.1, "resources": {"node:__internal_head__": 0.001}},
    max_ongoing_requests=1000,  # streams are mostly waiting on lanes; Serve's default of 5 would queue them
)


def build_app(args: dict) -> serve.Application:
    """Router → Lanes, from the yaml's `args:` (see tandem/cluster/config.py for every field)."""
    cfg = parse_config(args)
    lane = LaneDeployment.options(**lane_options(cfg)).bind(cfg.model_dump())
    return RouterDeployment.options(**ROUTER_OPTIONS).bind(cfg.model_dump(), lane)


def parse_config(args: dict | None) -> AppConfig:
    """AppConfig from `args`, or one TandemError listing each bad field as `path: problem`."""
    try:
        return AppConfig(**_resolve_model_paths(dict(args or {})))
    except ValidationError as e:
        problems = [f"{'.'.join(map(str, err['loc'])) or 'args'}: {err['msg']}" for err in e.errors()]
        raise TandemError("invalid tandem config (args of tandem.cluster.app:build_app): " + "; ".join(problems)) from None


def _resolve_model_paths(args: dict) -> dict:
    """Relative checkpoint paths made absolute against the directory the app is built in.

    Serve builds the app in a Ray worker whose working directory is wherever `ray start` (or
    `serve run`) ran; the lane replicas may run elsewhere, so they get absolute paths.
    `tandem:<name>` (a checkpoint shipped in the package) is left as it is.
    """
    model = args.get("model")
    if not isinstance(model, dict):
        return args
    model = dict(model)
    for key in ("target", "draft"):
        path = model.get(key)
        if isinstance(path, str) and not path.startswith(models.PREFIX) and not Path(path).is_absolute():
            model[key] = str(Path(path).resolve())
    return {**args, "model": model}


def lane_options(cfg: AppConfig) -> dict:
    """Serve options of the Lane deployment: its placement group, replica count and capacity.

    The replica runs in bundle 0 (the verifier's rank 0), so its own request is exactly that
    bundle's CPUs and GPUs: Serve checks it fits, Ray then sets CUDA_VISIBLE_DEVICES and
    OMP_NUM_THREADS for the replica from it (num_gpus 0 would hide the GPU from rank 0).
    """
    lane = cfg.lane
    bundle0 = lane_bundles(cfg)[0]
    opts = dict(
        placement_group_bundles=lane_bundles(cfg),
        placement_group_strategy=lane.placement_strategy,
        ray_actor_options={"num_cpus": bundle0.get("CPU", 0), "num_gpus": bundle0.get("GPU", 0)},
        max_ongoing_requests=LANE_CONTROL_CALLS,
        graceful_shutdown_timeout_s=DRAIN_S + 10,  # Lane.__del__ lets its requests finish first
    )
    if cfg.autoscaling:
        # Requests reach lanes over the request channel, not as Serve calls, so Serve's own count
        # of ongoing requests is ~0: scale on the requests each lane says it holds.
        opts["autoscaling_config"] = {"policy": {"policy_function": f"{__name__}:lane_autoscaling_policy"},
                                      **cfg.autoscaling}
    else:
        opts["num_replicas"] = cfg.num_lanes
    return opts


def lane_autoscaling_policy(ctx) -> tuple[float, dict]:
    """Serve's replica-queue-length policy on the requests the lanes hold (running + queued, from
    Lane.record_autoscaling_stats): as many lanes as keep target_ongoing_requests per lane. Serve
    wraps it with the config's bounds, delays and scaling factors."""
    if ctx.current_num_replicas == 0:
        return ctx.target_num_replicas, {}
    held = ctx.aggregated_metrics.get("held_requests") or {}
    total = sum(held.values()) if held else ctx.total_num_requests
    return total / ctx.config.get_target_ongoing_requests(), {}
