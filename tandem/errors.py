"""Errors a user can act on. Light: imported by the client SDK, no torch or ray."""


class TandemError(ValueError):
    """Bad input or configuration; the message names the problem and what is allowed."""


class LaneFull(TandemError):
    """Every slot and queue place of a lane is taken: retry later (RESOURCE_EXHAUSTED)."""
