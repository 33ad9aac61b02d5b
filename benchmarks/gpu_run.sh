#!/usr/bin/env bash
# The GPU runs behind BENCHMARKS.md, in sections that fit the device tool's 10-minute calls.
#
#   bash benchmarks/gpu_run.sh pair latency          # one call: train the pair, batch-1 rows
#   bash benchmarks/gpu_run.sh pair concurrency      # (the machine keeps /tmp only while warm)
#
# Run from the repo root on the GPU machine, with Ray carried as ../shared/device/pack-ray.sh
# builds it (carry .devcarry) for the cluster sections; if the carry and the tree pass the
# device's 64 MiB, `bash benchmarks/slim_devcarry.sh` repacks the carry smaller. Results go to
# $OUT (default ./runs).
# Every section trains the benchmark pair first if /tmp/bench has none (ZOO_MIN minutes, default
# 5.5; a shorter pair is weaker: compare rows within one run, not across pairs).
#
# sections:
#   pair          train the benchmark pair (tandem zoo --preset bench) into /tmp/bench
#   latency       calibration + batch-1 latency at T=0 and T=1 (gpu_bench.py)
#   concurrency   1 / 4 / 16 / 64 requests at T=0 and T=1, natural language, fp32 equality
#   cluster       the cluster path vs in-process (cluster_gpu.py), drafter colocated, graphs at
#                 start, the best batch-1 mode at T=0 (after latency) or AR + SD + AdaEDL
#   cluster_core  AR and SD k=7 (the one-GPU default) at 1 / 8 / 32 / 64 streams, the lane's step
#                 loop in a process of its own (lane.core_process)
#   cluster_loop  the same with the step loop in the lane replica (the default), to compare
#   cluster_t1    the same at T=1 (seeded sampling)
#   cluster_pearl PEARL and SD + AdaEDL through the cluster, drafter colocated
#   remote        the cluster with the drafter in its own process on the same GPU (0.5 + 0.5)
#   profile       where an AR / SD step's time goes (step_profile.py; random pair if none trained)
#   hbm           AR at batch 1 against the HBM floor (hbm_floor.py)
#   adaptive      auto against every fixed setting, cells and the mixed ramp (adaptive_bench.py;
#                 ADAPTIVE_ARGS adds arguments, e.g. --domains code --temperatures 0)
#   serve         open-loop load through the cluster (serve_bench.py) on deploy/cluster-1gpu.yaml
#                 with the benchmark pair: AR, SD k=7 (SERVE_DRAFT) and auto at rising request rates
#                 (SERVE_RATES)
#   exact         exact mode against the default: tokens/s of AR and SD k=5 at 1 and 64 requests, and
#                 how many greedy outputs equal AR's at batch 1 (exact_bench.py; EXACT_ARGS adds arguments,
#                 e.g. --prompts 32), then tests/test_exact.py
#   tests         the GPU-marked tests but tests/test_exact.py (the exact section runs those)
set -o pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD TOKENIZERS_PARALLELISM=false
OUT=${OUT:-$PWD/runs}; mkdir -p "$OUT"
B=/tmp/bench
BUDGET=${BUDGET:-585}  # seconds of the call; each section's deadline is what is left of it

left() { echo $((BUDGET - SECONDS)); }
quiet() { grep -v "^\[\|^!!\|WARNING\|INFO\|pid=\|nanobind\|leaked\|^$" | cut -c1-200; }
ray_carried() {
  ls .devcarry/ray-*.tar.xz > /dev/null 2>&1 || { echo "no .devcarry: build it (../shared/device/pack-ray.sh) and carry it"; exit 2; }
  for f in .devcarry/ray-*.tar.xz; do tar -C /tmp -xJf "$f"; done
  export PYTHONPATH=/tmp/raypack:$PWD
}

pair() {
  [ -f $B/draft/config.json ] && return
  nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
  python -m tandem.zoo --preset bench --out $B --device cuda --minutes "${ZOO_MIN:-5.5}" --draft-share 0.5 \
    --eval-prompts 8 > "$OUT/zoo.log" 2>&1
  tail -3 "$OUT/zoo.log"; cp $B/zoo_report.json "$OUT/"
}

bench() {  # gpu_bench.py sections, resuming the JSON of this machine's earlier sections
  local resume=; [ -f $B/gpu_bench.json ] && resume=--resume
  python benchmarks/gpu_bench.py --target $B/target --draft $B/draft --device cuda --dtype bfloat16 \
    --sections "$1" $resume --deadline-s "$(left)" --out $B/gpu_bench.json > "$OUT/bench_$2.log" 2>&1
  cp $B/gpu_bench.json "$OUT/gpu_bench.json"; quiet < "$OUT/bench_$2.log" | tail -44
}

latency() { pair; bench calibration,latency latency; }
concurrency() { pair; bench calibration,concurrency,natural_language,lossless_fp32 concurrency; }

