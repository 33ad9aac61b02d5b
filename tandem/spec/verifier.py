"""The verifier: the target model's distributions p at the positions being checked."""
from __future__ import annotations

import torch

from tandem.engine.base import Engine
from tandem.kernels.sampling import logits_to_probs, sampling_flags, sampling_tensors
from tandem.spec.messages import VerifyItem


class Verifier:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    @torch.inference_mode()
    def score(self, items: list[VerifyItem]) -> list[torch.Tensor]:  # each [num_logits, V]
        """One ragged forward over every request; p with each request's own sampling transform."""
        logits = self.engine.forward(
            [it.slot for it in items], [it.seq for it in items], [it.num_logits for it in items]
        )
        params = [it.sampling for it in items for _ in range(it.num_logits)]
        temp, top_k, top_p = sampling_tensors(params, logits.device)
        probs = logits_to_probs(logits, temp, top_k, top_p, sampling_flags(params))
        return list(probs.split([it.num_logits for it in items]))

    @torch.inference_mode()
    def greedy(self, items: list[VerifyItem]) -> list[list[int]]:
        """Temperature 0 everywhere: p is one-hot, so only its argmax matters (one host sync)."""
        logits = self.engine.forward(
            [it.slot for it in items], [it.seq for it in items], [it.num_logits for it in items]
        )
        top = logits.argmax(-1).tolist()
        out, at = [], 0
        for it in items:
            out.append(top[at : at + it.num_logits])
            at += it.num_logits
        return out
