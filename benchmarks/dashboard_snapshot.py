"""Render deploy/grafana-tandem.json's panels from a live cluster's metrics, without Grafana.

    ray start --head --metrics-export-port=8080 && RAY_AUTH_MODE=token serve deploy deploy/cluster.yaml
    python benchmarks/dashboard_snapshot.py --metrics http://127.0.0.1:8080/metrics --seconds 180 \
        --out benchmarks/results/dashboard_cpu.png          # while load runs (e.g. serve_bench.py)

Needs matplotlib (`pip install -e '.[bench]'`). Scrapes the Prometheus endpoint every `--interval` seconds, evaluates each panel's queries over
the scrapes and draws the panels in the dashboard's grid, so the dashboard can be looked at where
no Grafana runs (and checked: a query that reads nothing draws an empty panel, named as such).
The evaluator covers the query forms the dashboard uses, no more: `sum|avg by (labels) (X)`,
`rate(counter[window])`, a ratio of two such, and `histogram_quantile(q, sum by (le)
(rate(bucket[window])))`; a plain series name is its samples.
"""
from __future__ import annotations

import argparse
import json
import math
import re
import sys
import time
import urllib.request
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
Labels = tuple[tuple[str, str], ...]
Scrape = tuple[float, dict[str, dict[Labels, float]]]  # (time, name -> labels -> value)


def parse(text: str) -> dict[str, dict[Labels, float]]:
    """Prometheus text format -> name -> labels -> value (every sample line, buckets included)."""
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[str, dict[Labels, float]] = defaultdict(dict)
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[s.name][tuple(sorted(s.labels.items()))] = s.value
    return out


def scrape(url: str) -> dict[str, dict[Labels, float]]:
    with urllib.request.urlopen(url, timeout=10) as r:
        return parse(r.read().decode())


# ---- the queries --------------------------------------------------------------------------

_AGG = re.compile(r"^(sum|avg) by \(([^)]*)\) \((.*)\)$")
_RATE = re.compile(r"^rate\(([a-zA-Z_:][\w:]*)\[(\d+)([sm])\]\)$")
_QUANTILE = re.compile(r"^histogram_quantile\(([\d.]+), (.*)\)$")
_NAME = re.compile(r"^[a-zA-Z_:][\w:]*$")


def evaluate(expr: str, scrapes: list[Scrape], at: int) -> dict[Labels, float]:
    """The query's value at scrape `at`: labels -> value (empty where the series is absent)."""
    expr = expr.strip()
    m = _QUANTILE.match(expr)
    if m:
        return _quantile(float(m.group(1)), evaluate(m.group(2), scrapes, at))
    depth, split = 0, None  # a ratio: "A / B" at the top level
    for i, ch in enumerate(expr):
        depth += (ch == "(") - (ch == ")")
        if ch == "/" and depth == 0:
            split = i
    if split is not None:
        num, den = evaluate(expr[:split], scrapes, at), evaluate(expr[split + 1 :], scrapes, at)
        return {k: v / den[k] for k, v in num.items() if den.get(k)}
    m = _AGG.match(expr)
    if m:
        keep = [x.strip() for x in m.group(2).split(",") if x.strip()]
        groups: dict[Labels, list[float]] = defaultdict(list)
        for labels, v in evaluate(m.group(3), scrapes, at).items():
            groups[tuple((k, v_) for k, v_ in labels if k in keep)].append(v)
        agg = sum if m.group(1) == "sum" else (lambda xs: sum(xs) / len(xs))
        return {k: agg(vs) for k, vs in groups.items()}
    m = _RATE.match(expr)
    if m:
        window = int(m.group(2)) * (60 if m.group(3) == "m" else 1)
        return _rate(m.group(1), window, scrapes, at)
    if _NAME.match(expr):
        return dict(scrapes[at][1].get(expr, {}))
    raise ValueError(f"query form not covered: {expr!r}")


def _rate(name: str, window: float, scrapes: list[Scrape], at: int) -> dict[Labels, float]:
    """Per-second increase over the window (the earliest scrape inside it to `at`), as Prometheus'
    rate does without its extrapolation; a counter that went down restarted from 0."""
    t_now, now = scrapes[at][0], scrapes[at][1].get(name, {})
    first = next(i for i, (t, _) in enumerate(scrapes) if t >= t_now - window)
    if first >= at:
        return {}
    t0, then = scrapes[first][0], scrapes[first][1].get(name, {})
    out = {}
    for labels, v in now.items():
        before = then.get(labels, 0.0)
        out[labels] = (v - before if v >= before else v) / (t_now - t0)
    return out


def _quantile(q: float, buckets: dict[Labels, float]) -> dict[Labels, float]:
    """histogram_quantile over cumulative bucket rates keyed by `le` (linear inside a bucket)."""
    groups: dict[Labels, list[tuple[float, float]]] = defaultdict(list)
    for labels, v in buckets.items():
        le = dict(labels).get("le")
        if le is not None:
            groups[tuple(x for x in labels if x[0] != "le")].append((float(le), v))
    out = {}
    for key, pts in groups.items():
        pts.sort()
        total = pts[-1][1]
        if total <= 0:
            continue
        rank, lower, below = q * total, 0.0, 0.0
        for upper, count in pts:
            if count >= rank:
                if math.isinf(upper):
                    out[key] = lower
                else:
                    out[key] = lower + (upper - lower) * (rank - below) / max(count - below, 1e-12)
                break
            lower, below = upper, count
    return out


