"""The decoding modes, each a small class the step drives (docs/design.md §4).

Each mode answers four questions about one request for one step:
  draft_item  -- what should the drafter draft (after which sequence, how many tokens)?
  verify_item -- what should the verifier score (which sequence, how many positions)?
  checked     -- which tokens does the rejection sampler judge, with which q, and is a bonus due?
  apply       -- fold the verdict into the request; report finished draft rounds to AdaEDL.

Vanilla SD verifies the chunk drafted in the same step, so its verify depends on its draft.
PEARL verifies the chunk drafted in the *previous* step, so draft and verify of one step are
independent and can run at the same time on separate devices. AR is SD with no draft.
"""
from __future__ import annotations

import torch

from tandem.spec.messages import DraftChunk, DraftItem, DraftRound, VerifyItem
from tandem.spec.request import RequestState


class SDMode:
    """Draft k tokens, then verify them and sample one more (Leviathan et al. 2023)."""

    verify_needs_draft = True

    def draft_item(self, r: RequestState, room: int) -> DraftItem:
        k = min(r.window, room)
        return DraftItem(r.rid, r.draft_slot, r.seq, k, r.sampling, r.adaedl, r.spec.send_draft_probs)

    def verify_item(self, r: RequestState, chunk: DraftChunk) -> VerifyItem:
        # Feeds [last verified] + chunk; the k+1 logits judge the chunk and give the bonus.
        return VerifyItem(r.target_slot, r.seq + chunk.ids, len(chunk.ids) + 1, r.sampling)

    def checked(self, r: RequestState, chunk: DraftChunk) -> tuple[list[int], torch.Tensor | None, bool]:
        return chunk.ids, chunk.probs, True

    def apply(self, r: RequestState, chunk: DraftChunk, accepted: int, emitted: list[int]) -> list[DraftRound]:
        r.verified += emitted
        if not chunk.ids:
            return []
        return [DraftRound(r.rid, len(chunk.ids), accepted, r.window, chunk.entropies)]


class ARMode(SDMode):
    """The target alone: one token per step."""

    verify_needs_draft = False

    def verify_item(self, r: RequestState, chunk: DraftChunk | None) -> VerifyItem:
        return VerifyItem(r.target_slot, r.seq, 1, r.sampling)

    def draft_item(self, r: RequestState, room: int) -> DraftItem:
        return DraftItem(r.rid, r.draft_slot, r.seq, 0, r.sampling, False)


class PearlMode:
    """Pre-verify / post-verify (Liu et al. 2024, PEARL).

    PRE (nothing pending): the verifier scores the last verified token; the first token of the
    chunk drafted meanwhile is judged. Accepted: the chunk's rest becomes pending, go POST.
    POST: the verifier scores the pending tokens; they and the first token of the new chunk are
    judged. All accepted: the new chunk's rest becomes pending. Any rejection: back to PRE.
    """

    verify_needs_draft = False

    def draft_item(self, r: RequestState, room: int) -> DraftItem:
        gamma = min(r.window, max(room - len(r.pending), 0))
        seq = r.seq + r.pending
        return DraftItem(r.rid, r.draft_slot, seq, gamma, r.sampling, r.adaedl, r.spec.send_draft_probs)

    def verify_item(self, r: RequestState, chunk: DraftChunk | None = None) -> VerifyItem:
        # Independent of this step's chunk: [last verified] + pending, len(pending)+1 logits.
        return VerifyItem(r.target_slot, r.seq + r.pending, len(r.pending) + 1, r.sampling)

    def checked(self, r: RequestState, chunk: DraftChunk) -> tuple[list[int], torch.Tensor | None, bool]:
        ids = r.pending + chunk.ids[:1]
        probs = None
        if chunk.probs is not None:
            parts = [p for p in (r.pending_probs, chunk.probs[:1]) if p is not None]
            probs = torch.cat(parts)
        return ids, probs, not chunk.ids  # no chunk drafted (window 0 / budget): take a bonus

    def apply(self, r: RequestState, chunk: DraftChunk, accepted: int, emitted: list[int]) -> list[DraftRound]:
        n_pending = len(r.pending)
        rounds = self._finish_pending_chunk(r, accepted)
        r.verified += emitted
        r.clear_pending()
        if not chunk.ids or accepted < n_pending:
            return rounds  # no chunk, or it was drafted after a token now rejected: never judged
        if accepted == n_pending:  # the chunk's first token was rejected
            return rounds + [DraftRound(r.rid, len(chunk.ids), 0, r.window, chunk.entropies)]
        if len(chunk.ids) == 1:  # fully verified already
            return rounds + [DraftRound(r.rid, 1, 1, r.window, chunk.entropies)]
        r.pending = chunk.ids[1:]
        r.pending_probs = chunk.probs[1:] if chunk.probs is not None else None
        r.pending_chunk = (len(chunk.ids), r.window, chunk.entropies)
        return rounds

    @staticmethod
    def _finish_pending_chunk(r: RequestState, accepted: int) -> list[DraftRound]:
        """The chunk in flight had its first token accepted last step; now its rest was judged."""
        if r.pending_chunk is None:
            return []
        length, window, entropies = r.pending_chunk
        n_acc = 1 + min(accepted, len(r.pending))
        return [DraftRound(r.rid, length, n_acc, window, entropies)]


MODE_STEPS = {"ar": ARMode(), "sd": SDMode(), "pearl": PearlMode()}
