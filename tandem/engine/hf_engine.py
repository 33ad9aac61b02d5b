"""Engine for any transformers causal LM: one DynamicCache per request.

The portable fallback for architectures tandem/engine/llama.py does not cover. It feeds requests one
at a time (transformers' caches hold one length per batch, and a ragged batch of caches would
need per-architecture masking), so it is correct everywhere and fast nowhere.
"""
from __future__ import annotations

import torch
from transformers import DynamicCache

from tandem.engine.base import Engine


class HFEngine(Engine):
    def __init__(self, hf_model, max_slots: int, max_context: int | None = None) -> None:
        super().__init__(max_slots)
        self.model = hf_model.eval()
        cfg = hf_model.config
        self.vocab_size = cfg.vocab_size
        self.device = next(hf_model.parameters()).device
        limit = getattr(cfg, "max_position_embeddings", None) or 2048
        self.max_context = min(limit, max_context or limit)
        self._caches: dict[int, DynamicCache] = {}

    def _truncate(self, slot: int, length: int) -> None:
        cache = self._caches.get(slot)
        if cache is None:
            return
        if length == 0:
            del self._caches[slot]
            return
        for layer in cache.layers:  # [1, heads, T, D] per layer
            layer.keys = layer.keys[:, :, :length]
            layer.values = layer.values[:, :, :length]

    def prefill_cost(self, rows: int, longest: int, span: int, logits: int) -> float:
        """Each row runs alone, padded to nothing: any grouping costs the same, so none is made."""
        return 1.0

    @torch.inference_mode()
    def _forward(self, slots, starts, tokens, num_logits) -> torch.Tensor:
        rows = []
        for slot, start, toks, n in zip(slots, starts, tokens, num_logits):
            cache = self._caches.setdefault(slot, DynamicCache(config=self.model.config))
            assert cache.get_seq_length() == start, f"cache holds {cache.get_seq_length()}, expected {start}"
            ids = torch.tensor([toks], device=self.device)
            positions = torch.arange(start, start + len(toks), device=self.device).unsqueeze(0)
            out = self.model(input_ids=ids, past_key_values=cache, position_ids=positions, use_cache=True)
            rows.append(out.logits[0, -n:])
        return torch.cat(rows)
