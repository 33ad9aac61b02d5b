# GPU call B (~9 min, after gpu_run_a.sh while warm, carry .devcarry): concurrency at T=0 and T=1,
# natural language, fp32 equality, then the cluster path (Ray Serve, gRPC, a lane with the drafter
# colocated in the replica, the one-GPU layout, every CUDA graph captured at start) for the best
# batch-1 mode at T=0 on gpu_bench's held-out prompts (T=1 is in gpu_run_c.sh: a lane capturing
# every graph for max_draft 16 took 143 s to start in the sixth lease).
# Where the machine went cold after gpu_run_a.sh (it goes back 30 s after a call), this call trains a
# 4-minute pair and runs calibration + concurrency + natural language on it instead (seventh lease).
set -o pipefail; export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
B=/tmp/bench
export PYTHONPATH=$PWD
SECTIONS=concurrency,natural_language,lossless_fp32; RESUME=--resume; BEST="--best-from $B/gpu_bench.json"
if [ ! -f $B/draft/config.json ]; then  # the machine went cold: a shorter pair, and no batch-1 rows (gpu_run_a.sh's)
  python -m tandem.zoo --preset bench --out $B --device cuda --minutes 4 --draft-share 0.5 --eval-prompts 8 > $OUT/zoo.log 2>&1
  tail -3 $OUT/zoo.log; cp $B/zoo_report.json $OUT/; SECTIONS=calibration,concurrency,natural_language; RESUME=
  BEST="--modes ar,sd+adaedl --max-draft 16"  # the best batch-1 T=0 mode of the sixth and seventh leases
fi
python benchmarks/gpu_bench.py --target $B/target --draft $B/draft --device cuda --dtype bfloat16 \
  --sections $SECTIONS $RESUME --deadline-s 220 --out $B/gpu_bench.json > $OUT/bench_b.log 2>&1
cp $B/gpu_bench.json $OUT/gpu_bench.json
grep -v "^\[" $OUT/bench_b.log | tail -44 | cut -c1-170
for f in .devcarry/ray-*.tar.xz; do tar -C /tmp -xJf $f; done; export PYTHONPATH=/tmp/raypack:$PWD
CL="python benchmarks/cluster_gpu.py --target $B/target --draft $B/draft --dtype bfloat16 --max-tokens 128 $BEST --graphs-at-start"
timeout $((585 - SECONDS)) $CL --verifier-gpus 1 --colocate-drafter --out $OUT/cluster_colocated_t0.json > $OUT/cluster_t0.log 2>&1
grep -v "INFO\|WARN\|pid=" $OUT/cluster_t0.log | grep -A5 "^mode"
