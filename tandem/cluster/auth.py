"""API keys: who may call, and whose requests are whose.

With TANDEM_API_KEYS set (comma-separated) in the environment of the Router replicas (where
`ray start` or `serve run` runs, or `runtime_env.env_vars` in the deploy config), every gRPC call
needs the metadata `authorization: Bearer <key>` and every HTTP call the same header; without it
every caller is the same anonymous owner. Keys are compared by their SHA-256 digests with
`hmac.compare_digest`, against every known key (no early exit), and are never logged. A request
belongs to the key that started it: its owner is a short digest of that key, which scopes request
ids (Cancel, and an id already running) to the owner's own requests.
"""
from __future__ import annotations

import hashlib
import hmac
import os

from tandem.errors import Unauthenticated

ENV = "TANDEM_API_KEYS"
ANONYMOUS = ""


class ApiKeys:
    def __init__(self, keys: list[str]) -> None:
        self._digests = [_digest(k) for k in keys if k]

    @staticmethod
    def from_env() -> ApiKeys:
        return ApiKeys([k.strip() for k in os.environ.get(ENV, "").split(",")])

    @property
    def enabled(self) -> bool:
        return bool(self._digests)

    def owner(self, authorization: str | None) -> str:
        """The owner of a call from its `authorization` header / metadata, or Unauthenticated."""
        if not self.enabled:
            return ANONYMOUS
        scheme, _, key = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            raise Unauthenticated("an API key is required: send the header `authorization: Bearer <key>`")
        presented, match = _digest(key.strip()), None
        for known in self._digests:  # every key compared, in constant time
            if hmac.compare_digest(presented, known):
                match = known
        if match is None:
            raise Unauthenticated("the API key is not valid")
        return match.hex()[:16]


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()
