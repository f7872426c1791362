#!/bin/bash
# Session 22 call B: (issue 12) the GPU quantizer's tiling sweep over every format, writing the
# dispatcher's table; then (issue 14) the KV-cache decode rows call 2 of session 21 did not reach
# (batch 1: int4, kivi4, fp8; batch 16: fp8), each batch with its bf16 reference, alone on the GPU.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .peer/*.whl && export PYTHONPATH=/tmp/site:. || exit
export PYTHONUNBUFFERED=1
mkdir -p $OUT/pq $OUT/s/decode
T0=$(date +%s)
timeout 238 python3 experiments/bench_gpu_quantize.py --out_dir=$OUT/pq --write_configs --workers=8 --time_budget_s=195 --hard_limit_s=225 > $OUT/pq/bench.log 2>&1
echo "quantize bench rc=$? at $(( $(date +%s) - T0 )) s" > $OUT/s/times.txt
for b in 1 16; do
  if [ $b = 1 ]; then SCH=bf16,int4,kivi4,fp8_e4m3; LIM=170; else SCH=bf16,fp8_e4m3; LIM=$(( ${BUDGET:-555} - ($(date +%s) - T0) - 12 )); fi
  timeout $LIM python3 -m experiments.bench_decode --config=base --batches=$b --schemes=$SCH --iters=3 \
    --out_dir=$OUT/s/decode --tag=decode_base_h200_b${b}_s22 > $OUT/s/decode_b$b.log 2>&1
  echo "decode b$b rc=$? at $(( $(date +%s) - T0 )) s" >> $OUT/s/times.txt
done
cd $OUT && tar czf s.tgz s pq && rm -rf s pq && ls -la
