"""Load a target/draft checkpoint pair from local folders into engines, with clear errors."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch

from tandem.engine.base import Engine
from tandem.errors import TandemError
from tandem.models import resolve

EngineKind = Literal["auto", "native", "hf"]
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class ModelPair:
    tokenizer: object  # transformers PreTrainedTokenizerBase
    target: Engine
    draft: Engine
    # AdaEDL's acceptance by draft entropy, learned by every drafter this pair's draft serves
    # (tandem/spec/adaedl.py): kept here so in-process generate() calls go on learning.
    acceptance: dict = field(default_factory=dict)
    # The step-cost fits and acceptance of "auto" requests (tandem/spec/load_control.py), likewise.
    controller: object = None

    @property
    def stop_ids(self) -> set[int]:
        eos = self.tokenizer.eos_token_id
        return set() if eos is None else {int(eos)}


def load_pair(
    target: str | Path,
    draft: str | Path,
    device: str = "cpu",
    dtype: str = "float32",
    engine: EngineKind = "auto",
    max_slots: int = 8,
    max_context: int | None = None,
    cuda_graphs: bool | None = None,
    draft_device: str | None = None,
    exact: bool = False,
) -> ModelPair:
    """Both engines of a pair. cuda_graphs: None = on for the native engine on CUDA.
    draft_device: put the draft on another device (e.g. "cuda:1"); default: `device`.
    exact: the target's logits independent of batch and draft length (tandem/kernels/exact.py);
    the draft needs no such thing (the output is the target's whatever it proposes)."""
    tokenizer = load_tokenizer(target)
    target_cfg, draft_cfg = read_config(target), read_config(draft)
    if target_cfg.get("vocab_size") != draft_cfg.get("vocab_size"):
        raise TandemError(
            f"draft and target vocabularies differ: target {target} has vocab_size "
            f"{target_cfg.get('vocab_size')}, draft {draft} has {draft_cfg.get('vocab_size')}"
        )
    _check_same_tokenizer(tokenizer, draft)
    kwargs = {"dtype": dtype, "engine": engine, "max_slots": max_slots, "max_context": max_context, "cuda_graphs": cuda_graphs}
    return ModelPair(
        tokenizer, load_engine(target, device=device, exact=exact, **kwargs),
        load_engine(draft, device=draft_device or device, **kwargs),
    )


def read_config(path: str | Path) -> dict:
    """config.json of a checkpoint folder (or `tandem:<name>`, tandem/models/)."""
    path = resolve(path)
    if not path.is_dir():
        raise TandemError(f"model path {str(path)!r} is not a folder (nothing is downloaded; give a local checkpoint)")
    config = path / "config.json"
    if not config.is_file():
        raise TandemError(f"model path {str(path)!r} has no config.json: not a Hugging Face checkpoint")
    return json.loads(config.read_text())


def load_tokenizer(path: str | Path):
    from transformers import AutoTokenizer

    read_config(path)
    path = resolve(path)
    try:
        return AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError, TypeError) as e:
        raise TandemError(f"checkpoint {str(path)!r} has no usable tokenizer ({type(e).__name__}: {e})") from None


def _check_same_tokenizer(tokenizer, draft: str | Path) -> None:
    """A draft that ships its own tokenizer must agree with the target's token for token."""
    has_own = any((resolve(draft) / f).exists() for f in ("tokenizer.json", "tokenizer_config.json", "vocab.json"))
    if has_own and load_tokenizer(draft).get_vocab() != tokenizer.get_vocab():
        raise TandemError(f"draft and target vocabularies differ: {draft} has another tokenizer")


def load_engine(
    path: str | Path, device: str, dtype: str, engine: EngineKind, max_slots: int, max_context: int | None,
    cuda_graphs: bool | None = None, exact: bool = False,
) -> Engine:
    from tandem.engine.hf_engine import HFEngine
    from tandem.engine.llama import SUPPORTED_MODEL_TYPES, LlamaEngine

    cfg = read_config(path)
    native = cfg.get("model_type") in SUPPORTED_MODEL_TYPES
    if engine == "native" and not native:
        raise TandemError(f"the native engine supports {SUPPORTED_MODEL_TYPES}, not {cfg.get('model_type')!r}")
    if exact and (not native or engine == "hf"):
        raise TandemError(f"exact mode needs the native engine (Llama family), not {cfg.get('model_type')!r} on "
                          f"engine {engine!r}")
    model = load_hf_model(path, device, dtype)
    if native and engine != "hf":
        return LlamaEngine(model, max_slots=max_slots, max_context=max_context, cuda_graphs=cuda_graphs, exact=exact)
    return HFEngine(model, max_slots=max_slots, max_context=max_context)


def load_hf_model(path: str | Path, device: str, dtype: str):
    """The transformers model, from local files only, on `device`."""
    from transformers import AutoModelForCausalLM

    read_config(path)
    path = resolve(path)
    if dtype not in DTYPES:
        raise TandemError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    try:
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=DTYPES[dtype], local_files_only=True)
    except (OSError, ValueError, KeyError) as e:
        raise TandemError(f"cannot load the model in {str(path)!r}: {e}") from None
    return model.to(device)
