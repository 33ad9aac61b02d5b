# GPU call C (~7 min, after gpu_run_b.sh while warm, carry .devcarry): the cluster's PEARL and AdaEDL
# modes with the drafter colocated (one GPU), and the HBM floor of the benchmark target.
set -o pipefail; export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
B=/tmp/bench; export PYTHONPATH=$PWD
python benchmarks/hbm_floor.py --target $B/target --device cuda --skip-8b --steps 64 --out $OUT/hbm_floor_bench.json > $OUT/hbm.log 2>&1
tail -3 $OUT/hbm.log
for f in .devcarry/ray-*.tar.xz; do tar -C /tmp -xJf $f; done; export PYTHONPATH=/tmp/raypack:$PWD
CL="python benchmarks/cluster_gpu.py --target $B/target --draft $B/draft --dtype bfloat16 --max-tokens 128 --verifier-gpus 1 --colocate-drafter"
timeout 200 $CL --max-draft 8 --modes ar,pearl,sd+adaedl --out $OUT/cluster_colocated_pearl.json > $OUT/cluster_pearl.log 2>&1
timeout $((420 - SECONDS)) $CL --max-draft 8 --temperature 1 --modes pearl+adaedl,sd+adaedl --out $OUT/cluster_colocated_t1_adaedl.json > $OUT/cluster_t1a.log 2>&1
for f in cluster_pearl cluster_t1a; do grep -v "INFO\|WARN\|pid=" $OUT/$f.log | grep -A7 "^mode"; done
