# One GPU call (~8.5 min): a pair trained for 3 min, then the concurrency sweep (1, 4, 16, 64) at
# T=0 and T=1 with every CUDA graph captured before timing (gpu_bench records any graph captured
# inside a timed run in `captured_in_timed_run`). Rows: AR, SD k=5, SD + AdaEDL, PEARL + AdaEDL.
set -o pipefail; export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD TOKENIZERS_PARALLELISM=false
B=/tmp/bench; nvidia-smi --query-gpu=name --format=csv,noheader
python -m tandem.zoo --preset bench --out $B --device cuda --minutes ${ZOO_MIN:-3} --draft-share 0.5 \
  --eval-prompts 8 > $OUT/zoo.log 2>&1; tail -1 $OUT/zoo.log; cp $B/zoo_report.json $OUT/
python benchmarks/gpu_bench.py --target $B/target --draft $B/draft --device cuda --dtype bfloat16 \
  --sections calibration,concurrency --deadline-s $((500 - SECONDS)) --out $OUT/gpu_bench_concurrency.json > $OUT/bench.log 2>&1
grep -v "^\[\|^!!\|WARNING\|^$" $OUT/bench.log | tail -36 | cut -c1-190
