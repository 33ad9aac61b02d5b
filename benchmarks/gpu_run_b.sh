# GPU call B (~8 min, right after gpu_run_a.sh, carry .devcarry): concurrency at T=0 and T=1, natural
# language, fp32 equality, the benchmark target's HBM floor, the cluster path (best mode at T=0 and T=1,
# PEARL and AdaEDL).
set -o pipefail; export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
B=/tmp/bench
[ -f $B/draft/config.json ] || ZOO_MIN=4 bash benchmarks/gpu_run_a.sh   # the machine went cold: start over, shorter
export PYTHONPATH=$PWD
python benchmarks/gpu_bench.py --target $B/target --draft $B/draft --device cuda --dtype bfloat16 \
  --sections concurrency,natural_language,lossless_fp32 --resume --deadline-s 230 --out $B/gpu_bench.json > $OUT/bench_b.log 2>&1
cp $B/gpu_bench.json $OUT/gpu_bench.json
python benchmarks/hbm_floor.py --target $B/target --device cuda --skip-8b --steps 64 --out $OUT/hbm_floor_bench.json > $OUT/hbm.log 2>&1
for f in .devcarry/ray-*.tar.xz; do tar -C /tmp -xJf $f; done; export PYTHONPATH=/tmp/raypack:$PWD
CL="python benchmarks/cluster_gpu.py --target $B/target --draft $B/draft --dtype bfloat16 --verifier-gpus 0.5 --drafter-gpus 0.5 --max-tokens 128"
timeout 150 $CL --best-from $B/gpu_bench.json --out $OUT/cluster_1xh200.json > $OUT/cluster.log 2>&1
timeout 150 $CL --best-from $B/gpu_bench.json --temperature 1 --out $OUT/cluster_1xh200_t1.json > $OUT/cluster_t1.log 2>&1
timeout 150 $CL --max-draft 5 --modes ar,pearl,sd+adaedl --out $OUT/cluster_1xh200_pearl.json > $OUT/cluster_pearl.log 2>&1
grep -v "^\[" $OUT/bench_b.log | tail -44 | cut -c1-150; tail -3 $OUT/hbm.log
for f in cluster cluster_t1 cluster_pearl; do grep -v "INFO\|WARN\|pid=" $OUT/$f.log | grep -A8 "^mode"; done
