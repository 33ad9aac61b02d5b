# GPU call D (~4 min, one H200, no Ray; most of it capturing every graph for 64 slots): where an AR / SD step's time goes at T=0 and T=1, and
# whether warm_kernels, capturing every graph at start, or gc.freeze() change it
# (benchmarks/step_profile.py says why). Uses the benchmark pair if gpu_run_a.sh left it in
# /tmp/bench, else a random-weight pair of the same shapes (timing only).
set -o pipefail; export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD TOKENIZERS_PARALLELISM=false
P=/tmp/bench; [ -f $P/draft/config.json ] || { P=/tmp/rand; python benchmarks/random_pair.py --out $P; }
python benchmarks/step_profile.py --target $P/target --draft $P/draft --out $OUT/step_profile.json 2>&1 \
  | grep -v "USDT\|nanobind\|leaked\|skipped remainder\|refleaks\|reference counting" | tee $OUT/step_profile.log | cut -c1-220
