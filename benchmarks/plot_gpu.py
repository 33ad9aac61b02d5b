"""Plots of gpu_bench.json (and hbm_floor.json beside it, if there), written as PNGs next to it.

    python benchmarks/plot_gpu.py                                  # benchmarks/results/gpu_bench.json
    python benchmarks/plot_gpu.py path/to/gpu_bench.json --hbm path/to/hbm_floor.json

Runs where matplotlib is installed (`pip install -e '.[bench]'`), not on the GPU machine.
  <stem>_tokens_per_s.png   batch-1 tokens/s by mode, one panel per temperature; lines: tandem AR,
                            HF generate, HF assisted, and the HBM floor's AR ceiling if known
  <stem>_concurrency.png    aggregate tokens/s and mean request latency against concurrency
  <stem>_steps.png          where a step's time goes (draft / verify / wait / exchange), T=0
  <stem>_hbm_floor.png      ms/token of tandem and HF generate against the floor (hbm_floor.json)
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt

REPO = Path(__file__).resolve().parent.parent
HF_LINES = {"tandem ar": ("black", "-"), "hf generate": ("tab:red", "--"), "hf assisted": ("tab:purple", ":")}


def ok_rows(data: dict, section: str) -> list[dict]:
    return [r for r in data.get(section, {}).get("rows", []) if "tokens_per_s" in r]


def plot_tokens_per_s(data: dict, floor_ms: float | None, path: Path) -> Path | None:
    sections = sorted(k for k in data if k.startswith("latency_") and ok_rows(data, k))
    if not sections:
        return None
    fig, axes = plt.subplots(1, len(sections), figsize=(7 * len(sections), 5), squeeze=False)
    for ax, section in zip(axes[0], sections):
        rows = ok_rows(data, section)
        bars = [r for r in rows if r["engine"] == "tandem" and r["name"] != "tandem ar"]
        ax.bar(range(len(bars)), [r["tokens_per_s"] for r in bars], color=[_color(r) for r in bars])
        ax.set_xticks(range(len(bars)), [r["name"] for r in bars], rotation=40, ha="right", fontsize=8)
        for i, r in enumerate(bars):
            if r.get("speedup_vs_ar"):
                ax.annotate(f"{r['speedup_vs_ar']:.2f}x", (i, r["tokens_per_s"]), ha="center", va="bottom", fontsize=7)
        for r in rows:
            if r["name"] in HF_LINES:
                color, style = HF_LINES[r["name"]]
                ax.axhline(r["tokens_per_s"], color=color, linestyle=style, label=f"{r['name']} ({r['tokens_per_s']:.0f})")
        if floor_ms and section.endswith("_t0"):
            ax.axhline(1000 / floor_ms, color="tab:gray", linestyle="-.", label=f"AR at the HBM floor ({1000 / floor_ms:.0f})")
        ax.set_title(f"batch 1, T={rows[0]['temperature']:g}")
        ax.set_ylabel("tokens/s")
        ax.legend(fontsize=7)
    fig.suptitle(_title(data), fontsize=9)
    return _save(fig, path)


COLORS = {("sd", False): "tab:blue", ("sd", True): "tab:cyan", ("pearl", False): "tab:green", ("pearl", True): "tab:olive"}


def _color(r: dict) -> str:
    return COLORS.get((r.get("mode"), bool(r.get("adaedl"))), "tab:gray")


def plot_concurrency(data: dict, path: Path) -> Path | None:
    rows = ok_rows(data, "concurrency")
    if not rows:
        return None
    fig, (tput, lat) = plt.subplots(1, 2, figsize=(12, 5))
    for name, t in dict.fromkeys((r["name"], r["temperature"]) for r in rows):
        mine = sorted((r for r in rows if (r["name"], r["temperature"]) == (name, t)), key=lambda r: r["concurrency"])
        n = [r["concurrency"] for r in mine]
        style = "-" if t == 0 else "--"
        tput.plot(n, [r["tokens_per_s"] for r in mine], style, marker="o", label=f"{name}, T={t:g}")
        lat.plot(n, [r["mean_latency_s"] for r in mine], style, marker="o", label=f"{name}, T={t:g}")
    ticks = sorted({r["concurrency"] for r in rows})
    for ax, label in ((tput, "aggregate tokens/s"), (lat, "mean request latency (s)")):
        ax.set_xscale("log", base=2)
        ax.set_xticks(ticks, [str(n) for n in ticks])
        ax.set_xlabel("concurrent requests (one batch)")
        ax.set_ylabel(label)
        ax.legend(fontsize=8)
    fig.suptitle(_title(data), fontsize=9)
    return _save(fig, path)


def plot_steps(data: dict, path: Path) -> Path | None:
    rows = [r for r in ok_rows(data, "latency_t0") if r.get("step_ms")]
    if not rows:
        return None
    fig, ax = plt.subplots(figsize=(10, 5))
    parts = ["verify", "draft", "wait", "exchange"]  # draft overlaps verify under PEARL: see the note
    bottom = [0.0] * len(rows)
    for part in parts:
        vals = [r["step_ms"][f"{part}_ms"] for r in rows]
        ax.bar(range(len(rows)), vals, bottom=bottom, label=part)
        bottom = [b + v for b, v in zip(bottom, vals)]
    ax.plot(range(len(rows)), [r["step_ms"]["total_ms"] for r in rows], "k_", markersize=20, label="step (wall)")
    ax.set_xticks(range(len(rows)), [r["name"] for r in rows], rotation=40, ha="right", fontsize=8)
    ax.set_ylabel("ms per step")
    ax.set_title("T=0, batch 1: mean ms per step (with overlap, draft runs during verify: stacked > wall)")
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_hbm(hbm: dict, path: Path) -> Path | None:
    models = hbm.get("models", [])
    if not models:
        return None
    fig, ax = plt.subplots(figsize=(8, 5))
    width = 0.27
    for j, (label, get) in enumerate([("floor", lambda m: m["floor_ms"]),
                                      ("tandem engine", lambda m: m["tandem"]["ms_per_token"]),
                                      ("HF generate", lambda m: m["hf_generate"]["ms_per_token"])]):
        ax.bar([i + (j - 1) * width for i in range(len(models))], [get(m) for m in models], width, label=label)
    ax.set_xticks(range(len(models)), [m["name"] for m in models], fontsize=8)
    ax.set_yscale("log")
    ax.set_ylabel("ms per token, batch 1 (log)")
    ax.set_title(f"{hbm['device']}: copy {hbm['bandwidth']['bytes_per_s'] / 1e12:.2f} TB/s", fontsize=9)
    ax.legend(fontsize=8)
    return _save(fig, path)


def _title(data: dict) -> str:
    m = data.get("meta", {})
    params = m.get("params", {})
    sizes = ", ".join(f"{k} {v / 1e6:.0f}M" for k, v in params.items())
    return f"{m.get('devices', {}).get('target', '?')} | {sizes} | {m.get('args', {}).get('max_tokens', '?')} tokens/request"


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def target_floor_ms(hbm: dict | None, data: dict) -> float | None:
    """The AR floor of the benchmarked target, if hbm_floor.json measured that checkpoint."""
    target = Path(data.get("meta", {}).get("args", {}).get("target", "")).name
    for m in (hbm or {}).get("models", []):
        if target and m["name"] == f"checkpoint {target}":
            return m["floor_ms"]
    return None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("bench", nargs="?", default=str(REPO / "benchmarks/results/gpu_bench.json"))
    ap.add_argument("--hbm", default=None, help="hbm_floor.json (default: beside the bench JSON, if there)")
    args = ap.parse_args(sys.argv[1:] if argv is None else argv)
    bench = Path(args.bench)
    data = json.loads(bench.read_text())
    hbm_path = Path(args.hbm) if args.hbm else bench.with_name("hbm_floor.json")
    hbm = json.loads(hbm_path.read_text()) if hbm_path.is_file() else None
    stem = bench.with_suffix("")
    written = [plot_tokens_per_s(data, target_floor_ms(hbm, data), Path(f"{stem}_tokens_per_s.png")),
               plot_concurrency(data, Path(f"{stem}_concurrency.png")),
               plot_steps(data, Path(f"{stem}_steps.png")),
               plot_hbm(hbm, Path(f"{stem}_hbm_floor.png")) if hbm else None]
    for p in written:
        if p:
            print(f"wrote {p}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
