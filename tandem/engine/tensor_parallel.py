"""Tensor parallelism for the native Llama engine (Megatron-style, docs/design.md §7).

Each rank keeps a slice of every attention and MLP block: q/k/v and gate/up are split by output
features (column parallel, whole heads per rank), o_proj and down_proj by input features (row
parallel), so each block needs one all-reduce of its output. Embeddings, norms and the LM head
are replicated. The leader (TP rank 0) runs the step logic and broadcasts each engine call; the
other ranks replay it (`follow`), so every rank feeds the same tokens into the same slots.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn


def shard_llama(hf_model, rank: int, world: int) -> None:
    """Cut the model's linear layers down to this rank's slice, in place."""
    cfg = hf_model.config
    kv = cfg.num_key_value_heads
    assert cfg.num_attention_heads % world == 0 and kv % world == 0, f"TP {world} vs heads {cfg.num_attention_heads}/{kv}"
    for layer in hf_model.model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        for name in ("q_proj", "k_proj", "v_proj"):
            setattr(attn, name, _column_slice(getattr(attn, name), rank, world))
        attn.o_proj = _row_slice(attn.o_proj, rank, world)
        mlp.gate_proj = _column_slice(mlp.gate_proj, rank, world)
        mlp.up_proj = _column_slice(mlp.up_proj, rank, world)
        mlp.down_proj = _row_slice(mlp.down_proj, rank, world)


def _column_slice(linear: nn.Linear, rank: int, world: int) -> nn.Linear:
    """Output features [rank·n/world, (rank+1)·n/world): weight rows (and bias) of this rank."""
    out_features = linear.out_features // world
    rows = slice(rank * out_features, (rank + 1) * out_features)
    new = nn.Linear(linear.in_features, out_features, bias=linear.bias is not None,
                    device=linear.weight.device, dtype=linear.weight.dtype)
    with torch.no_grad():
        new.weight.copy_(linear.weight[rows])
        if linear.bias is not None:
            new.bias.copy_(linear.bias[rows])
    return new


def _row_slice(linear: nn.Linear, rank: int, world: int) -> nn.Linear:
    """Input features of this rank; the bias is added once (rank 0) so the all-reduce sums it once."""
    in_features = linear.in_features // world
    cols = slice(rank * in_features, (rank + 1) * in_features)
    new = nn.Linear(in_features, linear.out_features, bias=linear.bias is not None,
                    device=linear.weight.device, dtype=linear.weight.dtype)
    with torch.no_grad():
        new.weight.copy_(linear.weight[:, cols])
        if linear.bias is not None:
            new.bias.copy_(linear.bias if rank == 0 else torch.zeros_like(linear.bias))
    return new


class TPLeader:
    """The engine the step logic sees on TP rank 0: every call is broadcast to the other ranks."""

    def __init__(self, engine, group, src: int) -> None:
        self.engine, self.group, self.src = engine, group, src
        self.vocab_size, self.max_context, self.device = engine.vocab_size, engine.max_context, engine.device

    @property
    def free_slots(self) -> int:
        return self.engine.free_slots

    def _replay(self, op: str, *args):
        dist.broadcast_object_list([op, args], src=self.src, group=self.group)
        return getattr(self.engine, op)(*args) if op != "stop" else None

    def allocate(self) -> int:
        slot = self.engine.allocate()
        dist.broadcast_object_list(["allocate_slot", (slot,)], src=self.src, group=self.group)
        return slot

    def release(self, slot: int) -> None:
        self._replay("release", slot)

    def forward(self, slots, seqs, num_logits) -> torch.Tensor:
        return self._replay("forward", slots, seqs, num_logits)

    def forward_rows(self, batch: int, query: int) -> int:
        """Rank 0's answer (every rank pads alike); nothing to tell the others."""
        return self.engine.forward_rows(batch, query)

    def close(self) -> None:
        """Release the other ranks (they return from `follow`)."""
        self._replay("stop")


def follow(engine, group, src: int) -> None:
    """TP rank > 0: replay the leader's engine calls until it says stop."""
    while True:
        msg = [None, None]
        dist.broadcast_object_list(msg, src=src, group=group)
        op, args = msg
        if op == "stop":
            return
        getattr(engine, op)(*args)
