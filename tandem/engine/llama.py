"""Batched engine for Llama-family checkpoints (Llama, Mistral, Qwen2/3) with a slot KV cache.

One forward serves a ragged batch: request b feeds q_b new tokens at positions
start_b .. start_b+q_b-1 of its own slot. The batch is padded to Q = max q_b; padded rows
write their K/V into a scratch column past the end of every slot and are masked out.

The layer is written for speed on GPUs (docs/design.md §7): q/k/v and gate/up are each one fused
matrix, and the elementwise work is three fused kernels (tandem/kernels/layer_ops.py: residual add +
RMSNorm, RoPE + KV-cache write, SiLU·mul) and attention reads K/V straight from the slots
(tandem/kernels/attention.py; on CPU: a gather and SDPA). On CUDA, decode and verify shapes (batch and query
length bucketed, attention span bucketed) replay CUDA graphs (tandem/engine/graphs.py); prefill and
other large shapes run eagerly. Rotary embeddings are transformers' own module, so any RoPE
scaling the checkpoint uses is computed by transformers.
exact=True: every matmul at one shape, attention at one tile shape, tensor-parallel sums in rank
order, so a position's logits are the same bits whatever else the forward computes
(tandem/kernels/exact.py).
Checked against transformers' own forward and generate in tests/test_engines.py.
"""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F

from tandem.engine.base import FORWARD_TOKENS, Engine
from tandem.engine.layout import HostBatch, Shape
from tandem.kernels._triton import pick_triton
from tandem.errors import TandemError
from tandem.kernels.attention import slot_attention, slot_attention_reference
from tandem.kernels.exact import EXACT_ROWS, fixed_rows_linear, ordered_all_reduce, pad_rows
from tandem.kernels.layer_ops import rms_norm, rope_and_cache, silu_mul
from tandem.models import BATCH_DEPENDENT_ROPE, NATIVE_MODEL_TYPES, rope_type

SUPPORTED_MODEL_TYPES = NATIVE_MODEL_TYPES
# An eager forward's host time (launches, cuBLAS's per-shape heuristics: ~14 ms for a 24-layer
# target on an H200) in fed tokens' worth (Engine.prefill_cost).
EAGER_FORWARD_TOKENS = 3000
EXACT_REF_ROWS = 8  # rows per call of exact mode's CPU attention (_exact_reference)


