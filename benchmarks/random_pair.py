"""A benchmark-shaped pair with random weights, saved as checkpoints (for timing only).

    python benchmarks/random_pair.py --out /tmp/rand     # /tmp/rand/{target,draft}

The zoo's bench preset shapes (target 24 x 2048, ~1.1B; draft 4 x 1024) with the shipped tiny
pair's tokenizer, built on the GPU in bf16 and saved in Hugging Face format: what the cluster
path needs to be timed without the minutes a trained pair takes. Random weights draft badly,
so only AR and per-step costs mean anything here; acceptance needs `tandem zoo --preset bench`.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch

from tandem import zoo
from tandem.engine.pair import load_tokenizer


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--preset", default="bench")
    args = ap.parse_args(argv)
    tokenizer = load_tokenizer("tandem:tiny/target")
    preset = dataclasses.replace(zoo.presets()[args.preset], vocab_size=len(tokenizer))
    for seed, (name, shape) in enumerate((("target", preset.target), ("draft", preset.draft))):
        with torch.device(args.device):
            model = zoo.build_model(shape, preset, seed=seed).to(torch.bfloat16)
        model.save_pretrained(args.out / name)
        tokenizer.save_pretrained(args.out / name)
        print(f"{args.out / name}: {zoo.n_params(model) / 1e6:.1f} M params", flush=True)
        del model
    return 0


if __name__ == "__main__":
    sys.exit(main())
