"""The GPU benchmark scripts run end to end on CPU with the shipped tiny pair (tiny settings).

They are run once on a GPU machine with no second chance, so the CPU run checks what can be
checked here: every section is written, the greedy outputs of every tandem mode equal tandem
AR's (fp32 CPU: exactly), and the plots draw from the JSON the run wrote.
"""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tandem.models import SHIPPED

REPO = Path(__file__).resolve().parent.parent
TINY = SHIPPED / "tiny"
SECTIONS = ("calibration", "latency_t0", "latency_t1", "concurrency", "natural_language")


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", REPO / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is made
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread: the runs are tiny, and on a small shared VM two OpenMP threads can
    stall each other at every barrier (seen here: 7 ms forwards becoming 130 ms)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def bench_json(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("bench") / "gpu_bench.json"
    rc = load_script("gpu_bench").main([
        "--target", str(TINY / "target"), "--draft", str(TINY / "draft"), "--device", "cpu", "--dtype", "float32",
        "--prompts", "1", "--max-tokens", "8", "--warmup-tokens", "4", "--sd-ks", "3", "--nl-prompts", "2",
        "--concurrency", "1,2", "--calibration-iters", "5", "--out", str(out),
    ])
    assert rc == 0
    return out


def test_every_section_is_written(bench_json):
    data = json.loads(bench_json.read_text())
    for section in SECTIONS:
        assert section in data, f"section {section} missing"
    assert not data["skipped"] and not data.get("errors"), (data["skipped"], data.get("errors"))
    rows = [r for s in SECTIONS[1:] for r in data[s]["rows"]]
    assert all("error" not in r for r in rows), [r for r in rows if "error" in r]
    assert {"command", "versions", "params", "devices"} <= set(data["meta"])
    assert data["meta"]["frozen_objects"] > 0  # the start-up heap is out of the collector's way
    assert data["calibration"]["c"] > 0 and set(data["calibration"]["target_verify_ms"]) == {"4", "6", "9", "17"}
    names = {r["name"] for r in data["latency_t0"]["rows"]}
    assert {"tandem ar", "auto (default)", "hf generate", "hf assisted", "sd k=3", "sd+adaedl (cap 16)"} <= names
    assert {n for r in data["concurrency"]["rows"] for n in [r["concurrency"]]} == {1, 2}
    goals = dict(data["goals"])  # no n=64 cell here: no ratio for it
    cells = goals.pop("by_cell")
    assert set(goals) == {"auto_vs_best_static", "auto_vs_ar", "auto_vs_best_static_k_t1", "best_vs_hf_assisted_t0"}
    assert all(g["ratio"] > 0 and g["met"] == (g["ratio"] >= g["goal"]) for g in goals.values())
    assert {"latency n=1 T=0", "latency n=1 T=1", "concurrency n=2 T=0", "concurrency n=2 T=1"} <= set(cells)


def test_tandem_greedy_rows_equal_ar(bench_json):
    data = json.loads(bench_json.read_text())
    for section in ("latency_t0", "concurrency", "natural_language"):
        for r in data[section]["rows"]:
            if r["temperature"] != 0:  # the concurrency sweep runs T=1 too: nothing to compare
                continue
            if r["engine"] == "tandem":
                assert r["lossless"]["exact_fraction"] == 1.0, (section, r["name"], r["lossless"])
                assert "step_ms" in r and r["tokens"] > 0
            else:  # HF generate in fp32 on CPU agrees with tandem AR too
                assert r["agreement_with_tandem_ar"]["exact_fraction"] == 1.0, (section, r["name"])
    assert not data["warnings"]


def test_hbm_floor_on_the_tiny_target(tmp_path):
    out = tmp_path / "hbm_floor.json"
    rc = load_script("hbm_floor").main(["--target", str(TINY / "target"), "--device", "cpu", "--dtype", "float32",
                                        "--skip-8b", "--copy-gb", "0.01", "--steps", "8", "--out", str(out)])
    assert rc == 0
    m = json.loads(out.read_text())["models"][0]
    assert m["tied_embeddings"] and m["floor_ms"] == m["floor_all_weights_ms"] > m["floor_minus_embedding_ms"] > 0
    assert m["tandem"]["ms_per_token"] > 0 and m["hf_generate"]["steps"] == 8


def test_plots_draw_from_the_json(bench_json):
    pytest.importorskip("matplotlib")
    load_script("plot_gpu").main([str(bench_json)])
    for kind in ("tokens_per_s", "concurrency", "steps"):
        png = bench_json.with_name(f"gpu_bench_{kind}.png")
        assert png.is_file() and png.stat().st_size > 1000, png


def test_adaedl_cost_model_counts_positions_and_programs(tmp_path):
    out = tmp_path / "adaedl_model.json"
    assert load_script("adaedl_model").main(["--prompts", "1", "--max-tokens", "8", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert len(rows) == 2 * 7 and all(r["tokens_per_step"] >= 1 and r["modelled_ms_per_token"] > 0 for r in rows)
    k3 = next(r for r in rows if r["name"] == "sd k=3" and r["temperature"] == 0)
    assert k3["programs_per_step"] <= 1 and k3["positions_per_step"] <= 3  # one window of <= 3 per step


def test_exchange_benchmark_times_each_transport(tmp_path):
    out = tmp_path / "exchange.json"  # a subprocess: its spawned workers import the script by path
    subprocess.run([sys.executable, str(REPO / "benchmarks/exchange.py"), "--round-trips", "20", "--out", str(out)],
                   check=True, timeout=300)
    rows = json.loads(out.read_text())["rows"]
    assert [r["transport"] for r in rows] == ["send_object_list", "Channel (4 KiB buffer)", "int64[64] tensor"]
    assert all(r["round_trip_us"] > 0 for r in rows)


def test_divergence_margins_score_the_first_difference():
    """A row that left AR's tokens at position 3: the target's top two logits there, and whether
    the two tokens are those (a fabricated token far down the ranking is not)."""
    from types import SimpleNamespace

    from tandem.actors.offline import generate
    from tandem.engine.pair import load_pair
    from tandem.params import SamplingParams, SpecParams

    gpu_bench = load_script("gpu_bench")
    pair = load_pair(TINY / "target", TINY / "draft", max_slots=2)
    prompt = pair.tokenizer.encode("def main():\n", add_special_tokens=False)
    ref = generate(pair, [prompt], SamplingParams(max_tokens=8, ignore_eos=True), SpecParams("ar"))[0].token_ids
    logits = pair.target.forward([pair.target.allocate()], [prompt + ref[:3]], [1])[-1]
    second = int(torch.topk(logits, 2).indices[1])
    worst = int(logits.argmin())
    b = SimpleNamespace(pair=pair)
    (tie,) = gpu_bench.divergence_margins(b, [prompt], [ref[:3] + [second] + ref[4:]], [ref])
    assert tie["position"] == 3 and tie["tokens_are_top2"] and tie["gap"] >= 0
    assert 0 < tie["dtype_step"] < 1e-5  # the tiny pair is fp32: 24 significant bits
    (bug,) = gpu_bench.divergence_margins(b, [prompt], [ref[:3] + [worst] + ref[4:]], [ref])
    assert not bug["tokens_are_top2"]
    assert gpu_bench.divergence_margins(b, [prompt], [ref], [ref]) == []
    assert pair.target.free_slots == 1  # the scoring slot came back (the test's own slot stays)


def test_step_profile_times_every_phase_and_row(tmp_path):
    out = tmp_path / "step_profile.json"
    rc = load_script("step_profile").main([
        "--device", "cpu", "--dtype", "float32", "--prompts", "1", "--max-tokens", "4", "--top", "3", "--out", str(out)])
    assert rc == 0
    data = json.loads(out.read_text())
    assert [p["phase"] for p in data["phases"]] == ["few_slots", "fresh", "kernels", "graphs", "gc_frozen"]
    for phase in data["phases"]:
        assert [(r["mode"], r["temperature"]) for r in phase["rows"]] == [("ar", 0.0), ("ar", 1.0), ("sd", 1.0)]
        assert all(r["steps"] > 0 and r["step_ms"] >= r["verify_ms"] > 0 for r in phase["rows"])
        assert len(phase["ar_t1_top_ops"]) == 3
    with pytest.raises(SystemExit):  # the phases build on each other: a prefix only
        load_script("step_profile").main(["--device", "cpu", "--phases", "fresh", "--out", str(out)])


def test_load_control_benchmark_checks_every_row_against_ar(tmp_path):
    out = tmp_path / "load_control.json"
    rc = load_script("load_control").main(["--device", "cpu", "--concurrency", "1,3", "--max-tokens", "8",
                                            "--warm-tokens", "4", "--out", str(out)])
    assert rc == 0  # a row whose greedy output differed from AR would have exited with the violation
    rows = json.loads(out.read_text())["rows"]
    assert len(rows) == 2 * 5 and all(r["tokens_per_s"] > 0 for r in rows)
    assert all((r["load_control"] is not None) == r["row"].endswith("load control") for r in rows)


def test_adaptive_bench_runs_every_setting_in_every_cell_and_the_mixed_load(tmp_path):
    out = tmp_path / "adaptive.json"
    rc = load_script("adaptive_bench").main([
        "--device", "cpu", "--dtype", "float32", "--requests", "2", "--max-tokens", "6", "--concurrency", "1,2",
        "--temperatures", "0,1", "--domains", "code", "--mixed-scale", "0.05", "--out", str(out)])
    data = json.loads(out.read_text())
    assert rc == 0 and not data["skipped"]
    names = {r["name"] for r in data["cells"]["rows"]}
    assert len(names) == 8 and "auto (default)" in names and len(data["cells"]["rows"]) == 8 * 4
    assert {r["name"] for r in data["mixed"]["rows"]} == names
    for r in data["cells"]["rows"] + data["mixed"]["rows"]:
        assert r["tokens"] > 0 and r["step_ms"]["p50"] <= r["step_ms"]["p99"] <= r["step_ms"]["max"]
        split = r["split_ms"]
        assert split["join"]["steps"] + split["other"]["steps"] == r["steps"] and split["join"]["steps"] == r["join_steps"]
        if r["name"] == "auto (default)":  # every step traced: ms, drafting, verifying, requests, fed, cap
            assert len(r["trace"]) == r["steps"] and all(len(x) == 6 and x[1] <= x[0] for x in r["trace"])
    for r in data["cells"]["rows"]:  # n running while more waited: a steady part in every cell row
        assert r["steady_tokens_per_s"] > 0 and 0 < r["steady_s"] <= r["seconds"]
    goals = data["goals"]
    assert set(goals["by_cell"]) == {f"code T={t} n={n}" for t in (0, 1) for n in (1, 2)}
    assert {"auto_vs_best", "auto_vs_ar", "mixed_auto_vs_best"} <= set(goals)


def test_controller_sim_runs_the_real_controller_against_every_static_setting(tmp_path):
    out = tmp_path / "sim.json"
    rc = load_script("controller_sim").main(["--requests", "8", "--tokens", "24", "--concurrency", "1,4",
                                             "--workloads", "code_t0", "--out", str(out)])
    cells = json.loads(out.read_text())["cells"]
    assert rc == 0 and [c["cell"] for c in cells] == ["code_t0 n=1", "code_t0 n=4", "mixed ramp 1-4-16-64-16-4-1"]
    for c in cells:
        assert set(c["rows"]) == {"ar", "sd k=3", "sd k=5", "sd k=7", "sd k=8", "sd+adaedl (cap 16)", "auto (default)"}
        assert all(r["tokens_per_s"] > 0 for r in c["rows"].values())
        assert c["rows"]["ar"]["drafted_per_step"] == 0 and c["rows"]["sd k=8"]["drafted_per_step"] > 0


def test_exact_bench_compares_exact_mode_with_the_default(tmp_path):
    out = tmp_path / "exact.json"
    rc = load_script("exact_bench").main(["--device", "cpu", "--dtype", "float32", "--prompts", "3", "--max-tokens",
                                          "6", "--concurrency", "1,2", "--exact-rows", "64,4", "--out", str(out)])
    rows = json.loads(out.read_text())["rows"]["rows"]
    assert rc == 0 and {(r["target"], r["mode"], r["concurrency"]) for r in rows} == {
        (t, m, n) for t in ("default", "exact64", "exact4") for m in ("ar", "sd k=5") for n in (1, 2)}
    exact = [r for r in rows if r["target"] != "default"]
    assert all(r["tokens_per_s"] > 0 and r["identical_to_ar_batch_1"] == r["compared"] == 3 for r in exact)


def test_exact_bench_past_its_deadline_runs_the_default_and_skips_the_rest(tmp_path):
    out = tmp_path / "exact.json"
    rc = load_script("exact_bench").main(["--device", "cpu", "--dtype", "float32", "--prompts", "2", "--max-tokens",
                                          "4", "--concurrency", "1", "--exact-rows", "64", "--deadline-s", "0.001",
                                          "--out", str(out)])
    data = json.loads(out.read_text())
    assert rc == 0 and data["skipped"] == ["exact64"]
    assert {r["target"] for r in data["rows"]["rows"]} == {"default"}
    with pytest.raises(SystemExit):  # the fixed-tile matmul is CUDA's: off it, a clear refusal
        load_script("exact_bench").main(["--device", "cpu", "--tiles", "--out", str(out)])


def test_dashboard_snapshot_evaluates_every_panel_query(tmp_path):
    """benchmarks/dashboard_snapshot.py draws deploy/grafana-tandem.json from scraped samples: on two
    synthetic scrapes of every series the dashboard reads, each query gives a value, rates and
    quantiles as Prometheus defines them, and every panel draws."""
    snap = load_script("dashboard_snapshot")
    dashboard = json.loads((REPO / "deploy" / "grafana-tandem.json").read_text())

    def text(k: int) -> str:  # counters grow by k per scrape; the histogram's 2k observations split 1:1
        lines = []
        for name in ("generated_tokens", "accepted_tokens", "checked_tokens", "draft_tokens"):
            lines += [f"# TYPE ray_tandem_{name}_total counter",
                      f'ray_tandem_{name}_total{{mode="sd"}} {10.0 * k * (2 if name == "checked_tokens" else 1)}']
        lines += ["# TYPE ray_tandem_requests_total counter", f'ray_tandem_requests_total{{finish_reason="length"}} {k}']
        for name in ("time_to_first_token", "time_per_output_token", "inter_token_latency"):
            h = f"ray_tandem_{name}_seconds"
            lines += [f"# TYPE {h} histogram", f'{h}_bucket{{le="0.01"}} {k}', f'{h}_bucket{{le="0.1"}} {2 * k}',
                      f'{h}_bucket{{le="+Inf"}} {2 * k}', f"{h}_count {2 * k}", f"{h}_sum {0.05 * k}"]
        for name in ("lane_running", "lane_queued", "lane_free_slots", "lane_batch", "load_control_cap"):
            lines += [f"# TYPE ray_tandem_{name} gauge", f'ray_tandem_{name}{{lane="a"}} 3']
        lines += ["# TYPE ray_tandem_lane_step_ms gauge", 'ray_tandem_lane_step_ms{lane="a",part="verify"} 2.5',
                  "# TYPE ray_tandem_load_control_tokens_per_s gauge",
                  'ray_tandem_load_control_tokens_per_s{lane="a",kind="predicted"} 100']
        return "\n".join(lines) + "\n"

    scrapes = [(0.0, snap.parse(text(0))), (10.0, snap.parse(text(1)))]
    for panel in dashboard["panels"]:
        for target in panel["targets"]:
            assert snap.evaluate(target["expr"], scrapes, 1), (panel["title"], target["expr"])
    by_mode = 'sum by (mode) (rate(ray_tandem_generated_tokens_total[1m]))'
    assert snap.evaluate(by_mode, scrapes, 1) == {(("mode", "sd"),): 1.0}  # 10 tokens in 10 s
    acceptance = dashboard["panels"][1]["targets"][0]["expr"]
    assert snap.evaluate(acceptance, scrapes, 1) == {(("mode", "sd"),): 0.5}
    p50 = "histogram_quantile(0.5, sum by (le) (rate(ray_tandem_time_to_first_token_seconds_bucket[5m])))"
    assert snap.evaluate(p50, scrapes, 1) == {(): pytest.approx(0.01)}  # half the observations under 10 ms
    if importlib.util.find_spec("matplotlib") is not None:  # the bench extra
        drawn = snap.render(dashboard, scrapes, tmp_path / "d.png", "test")
        assert (tmp_path / "d.png").stat().st_size > 0 and all(drawn.values()), drawn
