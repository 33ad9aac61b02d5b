"""Where the `tandem.*` loggers write inside Ray processes.

Every module logs with `logging.getLogger(__name__)`. Ray Serve configures only its own
`ray.serve` logger in a replica (its log file in the dashboard, and stderr), not the root logger,
so a replica routes the `tandem` tree to Serve's handlers; a plain Ray actor (a lane's verifier
shard or drafter) writes it to stderr, which Ray keeps in the worker's log.
"""
from __future__ import annotations

import logging
import sys

FORMAT = "%(levelname)s %(asctime)s %(name)s -- %(message)s"


def to_serve_log(level: int = logging.INFO) -> None:
    """In a Serve replica: tandem's records go where the replica's own Serve logs go."""
    serve = logging.getLogger("ray.serve")
    _route(serve.handlers or [_stderr()], level)


def to_stderr(level: int = logging.INFO) -> None:
    """In a Ray actor or a plain process: tandem's records go to stderr."""
    _route([_stderr()], level)


def _route(handlers: list[logging.Handler], level: int) -> None:
    tandem = logging.getLogger("tandem")
    tandem.setLevel(level)
    tandem.propagate = False  # not twice where the root logger has handlers too
    for h in handlers:
        if h not in tandem.handlers:
            tandem.addHandler(h)


def _stderr() -> logging.Handler:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(FORMAT))
    return handler