# ---- drawing ------------------------------------------------------------------------------


def render(dashboard: dict, scrapes: list[Scrape], out: Path, title: str) -> dict:
    """One subplot per panel, placed on Grafana's 24-column grid; returns what each panel drew."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = dashboard["panels"]
    unit = math.gcd(*[p["gridPos"][k] for p in panels for k in ("y", "h")])  # grid rows per plot row
    rows = max(p["gridPos"]["y"] + p["gridPos"]["h"] for p in panels) // unit
    fig = plt.figure(figsize=(18, rows * unit * 0.5))
    grid = fig.add_gridspec(rows, 24, hspace=0.45, wspace=1.2, top=1 - 1.2 / (rows * unit * 0.5), bottom=0.03)
    t0 = scrapes[0][0]
    drawn = {}
    for p in panels:
        g = p["gridPos"]
        ax = fig.add_subplot(grid[g["y"] // unit : (g["y"] + g["h"]) // unit, g["x"] : g["x"] + g["w"]])
        lines = 0
        for target in p.get("targets", []):
            series: dict[Labels, list[tuple[float, float]]] = defaultdict(list)
            for i, (t, _) in enumerate(scrapes):
                for labels, v in evaluate(target["expr"], scrapes, i).items():
                    if math.isfinite(v):
                        series[labels].append((t - t0, v))
            for labels, pts in sorted(series.items()):
                fmt = target.get("legendFormat") or ",".join(f"{k}={v}" for k, v in labels) or target["expr"][:30]
                name = re.sub(r"\{\{\s*(\w+)\s*\}\}", lambda m: dict(labels).get(m.group(1), ""), fmt)
                ax.plot([x for x, _ in pts], [y for _, y in pts], label=name, marker=".", markersize=3)
                lines += 1
        ax.set_title(p["title"] + ("" if lines else " (no data)"), fontsize=9)
        ax.set_xlabel("seconds", fontsize=7)
        ax.tick_params(labelsize=7)
        if lines:
            ax.legend(fontsize=6, loc="upper left")
        drawn[p["title"]] = lines
    fig.suptitle(title, fontsize=11, y=0.998)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=90, bbox_inches="tight")
    plt.close(fig)
    return drawn


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--metrics", default="http://127.0.0.1:8080/metrics", help="the Prometheus endpoint to scrape")
    ap.add_argument("--dashboard", default=str(REPO / "deploy" / "grafana-tandem.json"))
    ap.add_argument("--seconds", type=float, default=180.0)
    ap.add_argument("--interval", type=float, default=5.0)
    ap.add_argument("--title", default="tandem (deploy/grafana-tandem.json)")
    ap.add_argument("--out", default=str(REPO / "benchmarks/results/dashboard.png"))
    ap.add_argument("--replay", default=None, help="draw from the scrapes a run saved (<out>.json) instead of scraping")
    args = ap.parse_args(argv)
    dashboard = json.loads(Path(args.dashboard).read_text())
    out = Path(args.out)
    scrapes = load_scrapes(Path(args.replay)) if args.replay else collect(args.metrics, args.seconds, args.interval)
    if len(scrapes) < 2:
        print("fewer than two scrapes: nothing to draw", file=sys.stderr)
        return 1
    if not args.replay:
        save_scrapes(scrapes, out.with_suffix(".json"))
    drawn = render(dashboard, scrapes, out, args.title)
    for title, lines in drawn.items():
        print(f"{lines:3d} series  {title}")
    print(f"wrote {out}" + ("" if args.replay else f" and {out.with_suffix('.json')}"))
    return 0


def save_scrapes(scrapes: list[Scrape], path: Path, keep=("mode", "finish_reason", "le", "lane", "part", "kind")) -> None:
    """The tandem series of every scrape, to draw again later (--replay), with only the labels the
    dashboard groups or names by (Ray adds node, session and version labels to every sample);
    samples that differ only in the others are added up, as the dashboard's sums do."""
    rows = []
    for t, data in scrapes:
        series = {}
        for name, samples in data.items():
            if name.startswith("ray_tandem_"):
                merged: dict[Labels, float] = defaultdict(float)
                for labels, v in samples.items():
                    merged[tuple(x for x in labels if x[0] in keep)] += v
                series[name] = [[list(map(list, labels)), v] for labels, v in merged.items()]
        rows.append({"t": round(t, 3), "series": series})
    path.write_text(json.dumps(rows))


def load_scrapes(path: Path) -> list[Scrape]:
    return [(row["t"], {name: {tuple(map(tuple, labels)): v for labels, v in samples}
                        for name, samples in row["series"].items()}) for row in json.loads(path.read_text())]


def collect(url: str, seconds: float, interval: float) -> list[Scrape]:
    """Scrape every `interval` seconds for `seconds`, with progress."""
    scrapes: list[Scrape] = []
    end = time.time() + seconds
    while time.time() < end:
        try:
            scrapes.append((time.time(), scrape(url)))
        except OSError as e:
            print(f"scrape failed: {e}", file=sys.stderr)
        n = sum(len(v) for k, v in scrapes[-1][1].items() if k.startswith("ray_tandem_")) if scrapes else 0
        print(f"\r{len(scrapes)} scrapes, {n} tandem samples in the last", end="", flush=True)
        time.sleep(interval)
    print()
    return scrapes


if __name__ == "__main__":
    sys.exit(main())
