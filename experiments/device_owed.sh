#!/bin/bash
# The GPU runs still owed (BUILD.md "Still owed"), as one device call each:
#
#   LIMIT=<seconds> bash experiments/device_owed.sh <item>...
#
# run from the repository root on the GPU machine, with the wheels of
# ../shared/wheels copied to .peer/ (carried). Results go to $OUT/r, packed
# into $OUT/all.tgz on exit. An item's runs start only while their timeout
# still fits in LIMIT. Items:
#   g   the non-kernel matmul's new orders (int4 codes in the dot, the
#       group-batched dot): their GPU tests, the public path at M = 1..64
#       (bench_kernels --phases=fallback) and bench_primitives' matmul table;
#       any Hopper GPU (an H100's run compares with run_fb_h100.json)
#   g2  after g (session 45): the E2M1 weights' public path again at M = 1 / 4
#       (their codes left out of the new orders), the group-batched dot
#       against the fused order at M = 16..128 (ops._GROUP_DOT_ROWS_PER_GROUP)
#       and per-channel codes at M = 512..2048 (ops._CODES_IN_DOT_MAX_ROWS);
#       any Hopper GPU
#   q   the QAT step with its trace-time metrics kept on the host (session
#       45's split_constant_metrics: 142 fewer device ops a quantized step)
#       against a plain jax.jit of it, in one call; any Hopper GPU
#   h   the H200's: g's tests and table, and the public path on every shape
#       and M, to decide the H200's tuned table against it (--mode=report
#       with the inputs in benchmarks/kernels_h200.md's header)
#   hf  h's public-path run alone (run_fb: what the H200's table decision
#       needs), for a call with less than h's time
#   t   GPU tests: split orders, the public dot on reordered weights,
#       acc_scale, float32 group scales on the tuned tilings
#   i4  int4 weights on "wgmma_int4" codes, decode shapes (run_i4)
#   b   E2M1 on "wgmma_e2m1" codes at M = 64 / 256 (run_sp3), the quantizer's
#       tilings again (--write_configs), bench_primitives for NF4 / ternary / fp6
#   c   the tuner at M = 256 / 512 (run_mid6), the L2 band probe
#   gt  the GPU test files whole, a run each, four workers with XLA's
#       preallocation off (eight preallocating workers ran out of memory in
#       session 52; six without preallocation ran every file in session
#       55); any Hopper GPU
#   gs  the same files' cases marked slow (--runslow -m slow), as far as the
#       call's time goes; any Hopper GPU
# Items h, hf, i4, b and c time the H200 (its tuned tables and notes): on
# another GPU they stop unless FORCE=1; g, g2, q and t run on any Hopper GPU.
START=$(date +%s); LIMIT=${LIMIT:-560}
mkdir -p "$OUT/r"; R=$OUT/r
trap 'cd "$OUT" && tar czf all.tgz r && rm -rf r' EXIT
fits() { [ $(( $(date +%s) - START + $1 )) -le "$LIMIT" ]; }
run() {
  local t=$1 name=$2; shift 2
  if fits "$t"; then
    echo "== $name $(date +%T)"
    timeout "$t" "$@" > "$R/$name.log" 2>&1
    echo "rc $? $name $(( $(date +%s) - START ))s" | tee -a "$R/rcs.txt"
  else
    echo "skip $name (no time)" | tee -a "$R/rcs.txt"
  fi
}
nvidia-smi --query-gpu=name,memory.total --format=csv > "$R/gpu.txt" 2>&1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .peer/*.whl > "$R/pip.log" 2>&1
export PYTHONPATH=/tmp/site:.
BK="python3 experiments/bench_kernels.py --tokamax=false --w8a8="
mm() {
  run 140 prims_mm python3 -m experiments.bench_primitives --sections=matmul --noreference \
      --time_budget_s=105 --hard_limit_s=125 "$@" --tag=mm --out_dir="$R"
}
for it in "${@:-g}"; do
  case $it in
    g|g2|q|t|gt|gs) ;;
    h|hf|i4|b|c)
       if ! grep -q H200 "$R/gpu.txt" && [ -z "$FORCE" ]; then
         echo "skip $it (an H200 item; FORCE=1 runs it here)" | tee -a "$R/rcs.txt"
         continue
       fi ;;
    *) echo "unknown item $it (one of g g2 q h hf t i4 b c gt gs)" | tee -a "$R/rcs.txt"; continue ;;
  esac
  case $it in
    g)
      run 140 run_fb2 $BK --mode=tune --phases=fallback --shapes=8192x8192,8192x28672 \
          --batches=1,4,16,64 --block8b=false \
          --kernels=int4_g128,int4_g32,int4_pc,int8_pc,int8_g128,fp4_g32,mxfp4,nvfp4 \
          --time_budget_s=105 --hard_limit_s=125 --tag=run_fb2 --out_dir="$R"
      run 70 tests_ops python3 -m pytest -q -p no:cacheprovider tests/core/test_ops.py -k 16bit
      mm ;;
    g2)
      run 90 run_fb_e2m1 $BK --mode=tune --phases=fallback --batches=1,4 \
          --kernels=fp4_g32,mxfp4,nvfp4 --block8b=false \
          --time_budget_s=70 --hard_limit_s=85 --tag=run_fb_e2m1 --out_dir="$R"
      run 120 prims_groups python3 -m experiments.bench_primitives --sections=matmul \
          --noreference --matmul_formats=int4_g128,int8_g128,int4_g64,int4_g32 \
          --matmul_m=16,32,64,128 --time_budget_s=95 --hard_limit_s=110 \
          --tag=groups --out_dir="$R"
      run 90 prims_codes python3 -m experiments.bench_primitives --sections=matmul \
          --noreference --matmul_formats=int4,int8 --matmul_m=512,1024,2048 \
          --time_budget_s=70 --hard_limit_s=85 --tag=codes --out_dir="$R" ;;
    q)
      QV='bf16 (no quantization),int8 W+A (STE),MXFP4 W+A,NVFP4 W+A'
      run 200 qat_split python3 -m experiments.bench_qat --only "$QV" --iters 10 \
          --noqwix --out "$R/qat_split.json"
      run 200 qat_plain python3 -m experiments.bench_qat --only "$QV" --iters 10 \
          --noqwix --plain_jit --out "$R/qat_plain.json" ;;
    h|hf)
      [ "$it" = h ] && run 90 tests_ops python3 -m pytest -q -p no:cacheprovider \
          tests/core/test_ops.py -k 16bit
      run 300 run_fb $BK --mode=tune --phases=fallback --batches=1,4,16,64,256,512,4096 \
          --kernels=int4_g128,int4_pc,int8_pc,fp4_g32,mxfp4,nvfp4,int4_g32,int8_g128 \
          --time_budget_s=265 --hard_limit_s=290 --tag=run_fb --out_dir="$R"
      [ "$it" = h ] && mm --baseline=benchmarks/primitives_h200.json ;;
    t)
      run 150 tests_t python3 -m pytest -q -p no:cacheprovider tests/kernels/test_gpu_kernels.py \
          -k "split_orders or public_dot_reads or acc_scale or float32_group_scales or grad_through" ;;
    gt)
      for f in tests/kernels/test_gpu_quantize.py tests/formats/test_formats.py \
          tests/core/test_qarray.py tests/core/test_fused_gpu.py tests/core/test_ops.py \
          tests/kernels/test_gpu_dequantize.py tests/kernels/test_gpu_extreme_scales.py \
          tests/kernels/test_gpu_kernels.py tests/core/test_excess_precision.py; do
        left=$(( LIMIT - $(date +%s) + START - 15 )); [ "$left" -gt 240 ] && left=240
        [ "$left" -lt 60 ] && left=60  # too little: run() then skips it
        XLA_PYTHON_CLIENT_PREALLOCATE=false run "$left" "gt_$(basename "$f" .py)" \
            python3 -m pytest -q -p no:cacheprovider -n 6 --durations=15 "$f"
      done ;;
    gs)
      for f in tests/kernels/test_gpu_kernels.py tests/kernels/test_gpu_dequantize.py \
          tests/kernels/test_gpu_extreme_scales.py tests/core/test_ops.py \
          tests/formats/test_formats.py tests/kernels/test_gpu_quantize.py; do
        left=$(( LIMIT - $(date +%s) + START - 15 )); [ "$left" -gt 300 ] && left=300
        [ "$left" -lt 60 ] && left=60
        XLA_PYTHON_CLIENT_PREALLOCATE=false run "$left" "gs_$(basename "$f" .py)" \
            python3 -m pytest -q -p no:cacheprovider -n 6 --runslow -m slow \
            --durations=15 "$f"
      done ;;
    i4)
      run 420 run_i4 $BK --mode=tune --phases=base,tune,refine --w_order=wgmma_int4 \
          --shapes=8192x28672,8192x8192,4096x14336,14336x4096,4096x4096,4096x1024 --batches=1,16 \
          --kernels=int4_pc,int4_g128 --block8b=false \
          --time_budget_s=360 --hard_limit_s=395 --tag=run_i4 --out_dir="$R" ;;
    b)
      run 200 run_sp3 $BK --mode=tune --phases=base,tune --w_order=wgmma_e2m1 \
          --shapes=8192x8192,14336x4096 --batches=64,256 --kernels=mxfp4,nvfp4 --block8b=false \
          --time_budget_s=160 --hard_limit_s=185 --tag=run_sp3 --out_dir="$R"
      run 260 gq python3 experiments/bench_gpu_quantize.py --nounroll --write_configs \
          --time_budget_s=220 --hard_limit_s=250 \
          --merge_configs=lowbit_jax/kernels/gpu_quantize_configs.json --out_dir="$R"
      cp lowbit_jax/kernels/gpu_quantize_configs.json "$R/"
      run 90 prims python3 -m experiments.bench_primitives --sections=prims \
          --formats=nf4,ternary,fp6_e2m3 --noreference \
          --baseline=benchmarks/primitives_h200.json --out_dir="$R" ;;
    c)
      run 400 run_mid6 $BK --mode=tune --phases=base,tune --shapes=14336x4096,8192x8192 \
          --batches=256,512 --kernels=int4_g128,int4_pc,int8_pc,mxfp4 --block8b=false \
          --time_budget_s=340 --hard_limit_s=375 --tag=run_mid6 --out_dir="$R"
      run 120 l2 python3 -m experiments.probe_l2_bands --result_json="$R/l2_bands.json" ;;
  esac
done
