"""`tandem serve CONFIG`: deploy a Serve config in the foreground and say where it serves.

What `serve run CONFIG` does, except that a deploy that fails (a bad config, a replica that cannot
start) ends the command with its reason and exit code 1 instead of serving 503s until Ctrl-C, and
that it prints the gRPC and HTTP addresses once every application is up. Uses the Ray cluster at
`--address` (or $RAY_ADDRESS), else starts a local one, as `serve run` does.
"""
from __future__ import annotations

import logging
import signal
import time
from pathlib import Path

import ray
import yaml
from ray import serve
from ray.serve.schema import ServeDeploySchema

from tandem.errors import TandemError

logger = logging.getLogger(__name__)
POLL_S = 5.0


def serve_config(path: str, address: str | None = None) -> int:
    """Deploy every application of the config; block until Ctrl-C (0) or a failed deploy (1)."""
    try:
        config = ServeDeploySchema.model_validate(yaml.safe_load(Path(path).read_text()))
    except (OSError, ValueError) as e:
        raise TandemError(f"{path}: not a Serve config ({e})") from None
    runtime_env = config.applications[0].runtime_env if config.applications else None
    ray.init(address=address, runtime_env=runtime_env or None, log_to_driver=True)
    http = config.http_options
    serve.start(http_options=http.model_dump(exclude_unset=True), proxy_location=config.proxy_location)
    for app in config.applications:
        builder = _import(app.import_path)
        try:
            serve.run(builder(app.args or {}), name=app.name, route_prefix=app.route_prefix)
        except TandemError:
            raise
        except Exception as e:
            print(f"tandem: error: application {app.name!r} failed to deploy: {_reason(app.name) or e}", flush=True)
            return 1
        print(f"tandem: {app.name} is up: {_where(app, http)}", flush=True)
    try:
        while True:
            time.sleep(POLL_S)
            failed = [name for name, a in serve.status().applications.items() if a.status == "DEPLOY_FAILED"]
            if failed:
                print(f"tandem: error: {failed[0]!r} failed: {_reason(failed[0])}", flush=True)
                return 1
    except KeyboardInterrupt:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not cut the shutdown short
        print("tandem: shutting down", flush=True)
        serve.shutdown()
        ray.shutdown()
        return 0


def _import(import_path: str):
    module, _, attr = import_path.partition(":")
    return getattr(__import__(module, fromlist=[attr]), attr)


def _reason(name: str) -> str:
    try:
        return serve.status().applications[name].message.strip().splitlines()[-1]
    except Exception:
        return ""


def _where(app, http) -> str:
    args = app.args or {}
    grpc = args.get("grpc") or {}
    scheme = "https" if getattr(http, "ssl_certfile", None) else "http"
    parts = []
    if grpc.get("enabled", True):
        parts.append(f"gRPC {grpc.get('host', '127.0.0.1')}:{grpc.get('port', 9000)} (tandem.v1.Tandem)")
    prefix = (app.route_prefix or "/").rstrip("/")
    parts.append(f"HTTP {scheme}://{http.host}:{http.port}{prefix}/v1")
    return ", ".join(parts)
