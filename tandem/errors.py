"""Errors a user can act on. Light: imported by the client SDK, no torch or ray."""


class TandemError(ValueError):
    """Bad input or configuration; the message names the problem and what is allowed."""


class LaneFull(TandemError):
    """Every slot and queue place of a lane is taken: retry later (RESOURCE_EXHAUSTED)."""


class LaneUnavailable(Exception):
    """No lane can take the request now (it failed, or is starting): retry (UNAVAILABLE)."""


class Unauthenticated(Exception):
    """No API key, or one the server does not know (UNAUTHENTICATED / 401)."""


class RequestFailed(Exception):
    """The server failed this request (INTERNAL); the message is short and names the request."""
