"""Batched engine for Llama-family checkpoints (Llama, Mistral, Qwen2/3) with a slot KV cache.

One forward serves a ragged batch: request b feeds q_b new tokens at positions
start_b .. start_b+q_b-1 of its own slot. The batch is padded to Q = max q_b; padded rows
write their K/V into a scratch column past the end of every slot and are masked out.

Weights and rotary embeddings are the transformers modules themselves (so any RoPE scaling the
checkpoint uses is computed by transformers); this file only owns the cache and the attention.
Checked against transformers' own forward and generate in tests/test_engines.py.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from actors.engine import Engine

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")


class LlamaEngine(Engine):
    def __init__(self, hf_model, max_slots: int, max_context: int | None = None, tp_group=None) -> None:
        super().__init__(max_slots)
        self.tp_group = tp_group  # set: the model is sharded (actors/tensor_parallel.py)
        tp = dist.get_world_size(tp_group) if tp_group is not None else 1
        cfg = hf_model.config
        assert cfg.model_type in SUPPORTED_MODEL_TYPES, f"model_type {cfg.model_type!r}"
        self.model = hf_model.eval()
        self.vocab_size = cfg.vocab_size
        self.device = next(hf_model.parameters()).device
        limit = cfg.max_position_embeddings
        if getattr(cfg, "sliding_window", None) and getattr(cfg, "use_sliding_window", True):
            limit = min(limit, cfg.sliding_window)  # no sliding-window attention here: cap instead
        self.max_context = min(limit, max_context or limit)
        self.num_kv_heads = cfg.num_key_value_heads // tp
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        dtype = next(hf_model.parameters()).dtype
        # [layers, slots, positions + 1 scratch, kv_heads, head_dim]
        shape = (cfg.num_hidden_layers, max_slots, self.max_context + 1, self.num_kv_heads, self.head_dim)
        self.k_cache = torch.zeros(shape, dtype=dtype, device=self.device)
        self.v_cache = torch.zeros(shape, dtype=dtype, device=self.device)

    def _truncate(self, slot: int, length: int) -> None:
        pass  # positions past a slot's length are never read: the mask stops at the length

    @torch.inference_mode()
    def _forward(self, slots, starts, tokens, num_logits) -> torch.Tensor:
        batch = _pad_batch(starts, tokens, self.max_context, self.device)
        inner = self.model.model
        x = inner.embed_tokens(batch.token_ids)  # [B, Q, hidden]
        cos, sin = inner.rotary_emb(x, batch.positions)  # [B, Q, head_dim]
        slot_ids = torch.tensor(slots, device=self.device)
        mask = batch.attention_mask()  # [B, 1, Q, Tk]
        for i, layer in enumerate(inner.layers):
            h = layer.input_layernorm(x)
            x = x + self._reduce(self._attention(i, layer.self_attn, h, cos, sin, slot_ids, batch, mask))
            x = x + self._reduce(layer.mlp(layer.post_attention_layernorm(x)))
        rows = batch.logit_rows(num_logits)  # [N] flat indices into [B*Q]
        x = inner.norm(x.flatten(0, 1)[rows])
        return self.model.lm_head(x)

    def _reduce(self, partial: torch.Tensor) -> torch.Tensor:
        """Row-parallel blocks leave partial sums on each rank: one all-reduce per block."""
        if self.tp_group is not None:
            dist.all_reduce(partial, group=self.tp_group)
        return partial

    def _attention(self, i, attn, h, cos, sin, slot_ids, batch, mask) -> torch.Tensor:
        bsz, q_len, _ = h.shape
        q = attn.q_proj(h).view(bsz, q_len, -1, self.head_dim)  # [B, Q, H, D]
        k = attn.k_proj(h).view(bsz, q_len, -1, self.head_dim)  # [B, Q, kvH, D]
        v = attn.v_proj(h).view(bsz, q_len, -1, self.head_dim)
        if hasattr(attn, "q_norm"):  # Qwen3 normalises q and k per head before RoPE
            q, k = attn.q_norm(q), attn.k_norm(k)
        q, k = _rope(q, cos, sin), _rope(k, cos, sin)
        write = (slot_ids.unsqueeze(1), batch.write_positions)  # ([B,1], [B,Q])
        self.k_cache[i][write] = k
        self.v_cache[i][write] = v
        tk = mask.shape[-1]
        keys = self.k_cache[i][slot_ids, :tk].transpose(1, 2)  # [B, kvH, Tk, D]
        values = self.v_cache[i][slot_ids, :tk].transpose(1, 2)
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2), keys, values, attn_mask=mask,
            enable_gqa=keys.shape[1] != q.shape[2],
        )  # [B, H, Q, D]
        return attn.o_proj(out.transpose(1, 2).reshape(bsz, q_len, -1))


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, Q, H, D], cos/sin [B, Q, D]: rotate pairs (i, i + D/2), as transformers does."""
    cos, sin = cos.unsqueeze(2), sin.unsqueeze(2)
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


class _PaddedBatch:
    """A ragged batch padded to Q = max(q_b) query tokens per request."""

    def __init__(self, token_ids, positions, valid, ends, scratch) -> None:
        self.token_ids = token_ids  # [B, Q] int64
        self.positions = positions  # [B, Q] int64: start_b + j
        self.valid = valid  # [B, Q] bool: j < q_b
        self.ends = ends  # [B] int64: start_b + q_b
        self.write_positions = torch.where(valid, positions, scratch)  # padding -> scratch column

    def attention_mask(self) -> torch.Tensor:  # [B, 1, Q, Tk] bool, True = attend
        tk = int(self.ends.max())
        keys = torch.arange(tk, device=self.positions.device)
        return (keys[None, None, :] <= self.positions[:, :, None]).unsqueeze(1)

    def logit_rows(self, num_logits: list[int]) -> torch.Tensor:  # [sum(num_logits)]
        """Flat indices of the last num_logits[b] valid rows of each request."""
        q = self.token_ids.shape[1]
        lens = self.valid.sum(1).tolist()
        rows = [b * q + j for b, (n, k) in enumerate(zip(lens, num_logits)) for j in range(n - k, n)]
        return torch.tensor(rows, device=self.token_ids.device)


def _pad_batch(starts, tokens, scratch: int, device) -> _PaddedBatch:
    q = max(len(t) for t in tokens)
    ids = torch.zeros(len(tokens), q, dtype=torch.long)
    for b, t in enumerate(tokens):
        ids[b, : len(t)] = torch.tensor(t, dtype=torch.long)
    lens = torch.tensor([len(t) for t in tokens])
    start = torch.tensor(starts)
    positions = start[:, None] + torch.arange(q)[None, :]
    valid = torch.arange(q)[None, :] < lens[:, None]
    return _PaddedBatch(ids.to(device), positions.to(device), valid.to(device), (start + lens).to(device), scratch)
