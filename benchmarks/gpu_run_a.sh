# GPU call A (one H200, ~9.5 min): train the benchmark pair, then calibration + batch-1 latency.
# Call B (gpu_run_b.sh) must follow while the machine is warm: it reuses /tmp/bench.
set -o pipefail; export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD TOKENIZERS_PARALLELISM=false
B=/tmp/bench; nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
if [ ! -f $B/draft/config.json ]; then
  python -m tandem.zoo --preset bench --out $B --device cuda --minutes ${ZOO_MIN:-5.5} --draft-share 0.5 \
    --eval-prompts 8 > $OUT/zoo.log 2>&1; tail -12 $OUT/zoo.log; cp $B/zoo_report.json $OUT/
fi
python benchmarks/step_profile.py --target $B/target --draft $B/draft --phases few_slots --prompts 2 \
  --out $OUT/step_profile_a.json 2>&1 | grep -A40 "^phase" | grep -v "Warning\|_warn" | cut -c1-220
python benchmarks/gpu_bench.py --target $B/target --draft $B/draft --device cuda --dtype bfloat16 --hf-prompts 2 \
  --sections calibration,latency --deadline-s $((575 - SECONDS)) --out $B/gpu_bench.json > $OUT/bench_a.log 2>&1
cp $B/gpu_bench.json $OUT/gpu_bench_a.json; grep -v "^\[" $OUT/bench_a.log | tail -32 | cut -c1-150
