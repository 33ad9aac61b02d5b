# GPU call C (~8 min, after gpu_run_b.sh while warm, carry .devcarry): the cluster's best T=1 mode;
# its PEARL and AdaEDL modes with the drafter colocated; the best T=0 mode with the drafter in its
# own process on the same GPU (0.5 + 0.5). Every CUDA graph captured at start. (The target's HBM
# floor: python benchmarks/hbm_floor.py --target /tmp/bench/target --device cuda --skip-8b.)
set -o pipefail; export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
B=/tmp/bench
for f in .devcarry/ray-*.tar.xz; do tar -C /tmp -xJf $f; done; export PYTHONPATH=/tmp/raypack:$PWD
CL="python benchmarks/cluster_gpu.py --target $B/target --draft $B/draft --dtype bfloat16 --max-tokens 128 --graphs-at-start"
timeout 200 $CL --verifier-gpus 1 --colocate-drafter --best-from $B/gpu_bench.json --temperature 1 --out $OUT/cluster_colocated_t1.json > $OUT/cluster_t1.log 2>&1
timeout 200 $CL --verifier-gpus 1 --colocate-drafter --max-draft 8 --modes ar,pearl,sd+adaedl --out $OUT/cluster_colocated_pearl.json > $OUT/cluster_pearl.log 2>&1
timeout $((560 - SECONDS)) $CL --verifier-gpus 0.5 --drafter-gpus 0.5 --best-from $B/gpu_bench.json --out $OUT/cluster_remote_t0.json > $OUT/cluster_remote.log 2>&1
for f in cluster_t1 cluster_pearl cluster_remote; do grep -v "INFO\|WARN\|pid=" $OUT/$f.log | grep -A7 "^mode"; done