best() {  # the best batch-1 mode if latency ran on this machine, else AR and SD + AdaEDL
  if [ -f $B/gpu_bench.json ]; then echo "--best-from $B/gpu_bench.json"; else echo "--modes ar,sd+adaedl --max-draft 16"; fi
}

cluster_run() {  # name, then cluster_gpu.py arguments
  local name=$1; shift
  ray_carried
  timeout "$(left)" python benchmarks/cluster_gpu.py --target $B/target --draft $B/draft --dtype bfloat16 \
    --max-tokens 128 --graphs-at-start "$@" --out "$OUT/cluster_$name.json" > "$OUT/cluster_$name.log" 2>&1
  quiet < "$OUT/cluster_$name.log" | grep -A8 "^mode"
}

cluster() { pair; cluster_run t0 $(best) --verifier-gpus 1 --colocate-drafter; }
streams() { echo --modes ar,sd --max-draft 7 --concurrency 1,8,32,64 --verifier-gpus 1 --colocate-drafter; }
cluster_core() { pair; cluster_run core $(streams) --core-process; }
cluster_loop() { pair; cluster_run loop $(streams); }
cluster_t1() { pair; cluster_run t1 $(best) --temperature 1 --verifier-gpus 1 --colocate-drafter; }
cluster_pearl() { pair; cluster_run pearl --max-draft 8 --modes ar,pearl,sd+adaedl --verifier-gpus 1 --colocate-drafter; }
remote() { pair; cluster_run remote $(best) --verifier-gpus 0.5 --drafter-gpus 0.5; }

profile() {
  local p=$B; [ -f $p/draft/config.json ] || { p=/tmp/rand; python benchmarks/random_pair.py --out $p > /dev/null; }
  python benchmarks/step_profile.py --target $p/target --draft $p/draft --out "$OUT/step_profile.json" 2>&1 \
    | quiet | tee "$OUT/step_profile.log"
}

hbm() { pair; python benchmarks/hbm_floor.py --target $B/target --device cuda --out "$OUT/hbm_floor.json" 2>&1 | quiet; }
tests() { python -m pytest -q -p no:cacheprovider -m gpu tests --ignore=tests/test_exact.py 2>&1 | tail -15; }
exact() {
  pair
  # leave the GPU exact tests ~3 minutes (both matmul paths, eager and graphed)
  python benchmarks/exact_bench.py --target $B/target --draft $B/draft --deadline-s "$(($(left) - 180))" ${EXACT_ARGS:-} \
    --out "$OUT/exact_bench.json" 2>&1 | quiet | grep -v "^\[" | tail -12
  python -m pytest -q -p no:cacheprovider -m gpu tests/test_exact.py 2>&1 | tail -5
}

adaptive() {
  pair
  python benchmarks/adaptive_bench.py --target $B/target --draft $B/draft --deadline-s "$(left)" ${ADAPTIVE_ARGS:-} \
    --out "$OUT/adaptive_bench.json" 2>&1 | quiet | grep -v "^\[" | tail -40
}

serve() {
  pair; ray_carried
  # every CUDA graph captured before the server says it is up (else the first rate pays for captures)
  sed -e "s#tandem:tiny/target#$B/target#; s#tandem:tiny/draft#$B/draft#" \
      -e "s/max_batch_size: 32 /max_batch_size: 64\n        cuda_graphs_at_start: true/" \
      -e "s/max_draft: 7 /max_draft: 16 /" \
    deploy/cluster-1gpu.yaml > /tmp/serve.yaml
  python -m tandem.cli serve /tmp/serve.yaml > "$OUT/serve_server.log" 2>&1 &
  local server=$!
  for _ in $(seq 400); do grep -q "is up" "$OUT/serve_server.log" && break; kill -0 $server 2>/dev/null || break; sleep 1; done
  grep "is up" "$OUT/serve_server.log" || { tail -20 "$OUT/serve_server.log"; kill $server; return 1; }
  for mode in ${SERVE_MODES:-ar sd auto}; do
    local draft=${SERVE_DRAFT:-7}; [ "$mode" = auto ] && draft=16  # auto: lengths up to 16, as adaptive_bench runs it
    timeout "$(left)" python benchmarks/serve_bench.py --mode "$mode" --max-draft $draft --rates "${SERVE_RATES:-8,16,32,64,128,inf}" \
      --num-prompts "${SERVE_PROMPTS:-200}" --output-len 64 --output-len-sigma 0.3 --max-output-len 88 \
      --out "$OUT/serve_$mode.json" 2>&1 | grep -v "^\[\|it/s\]" | tail -8
  done
  kill $server; wait $server 2>/dev/null
}

[ $# -gt 0 ] || { sed -n 2,30p "$0"; exit 2; }
for section in "$@"; do
  declare -F "$section" > /dev/null || { echo "unknown section $section (see the header of $0)"; exit 2; }
  echo "== $section ($(left) s left)"; "$section"
done
