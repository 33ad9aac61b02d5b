# GPU check after the shared-workspace fix (one H200, ~4 min, carry .devcarry): GPU tests, engine
# timings + overlap equality on random bench-shaped weights, the cluster path on a random pair.
set -o pipefail; export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD TOKENIZERS_PARALLELISM=false
python -m pytest -q -p no:cacheprovider tests/test_fast_path.py tests/test_draft_steps.py 2>&1 | tail -4 > $OUT/tests.log; cat $OUT/tests.log
python benchmarks/engine_gpu.py --reps 20 --out $OUT/engine_gpu.json > $OUT/engine_gpu.log 2>&1; grep -E "ms/step|decode:|^c =" $OUT/engine_gpu.log | cut -c1-220
python benchmarks/random_pair.py --out /tmp/rand > /dev/null 2>&1
for f in .devcarry/ray-*.tar.xz; do tar -C /tmp -xJf $f; done; export PYTHONPATH=/tmp/raypack:$PWD
timeout 200 python benchmarks/cluster_gpu.py --target /tmp/rand/target --draft /tmp/rand/draft --dtype bfloat16 --verifier-gpus 0.5 \
  --drafter-gpus 0.5 --max-tokens 128 --modes ar,pearl --max-draft 4 --out $OUT/cluster_rand.json > $OUT/cluster.log 2>&1
grep -v "INFO\|WARN\|pid=" $OUT/cluster.log | tail -7