class LlamaEngine(Engine):
    drafts_windows = True

    def __init__(
        self, hf_model, max_slots: int, max_context: int | None = None, tp_group=None, cuda_graphs: bool | None = None,
        exact: bool = False, exact_rows: int = EXACT_ROWS, exact_tiles: bool = False,
    ) -> None:
        super().__init__(max_slots)
        self.exact, self.exact_rows = exact, exact_rows  # exact: every matmul in blocks of exact_rows rows
        self.exact_tiles = exact_tiles  # exact, on CUDA: each matmul one fixed-tile launch instead (kernels/exact.py)
        rope = rope_type(hf_model.config.to_dict())
        if exact and rope in BATCH_DEPENDENT_ROPE:
            raise TandemError(f"exact mode cannot run a {rope!r} RoPE: its angles follow the longest sequence in the batch")
        self.tp_group = tp_group  # set: the model is sharded (tandem/engine/tensor_parallel.py)
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
        self.num_heads = cfg.num_attention_heads // tp
        self.num_kv_heads = cfg.num_key_value_heads // tp
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.eps = cfg.rms_norm_eps
        self.layers = [_FusedLayer.of(layer) for layer in hf_model.model.layers]
        dtype = next(hf_model.parameters()).dtype
        # [layers, slots + 1 scratch slot, positions + 1 scratch column, kv_heads, head_dim]
        shape = (cfg.num_hidden_layers, max_slots + 1, self.max_context + 1, self.num_kv_heads, self.head_dim)
        self.k_cache = torch.zeros(shape, dtype=dtype, device=self.device)
        self.v_cache = torch.zeros(shape, dtype=dtype, device=self.device)
        self.fp32_logits = _has_fp32_output_mm(self.device, dtype) and self.model.lm_head.bias is None
        # TANDEM_TRITON_ATTENTION=0: gather + SDPA instead of the slot-attention kernel (to rule it
        # out when an output looks wrong); read here, once, not per forward.
        self.triton_attention = os.environ.get("TANDEM_TRITON_ATTENTION", "1") != "0"
        if exact and self.device.type == "cuda" and not (self.triton_attention and pick_triton(self.k_cache, None)):
            raise TandemError("exact mode needs the Triton attention kernel on CUDA (Triton installed, "
                              "TANDEM_TRITON and TANDEM_TRITON_ATTENTION not 0): SDPA picks kernels by shape")
        if cuda_graphs is None:
            cuda_graphs = self.device.type == "cuda" and tp_group is None
        # cuda_graphs=True off CUDA runs the same bucketed, padded path without capture (tests).
        self.graphs = None
        if cuda_graphs:
            from tandem.engine.graphs import PREFILL_BATCH, GraphRunner

            self.graphs = GraphRunner(self, max_slots)
            self.prefill_group = PREFILL_BATCH  # prompts beyond a graph's batch: more graphed prefills

    def prefill_cost(self, rows: int, longest: int, span: int, logits: int) -> float:
        """A graphed forward costs its bucket's rectangle; an eager one its rows plus the host's
        launch time (24 layers: ~14 ms on an H200, EAGER_FORWARD_TOKENS)."""
        if self.graphs is not None:
            bucket = self.graphs.bucket(Shape(rows, longest, span), logits)
            if bucket is not None:
                return FORWARD_TOKENS + bucket.batch * bucket.query
        return EAGER_FORWARD_TOKENS + rows * longest

    def forward_rows(self, batch: int, query: int) -> int:
        """The rectangle a forward computes: its graph bucket's (a verify of 64 requests with
        drafts of 5 runs 64 x 8 rows, as one with drafts of 7), in exact mode whole blocks of rows."""
        rows = batch * query
        if self.graphs is not None:  # a verify asks every row's logits: over a prompt graph's, eager
            bucket = self.graphs.bucket(Shape(batch, query, 1), batch * query)
            if bucket is not None:
                rows = bucket.batch * bucket.query
        return -(-rows // self.exact_rows) * self.exact_rows if self.exact else rows

    def _truncate(self, slot: int, length: int) -> None:
        pass  # positions past a slot's length are never read: the mask stops at the length

    @torch.inference_mode()
    def _forward(self, slots, starts, tokens, num_logits) -> torch.Tensor:
        shape = Shape.of(starts, tokens)
        if self.graphs is not None:
            bucket = self.graphs.bucket(shape, sum(num_logits))
            if bucket is not None:
                batch = HostBatch.build(slots, starts, tokens, num_logits, bucket, self.scratch)
                return self.graphs.run(bucket, batch)
        batch = HostBatch.build(slots, starts, tokens, num_logits, shape, self.scratch)
        ids, positions, write_positions, slot_ids, rows = batch.to(self.device)
        return self.run(ids, positions, write_positions, slot_ids, shape.span, rows)

    @property
    def scratch(self) -> tuple[int, int]:
        """(slot, column) that padding writes to and nothing reads."""
        return self.max_slots, self.max_context

    def run(self, ids, positions, write_positions, slot_ids, span: int, rows=None) -> torch.Tensor:
        """The model on a padded batch, all on the device (so a CUDA graph can capture it).

        ids / positions / write_positions [B, Q] int64, slot_ids [B]; keys 0..span-1 are
        attended (span >= every end). Returns logits [len(rows), V], or [B*Q, V] if rows is None.
        """
        inner = self.model.model
        q_len = ids.shape[1]
        x = inner.embed_tokens(ids)  # [B, Q, hidden]
        cos, sin = inner.rotary_emb(x, positions)  # [B, Q, head_dim]
        cos, sin = cos.flatten(0, 1), sin.flatten(0, 1)  # [N, D], N = B*Q
        token_slots = slot_ids.repeat_interleave(q_len)  # [N] (a real copy: kernels index it)
        write_positions = write_positions.flatten()
        if pick_triton(ids, None) and self.triton_attention:
            # one kernel reads K/V straight from the slots
            flat_positions = positions.flatten()
            attend = functools.partial(
                slot_attention, slots=token_slots, positions=flat_positions, span=span, query_len=q_len,
                exact=self.exact)
        elif self.exact:  # (CPU) every row against the whole context, in a shape no step changes
            attend = functools.partial(self._exact_reference, slots=token_slots, positions=positions.flatten())
        else:  # gather each request's keys, then SDPA with a causal mask by position
            keys = torch.arange(span, device=ids.device)
            mask = (keys[None, None, :] <= positions[:, :, None]).unsqueeze(1)  # [B, 1, Q, span]
            attend = functools.partial(self._sdpa, slot_ids=slot_ids, span=span, mask=mask)
        x = x.flatten(0, 1)  # [N, hidden]
        n = x.shape[0]
        attended = None
        if self.exact:  # whole blocks of exact_rows rows, padded once here, not in every matmul
            x = pad_rows(x, self.exact_rows)  # the padding rows (zeros) never mix with real ones
            attended = x.new_zeros(x.shape[0], self.num_heads * self.head_dim)
        residual = None
        for i, layer in enumerate(self.layers):
            h, residual = rms_norm(x, layer.input_norm, self.eps, residual)
            qkv = self._linear(h, layer.qkv, layer.qkv_bias)  # [N, (H + 2 kvH) D]
            if layer.q_norm is not None:  # Qwen3 normalises q and k per head before RoPE
                qkv = self._qk_norm(layer, qkv)
            q = rope_and_cache(
                qkv[:n], self.num_heads, self.num_kv_heads, self.head_dim, cos, sin,
                self.k_cache[i], self.v_cache[i], token_slots, write_positions,
            )  # [N, H, D]
            out = attend(q, self.k_cache[i], self.v_cache[i])  # [N, H*D]
            if attended is not None:  # back to whole blocks for o_proj
                attended[:n].copy_(out)
                out = attended
            x = self._reduce(self._linear(out, layer.o_proj))
            h, residual = rms_norm(x, layer.post_norm, self.eps, residual)
            x = self._reduce(self._linear(silu_mul(self._linear(h, layer.gate_up)), layer.down))
        if rows is not None:
            x, residual = x[rows], residual[rows]
        elif self.exact:
            x, residual = x[:n], residual[:n]
        h, _ = rms_norm(x, inner.norm.weight, inner.norm.variance_epsilon, residual)
        head = self.model.lm_head
        if self.exact:
            return fixed_rows_linear(h, head.weight, head.bias, torch.float32 if self.fp32_logits else None,
                                     self.exact_rows, self.exact_tiles)
        if self.fp32_logits:  # bf16 logits tie often (0.0625 apart near 10): keep the argmax stable
            return torch.mm(h, head.weight.t(), out_dtype=torch.float32)
        return head(h)

    def _linear(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        if self.exact:
            return fixed_rows_linear(x, weight, bias, block=self.exact_rows, tiles=self.exact_tiles)
        return F.linear(x, weight, bias)

    def _exact_reference(self, q, k_cache, v_cache, slots, positions) -> torch.Tensor:  # [N, H*D]
        """Exact mode off the Triton path: the reference attention over the whole context, in
        blocks of EXACT_REF_ROWS rows (the last padded with row 0), so every call has one shape
        and memory stays at a block's gather (rows x context x heads x dim)."""
        n, block = q.shape[0], EXACT_REF_ROWS
        out = q.new_empty(n, q.shape[1] * q.shape[2])
        for start in range(0, n, block):
            rows = torch.arange(start, start + block, device=q.device).clamp_max(n - 1)
            part = slot_attention_reference(q[rows], k_cache, v_cache, slots[rows], positions[rows], self.max_context)
            out[start : start + block] = part[: min(block, n - start)]
        return out

    def _sdpa(self, q, k_cache, v_cache, slot_ids, span: int, mask) -> torch.Tensor:  # [N, H*D]
        bsz, q_len = mask.shape[0], mask.shape[2]
        k_all = k_cache[slot_ids, :span].transpose(1, 2)  # [B, kvH, span, D]
        v_all = v_cache[slot_ids, :span].transpose(1, 2)
        out = F.scaled_dot_product_attention(
            q.view(bsz, q_len, self.num_heads, self.head_dim).transpose(1, 2), k_all, v_all,
            attn_mask=mask, enable_gqa=self.num_kv_heads != self.num_heads,
        )  # [B, H, Q, D]
        return out.transpose(1, 2).reshape(bsz * q_len, -1)

    def _qk_norm(self, layer: _FusedLayer, qkv: torch.Tensor) -> torch.Tensor:
        n, d = qkv.shape[0], self.head_dim
        q, k, v = qkv.split([self.num_heads * d, self.num_kv_heads * d, self.num_kv_heads * d], dim=-1)
        if self.exact:  # one head row per program (torch's reductions pick their plan by size)
            q = rms_norm(q.reshape(-1, d), layer.q_norm.weight, layer.q_norm.variance_epsilon)[0].view(n, -1)
            k = rms_norm(k.reshape(-1, d), layer.k_norm.weight, layer.k_norm.variance_epsilon)[0].view(n, -1)
            return torch.cat([q, k, v], dim=-1)
        q = layer.q_norm(q.view(n, -1, d)).flatten(1)
        k = layer.k_norm(k.view(n, -1, d)).flatten(1)
        return torch.cat([q, k, v], dim=-1)

    def _reduce(self, partial: torch.Tensor) -> torch.Tensor:
        """Row-parallel blocks leave partial sums on each rank: one all-reduce per block."""
        if self.tp_group is not None:
            if self.exact:
                return ordered_all_reduce(partial, self.tp_group)
            dist.all_reduce(partial, group=self.tp_group)
        return partial


def _has_fp32_output_mm(device: torch.device, dtype: torch.dtype) -> bool:
    """16-bit weights, fp32 logits straight from the matmul (CUDA's mm out_dtype)."""
    if device.type != "cuda" or dtype not in (torch.bfloat16, torch.float16):
        return False
    try:
        a = torch.ones(2, 2, dtype=dtype, device=device)
        return torch.mm(a, a, out_dtype=torch.float32).dtype == torch.float32
    except (RuntimeError, TypeError, NotImplementedError):
        return False


@dataclass
class _FusedLayer:
    """One decoder layer's weights, q/k/v and gate/up each fused into one matrix.

    The transformers modules' own weights become views into the fused ones, so nothing is
    stored twice and the HF model still runs as before.
    """

    input_norm: torch.Tensor
    post_norm: torch.Tensor
    qkv: torch.Tensor  # [(H + 2 kvH) D, hidden]
    qkv_bias: torch.Tensor | None
    o_proj: torch.Tensor
    gate_up: torch.Tensor  # [2 I, hidden]
    down: torch.Tensor
    q_norm: torch.nn.Module | None  # Qwen3's per-head norms of q and k (None elsewhere)
    k_norm: torch.nn.Module | None

    @staticmethod
    def of(layer) -> _FusedLayer:
        attn, mlp = layer.self_attn, layer.mlp
        qkv = _fuse([attn.q_proj, attn.k_proj, attn.v_proj], "weight")
        bias = _fuse([attn.q_proj, attn.k_proj, attn.v_proj], "bias") if attn.q_proj.bias is not None else None
        gate_up = _fuse([mlp.gate_proj, mlp.up_proj], "weight")
        assert attn.o_proj.bias is None and mlp.down_proj.bias is None, "biased o_proj / down_proj"
        return _FusedLayer(
            layer.input_layernorm.weight, layer.post_attention_layernorm.weight, qkv, bias,
            attn.o_proj.weight, gate_up, mlp.down_proj.weight, getattr(attn, "q_norm", None), getattr(attn, "k_norm", None),
        )


def _fuse(linears, name: str) -> torch.Tensor:
    """Concatenate the modules' weights (or biases) by output feature; point each module at its slice."""
    fused = torch.cat([getattr(m, name).data for m in linears], dim=0)
    offset = 0
    for m in linears:
        param = getattr(m, name)
        n = param.shape[0]
        param.data = fused[offset : offset + n]
        offset += n
    return fused
