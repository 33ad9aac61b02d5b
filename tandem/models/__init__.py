"""Checkpoints that ship inside the package, and how a model path names one.

A model path is a local folder (config.json, safetensors, tokenizer), or `tandem:<name>` for a
folder shipped here: `tandem:tiny/target` and `tandem:tiny/draft` are the tiny pair the project
trained itself (tiny/README.md says how), the embedded default of the CLI and the deploy configs.
Nothing is ever downloaded.
"""
from __future__ import annotations

from pathlib import Path

SHIPPED = Path(__file__).resolve().parent
PREFIX = "tandem:"
TINY_TARGET = f"{PREFIX}tiny/target"
TINY_DRAFT = f"{PREFIX}tiny/draft"
NATIVE_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")  # what the native engine runs (tandem/engine/llama.py)
# RoPE scalings whose angles follow the longest sequence in the forward (transformers' dynamic
# update): a position's embedding then depends on the batch, which exact mode cannot allow
BATCH_DEPENDENT_ROPE = ("dynamic", "longrope")


def rope_type(config: dict) -> str:
    """The RoPE type a checkpoint's config.json names ("default" when none)."""
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    return str(rope.get("rope_type") or rope.get("type") or "default")


def resolve(path: str | Path) -> Path:
    """The folder a model path names (`tandem:<name>`: inside this package; else as given)."""
    text = str(path)
    if text.startswith(PREFIX):
        return SHIPPED / text[len(PREFIX):]
    return Path(text)
