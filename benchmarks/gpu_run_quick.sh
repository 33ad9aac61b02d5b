# One GPU call (~9 min, carry .devcarry) when a lease has only ~15 min left: a pair trained for
# 3 min, batch-1 latency at T=0/T=1 for AR, SD k=5/8, AdaEDL (both rules) and PEARL, then the
# cluster for AR, SD k=8 and SD+AdaEDL. The pair is weaker than gpu_run_a.sh's: compare rows
# within this run, not with the 5.5-minute pair's tables.
set -o pipefail; export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD TOKENIZERS_PARALLELISM=false
B=/tmp/bench; nvidia-smi --query-gpu=name --format=csv,noheader
python -m tandem.zoo --preset bench --out $B --device cuda --minutes ${ZOO_MIN:-3} --draft-share 0.5 \
  --eval-prompts 8 > $OUT/zoo.log 2>&1; tail -3 $OUT/zoo.log; cp $B/zoo_report.json $OUT/
python benchmarks/gpu_bench.py --target $B/target --draft $B/draft --device cuda --dtype bfloat16 --skip-hf \
  --sd-ks 5,8 --sections calibration,latency --deadline-s $((430 - SECONDS)) --out $OUT/gpu_bench_quick.json > $OUT/bench.log 2>&1
grep -v "^\[\|^!!\|WARNING" $OUT/bench.log | tail -24 | cut -c1-150
for f in .devcarry/ray-*.tar.xz; do tar -C /tmp -xJf $f; done; export PYTHONPATH=/tmp/raypack:$PWD
timeout $((590 - SECONDS)) python benchmarks/cluster_gpu.py --target $B/target --draft $B/draft --dtype bfloat16 \
  --verifier-gpus 0.5 --drafter-gpus 0.5 --max-tokens 128 --max-draft 8 --modes ar,sd,sd+adaedl \
  --out $OUT/cluster_quick.json > $OUT/cluster.log 2>&1
grep -v "INFO\|WARN\|pid=" $OUT/cluster.log | grep -A7 "^mode"
