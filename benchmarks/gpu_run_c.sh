# GPU call C (~8 min, after gpu_run_b.sh while warm, carry .devcarry): the HBM floor of the benchmark
# target; the cluster's PEARL and AdaEDL modes with the drafter colocated; the best T=0 mode with the
# drafter in its own process on the same GPU (0.5 + 0.5). Every CUDA graph captured at start.
set -o pipefail; export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
B=/tmp/bench; export PYTHONPATH=$PWD
python benchmarks/hbm_floor.py --target $B/target --device cuda --skip-8b --steps 64 --out $OUT/hbm_floor_bench.json > $OUT/hbm.log 2>&1
tail -3 $OUT/hbm.log
for f in .devcarry/ray-*.tar.xz; do tar -C /tmp -xJf $f; done; export PYTHONPATH=/tmp/raypack:$PWD
CL="python benchmarks/cluster_gpu.py --target $B/target --draft $B/draft --dtype bfloat16 --max-tokens 128 --graphs-at-start"
timeout 200 $CL --verifier-gpus 1 --colocate-drafter --max-draft 8 --modes ar,pearl,sd+adaedl --out $OUT/cluster_colocated_pearl.json > $OUT/cluster_pearl.log 2>&1
timeout $((560 - SECONDS)) $CL --verifier-gpus 0.5 --drafter-gpus 0.5 --best-from $B/gpu_bench.json --out $OUT/cluster_remote_t0.json > $OUT/cluster_remote.log 2>&1
for f in cluster_pearl cluster_remote; do grep -v "INFO\|WARN\|pid=" $OUT/$f.log | grep -A7 "^mode"; done
