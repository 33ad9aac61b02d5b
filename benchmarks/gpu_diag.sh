set -o pipefail; export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,memory.total,clocks.sm --format=csv
python -m pytest -q -p no:cacheprovider tests/test_fast_path.py tests/test_draft_steps.py tests/test_triton_kernels.py tests/test_attention.py tests/test_layer_ops.py tests/test_rejection.py tests/test_engines.py 2>&1 | tail -25 > $OUT/gpu_tests.log
python benchmarks/engine_gpu.py --profile --reps 30 --out $OUT/engine_gpu.json > $OUT/engine_gpu.log 2>&1
python benchmarks/hbm_floor.py --device cuda --deadline 120 --steps 64 --out $OUT/hbm_floor.json > $OUT/hbm_floor.log 2>&1
cat $OUT/gpu_tests.log; grep -v "^-\|^ *$" $OUT/engine_gpu.log | head -150 | cut -c1-180; tail -8 $OUT/hbm_floor.log
