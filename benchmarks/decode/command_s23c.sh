#!/bin/bash
# Session 23 call C: (issue 14) KV-cache decode at batch 16 after the decode-step change (bf16, int4, KIVI-4),
# alone on the GPU; then (issue 12) the GPU quantizer on kinds not yet timed, default tiling only, merged into the
# shipped table.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .peer/*.whl && export PYTHONPATH=/tmp/site:. || exit
export PYTHONUNBUFFERED=1
mkdir -p $OUT/pq $OUT/s/decode
T0=$(date +%s)
B=${BUDGET:-500}
timeout 165 python3 -m experiments.bench_decode --config=base --batches=16 --schemes=bf16,int4,kivi4 --iters=3 \
  --out_dir=$OUT/s/decode --tag=decode_base_h200_b16_s23 > $OUT/s/decode_b16.log 2>&1
echo "decode b16 rc=$? at $(( $(date +%s) - T0 )) s" > $OUT/s/times.txt
L=$(( B - ($(date +%s) - T0) - 15 ))
timeout $L python3 experiments/bench_gpu_quantize.py --out_dir=$OUT/pq --write_configs --workers=4 --nosweep \
  --merge_configs=lowbit_jax/kernels/gpu_quantize_configs.json \
  --formats=int8_pc,mxfp4,nvfp4,mxint8,fp4_e2m1_g32,mxfp6_e2m3,int8_pt,int8_g128 \
  --time_budget_s=$(( L - 45 )) --hard_limit_s=$(( L - 15 )) > $OUT/pq/bench.log 2>&1
echo "quantize bench rc=$? at $(( $(date +%s) - T0 )) s" >> $OUT/s/times.txt
cd $OUT && tar czf s.tgz s pq && rm -rf s pq && ls -la
